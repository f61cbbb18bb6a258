"""The ServerApp: validate the run config, build model and defense, run the rounds, write results.

Per round the configured strategy (``server_app.defenses``) trains the clients and aggregates
in ``aggregate_train``; after each round the harness evaluates the global model on the server's
held-out test set, prints progress, appends the round (metrics and the defense's record) to
``rounds.jsonl`` in the run's results folder and checkpoints the run, which ``resume-from``
continues after a crash.
"""

from __future__ import annotations

import sys
import time
from logging import ERROR, INFO

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from task.config import ConfigError, RunConfig

app = ServerApp()


SIMULATION_NODE_WAIT = 10.0
"""Seconds a simulation's ServerApp waits for its first SuperNode: the simulation engine
registers all of them at once as it starts, so the count it then shows is final."""


def is_simulation(grid: Grid) -> bool:
    """Whether the ServerApp runs in Flower's simulation engine (its in-memory Grid)."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


def wait_for_nodes(grid: Grid, needed: int, timeout: float, simulated: bool,
                   poll: float = 0.5) -> int:
    """Block until ``needed`` SuperNodes are connected; ``ConfigError`` naming the shortfall
    after ``timeout`` seconds, or in a simulation as soon as its count is final: above zero
    and the same in two polls (within ``SIMULATION_NODE_WAIT`` at most)."""
    if simulated:
        timeout = min(timeout, SIMULATION_NODE_WAIT)
    deadline, previous = time.monotonic() + timeout, 0
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= needed:
            return connected
        final = simulated and 0 < connected == previous
        if final or time.monotonic() > deadline:
            advice = (f"pass --federation-config \"num-supernodes={needed} ...\" to flwr run"
                      if simulated else f"start {needed} SuperNodes")
            waited = "" if final else f" after {timeout:.0f} s"
            raise ConfigError(f"num-clients={needed} but the federation has {connected} "
                              f"SuperNode(s){waited}: {advice} (or lower num-clients)")
        previous = connected
        time.sleep(poll)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run one experiment as configured by ``context.run_config``."""
    from server_app.results import ResultsError
    from task.data import DatasetUnavailableError

    try:
        config = RunConfig.from_run_config(context.run_config)
        run_experiment(grid, config)
    except ConfigError as err:
        log(ERROR, "Invalid run config: %s", err)
        sys.exit(f"Invalid run config: {err}")
    except (ResultsError, DatasetUnavailableError) as err:  # the results folder can't be
        # written, or a dataset to download can't be had: one line naming it and the way out
        log(ERROR, "%s", err)
        sys.exit(str(err))


def run_experiment(grid: Grid, config: RunConfig) -> dict:
    """The experiment harness; returns the summary it writes.

    The rounds follow Flower's ``Strategy.start`` (train, aggregate, evaluate the global model
    on the server; client-side evaluation is off), from round 1, or, with ``resume-from``, from
    the round after the named run's last checkpoint (``server_app.checkpoint``), written after
    every round.
    """
    import torch

    from server_app.checkpoint import open_resumed_run, restore, save_checkpoint
    from server_app.defenses import build_defense, server_assets
    from server_app.eavesdrop import EavesdroppingGrid, serves_benign_uploads
    from server_app.results import ResultsWriter, RoundLog, new_run_dir
    from task.data import load_federated_data
    from task.train import evaluate, pick_device

    torch.manual_seed(config.seed)
    device = pick_device()
    test = load_federated_data(config.dataset, config.seed).test
    simulated = is_simulation(grid)
    grid = EavesdroppingGrid(grid, serves_benign_uploads(  # ground truth; eavesdropping channel
        config.num_attackers, simulated, config.eavesdrop_in_deployment))
    assets = server_assets(config, test, grid)
    model_fn = assets.model_fn
    global_model = model_fn()
    config.validate_for(test.num_classes, global_model, assets.probes[:1])
    strategy = build_defense(config, assets)
    checkpoint = None
    if config.resume_from:
        writer, checkpoint = open_resumed_run(config, global_model.state_dict(), strategy)

    connected = wait_for_nodes(grid, config.num_clients, config.node_wait_timeout, simulated)
    if checkpoint is None:
        writer = ResultsWriter(new_run_dir(config.results_dir, config.defense, config.attack))
        writer.write_config(config.to_run_config())
        round_log = RoundLog(writer, config.num_server_rounds)  # starts the rounds' clock
        arrays, first_round = ArrayRecord(global_model.state_dict()), 1
    else:
        round_log = RoundLog(writer, config.num_server_rounds, **checkpoint["log"])
        arrays = restore(checkpoint, strategy, set(grid.get_node_ids()))
        first_round = checkpoint["round"] + 1
        log(INFO, "Resuming %s after round %d", writer.path, checkpoint["round"])
    log(INFO, "Results folder: %s", writer.path)
    log(INFO, "%d SuperNodes connected; starting %d rounds of %s", connected,
        config.num_server_rounds - first_round + 1, config.defense)
    strategy.on_record = lambda record: round_log.add_record(record, grid.truth, grid.ray_nodes)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> None:
        model = model_fn()
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        loss, accuracy = evaluate(model, test, device)
        round_log.add_evaluation(server_round, accuracy, loss)

    if first_round == 1:
        evaluate_global(0, arrays)
    train_config = ConfigRecord({"local-epochs": config.local_epochs})
    for server_round in range(first_round, config.num_server_rounds + 1):
        replies = grid.send_and_receive(
            strategy.configure_train(server_round, arrays, train_config, grid),
            timeout=config.round_timeout)
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        evaluate_global(server_round, arrays)
        save_checkpoint(writer, server_round, arrays, strategy, round_log)

    writer.save_model({k: v.numpy() for k, v in arrays.items()})
    final = writer.rounds[-1]
    summary = {
        "rounds": config.num_server_rounds,
        "final_accuracy": final["accuracy"],
        "final_loss": final["loss"],
        "best_accuracy": max(r["accuracy"] for r in writer.rounds),
        "total_seconds": time.monotonic() - round_log.started,
        "defense": config.defense,
        "attack": config.attack,
        "results_dir": str(writer.path),
        "detection": round_log.pooled_detection(),
    }
    writer.write_summary(summary)
    print(f"Done: final accuracy {summary['final_accuracy']:.4f} after "
          f"{summary['total_seconds']:.1f} s; results in {writer.path}", flush=True)
    return summary
