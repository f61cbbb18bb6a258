"""The ServerApp: validate the run config, build model and defense, run the rounds, write results.

Per round the configured strategy (``server_app.defenses``) trains the clients and aggregates
in ``aggregate_train``; after each round the harness evaluates the global model on the server's
held-out test set, prints progress and appends the round (metrics and the defense's record) to
``rounds.jsonl`` in the run's results folder.
"""

from __future__ import annotations

import sys
import time
from logging import ERROR, INFO

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from task.config import ConfigError, RunConfig

app = ServerApp()


SIMULATION_NODE_WAIT = 10.0
"""Seconds a simulation's ServerApp waits for its SuperNodes: the simulation engine registers
all of them at once as it starts, so a shortfall after this is its federation config."""


def is_simulation(grid: Grid) -> bool:
    """Whether the ServerApp runs in Flower's simulation engine (its in-memory Grid)."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


def wait_for_nodes(grid: Grid, needed: int, timeout: float, simulated: bool) -> int:
    """Block until ``needed`` SuperNodes are connected; ``ConfigError`` naming the shortfall
    after ``timeout`` seconds (in a simulation, after ``SIMULATION_NODE_WAIT``)."""
    if simulated:
        timeout = min(timeout, SIMULATION_NODE_WAIT)
    deadline = time.monotonic() + timeout
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= needed:
            return connected
        if time.monotonic() > deadline:
            advice = (f"pass --federation-config \"num-supernodes={needed} ...\" to flwr run"
                      if simulated else f"start {needed} SuperNodes")
            raise ConfigError(f"num-clients={needed} but the federation has {connected} "
                              f"SuperNode(s) after {timeout:.0f} s: {advice} (or lower num-clients)")
        time.sleep(0.5)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run one experiment as configured by ``context.run_config``."""
    try:
        config = RunConfig.from_run_config(context.run_config)
        run_experiment(grid, config)
    except ConfigError as err:
        log(ERROR, "Invalid run config: %s", err)
        sys.exit(f"Invalid run config: {err}")


def run_experiment(grid: Grid, config: RunConfig) -> dict:
    """The experiment harness; returns the summary it writes."""
    import torch

    from server_app.defenses import build_defense
    from server_app.metrics import detection_metrics, pooled_detection_metrics
    from attacks import build_attack
    from server_app.eavesdrop import EavesdroppingGrid, serves_benign_uploads
    from server_app.results import ResultsWriter, new_run_dir
    from task.data import load_federated_data
    from task.models import build_model, default_cam_layer
    from task.train import evaluate, pick_device

    torch.manual_seed(config.seed)
    device = pick_device()
    data = load_federated_data(config.dataset, config.seed)
    test = data.test

    def model_fn() -> torch.nn.Module:
        return build_model(config.model, test.in_channels, test.num_classes, test.image_size)

    global_model = model_fn()
    config.validate_for(test.num_classes, test.image_size, global_model)
    probe_order = torch.randperm(len(test), generator=torch.Generator().manual_seed(config.seed))
    probes = test.as_float(probe_order[: config.layercam_ae_probes])
    probe_labels = test.labels[probe_order[: config.layercam_ae_probes]]
    strategy = build_defense(config, model_fn, probes, default_cam_layer(config.model), test,
                             probe_labels)

    simulated = is_simulation(grid)
    connected = wait_for_nodes(grid, config.num_clients, config.node_wait_timeout, simulated)
    writer = ResultsWriter(new_run_dir(config.results_dir, config.defense, config.attack))
    writer.write_config(config.to_run_config())
    log(INFO, "Results folder: %s", writer.path)
    serve_benign = serves_benign_uploads(
        build_attack(config, model_fn()).needs_benign_uploads, config.num_attackers,
        simulated, config.eavesdrop_in_deployment)
    grid = EavesdroppingGrid(grid, serve_benign)  # ground truth; the eavesdropping channel
    log(INFO, "%d SuperNodes connected; starting %d rounds of %s", connected,
        config.num_server_rounds, config.defense)

    started = time.monotonic()
    round_started = [started]
    decisions = []  # (truth, excluded, scores) per round, for the run's pooled metrics

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = model_fn()
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        loss, accuracy = evaluate(model, test, device)
        now = time.monotonic()
        row = {"round": server_round, "accuracy": accuracy, "loss": loss,
               "seconds": now - round_started[0], "elapsed": now - started}
        record = strategy.last_record if server_round > 0 else None
        if record is not None:
            row["defense"] = record.to_json()
            truth = {n: grid.truth[n] for n in record.received if n in grid.truth}
            if truth:
                removed = set(record.excluded) | set(record.rejected)
                row["detection"] = detection_metrics(truth, removed, record.scores)
                decisions.append((truth, removed, record.scores))
            heatmaps = getattr(strategy, "last_heatmaps", None)
            if heatmaps is not None:
                writer.save_heatmap_grid(server_round, heatmaps, record.received, set(record.excluded))
        writer.append_round(row)
        round_started[0] = now
        excluded = f", excluded {len(record.excluded)}" if record is not None else ""
        print(f"[round {server_round}/{config.num_server_rounds}] elapsed {now - started:6.1f} s, "
              f"accuracy {accuracy:.4f}, loss {loss:.4f}{excluded}", flush=True)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(global_model.state_dict()),
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout,
        train_config=ConfigRecord({"local-epochs": config.local_epochs}),
        evaluate_fn=evaluate_global,
    )
    final_state = {k: v.numpy() for k, v in result.arrays.items()}
    writer.save_model(final_state)
    final = writer.rounds[-1]
    summary = {
        "rounds": config.num_server_rounds,
        "final_accuracy": final["accuracy"],
        "final_loss": final["loss"],
        "best_accuracy": max(r["accuracy"] for r in writer.rounds),
        "total_seconds": time.monotonic() - started,
        "defense": config.defense,
        "attack": config.attack,
        "results_dir": str(writer.path),
        "detection": pooled_detection_metrics(decisions) if decisions else None,
    }
    writer.write_summary(summary)
    print(f"Done: final accuracy {summary['final_accuracy']:.4f} after "
          f"{summary['total_seconds']:.1f} s; results in {writer.path}", flush=True)
    return summary
