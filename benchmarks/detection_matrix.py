"""Detection matrix: defenses x attacks x attacker counts x partitionings x seeds.

Every cell runs R rounds of 24 clients (``--clients``) in-process (``experiments.federation``),
as ``flwr run`` runs them with default keys otherwise (the ServerApp's seeding, partitions,
probes and strategy; the ClientApp's training seeds, attack inputs and claimed sizes), and
prints one Markdown table: pooled detection recall, precision, FPR, F1 and AUC over all
client-rounds, and the final accuracy next to the no-attack run of the same defense, seed and
partitioning (that no-attack cell always runs; ``--attacks none`` runs only it). The
strategy's own ``detect`` and ``aggregate`` decide each round, on uploads in the order the
server puts them in (``task.params.content_key``), and eavesdropping attackers get the benign
uploads in the harness's order; only Flower's messaging is absent.
``--flwr-check`` prints the ``flwr run`` command that reproduces one cell. Round 1's benign
training does not depend on the defense or the attack, so each worker does it once per seed
and partitioning.
``--oracle-rounds 1`` is a control: in the rounds listed, the attackers' uploads are dropped
whatever the defense decides (what a perfect round would cost nothing for).
``--head-control`` is the head-direction view's control: the view (and the adaptive attacker
that knows it) reads as many coordinates as the output layer holds, drawn at random from the
whole update, instead of the output layer's.

    python benchmarks/detection_matrix.py --defenses layercam-ae --attacks gae sign-flip
    python benchmarks/detection_matrix.py --partitionings dirichlet --attackers 3 \
        --attacks label-flip sign-flip --head-control
    python benchmarks/detection_matrix.py --set layercam-ae-decision=voting \
        --set layercam-ae-threshold=upper --set layercam-ae-map-size=probe \
        --set layercam-ae-views= --set layercam-ae-clip=false --out paper.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cli import run_config_override  # noqa: E402

NUM_CLIENTS = 24
ATTACKS = ("gae", "sign-flip", "gaussian", "uniform-noise", "label-flip", "alie", "ipm", "min-max",
           "min-sum", "adaptive-cam", "model-replacement", "radius-noise", "undo-update")


@dataclasses.dataclass(frozen=True)
class Cell:
    defense: str
    attack: str
    attackers: int
    partitioning: str
    seed: int
    overrides: tuple[tuple[str, object], ...] = ()

    @property
    def label(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.overrides)
        return f"{self.defense}{' ' + extra if extra else ''}"


HEAD_CONTROL_SEED = 0
"""The seed of ``random_head_columns``' draw: the same coordinates in every round and run."""


def random_head_columns(global_state: dict, names) -> tuple[slice, ...]:
    """``task.params.columns_of`` for ``--head-control``: as many columns of the update matrix
    as the ``names`` arrays (the output layer) take, drawn at random from all of its columns,
    each as a one-column slice in order (none for no names)."""
    from task.params import float_names

    if not names:
        return ()
    return _random_columns(sum(global_state[k].size for k in float_names(global_state)),
                           sum(global_state[k].size for k in names))


@functools.cache
def _random_columns(total: int, size: int) -> tuple[slice, ...]:
    """``size`` of ``total`` columns drawn with ``HEAD_CONTROL_SEED``, sorted, one-column slices:
    drawn once per shape, not at every judgement and craft."""
    import numpy as np

    picked = np.random.default_rng(HEAD_CONTROL_SEED).choice(total, size, replace=False)
    return tuple(slice(i, i + 1) for i in np.sort(picked).tolist())


def use_random_head() -> None:
    """Give the defense and the adaptive attacker ``random_head_columns`` for the head."""
    import attacks.adaptive_cam
    import strategies.layercam_ae

    for module in (strategies.layercam_ae, attacks.adaptive_cam):
        module.columns_of = random_head_columns


def run_group(cells: list[Cell], rounds: int, oracle_rounds: tuple[int, ...] = (),
              num_clients: int = NUM_CLIENTS, head_control: bool = False) -> list[dict]:
    """Every cell of one (seed, partitioning), in order; round 1's benign training shared;
    ``head_control``: ``use_random_head``."""
    import torch

    from experiments.federation import LocalFederation, run_rounds
    from server_app.metrics import detection_metrics, pooled_detection_metrics, round_decisions
    from task.config import RunConfig

    torch.set_num_threads(1)
    if head_control:
        use_random_head()
    seed, partitioning = cells[0].seed, cells[0].partitioning
    base = RunConfig(num_clients=num_clients, partitioning=partitioning, seed=seed,
                     num_server_rounds=rounds)
    federation = LocalFederation(base)
    results = []
    for cell in cells:
        config = dataclasses.replace(base, defense=cell.defense, attack=cell.attack,
                                     num_attackers=cell.attackers)
        config = RunConfig.from_run_config({**config.to_run_config(), **dict(cell.overrides)})
        decisions, per_round = [], []
        started = time.perf_counter()
        for played in run_rounds(federation, config, rounds, oracle_rounds=oracle_rounds):
            detection, excluded = played.detection, played.excluded
            decided = round_decisions(played.truth, excluded, played.rejected, detection.scores,
                                      "skipped" in detection.details)  # as the harness counts
            decisions.append(decided)
            per_round.append({"round": played.server_round, "excluded": sorted(excluded),
                              "rejected": sorted(played.rejected),
                              "scores": detection.scores, "details": _plain(detection.details),
                              **({"detection": detection_metrics(*decided)}
                                 if cell.attackers and decided[0] else {})})
            global_state = played.new_global_state
        accuracy = federation.accuracy(global_state)
        pooled = pooled_detection_metrics(decisions)
        results.append({**dataclasses.asdict(cell), "clients": num_clients,
                        "head_control": head_control,
                        "accuracy": accuracy, "pooled": pooled,
                        "rounds": per_round, "seconds": time.perf_counter() - started})
        print(f"  {cell.label:28s} {cell.attack:12s} m={cell.attackers:2d} {partitioning:9s} "
              f"seed {seed:3d}: acc {accuracy:.4f} recall {pooled['recall']:.3f} "
              f"precision {pooled['precision']:.3f} fpr {pooled['fpr']:.3f} "
              f"({results[-1]['seconds']:.0f} s)", flush=True)
    return results


def _plain(value):
    """JSON-safe copy of a detection's details (dict keys as strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: list[dict]) -> str:
    """One row per defense x attack x attackers x partitioning, mean ± std over seeds."""
    def setting(r: dict) -> tuple:  # a control run (--head-control) is a setting of its own
        return (r["defense"], tuple(map(tuple, r["overrides"])), r.get("head_control", False))

    none = {(*setting(r), r["partitioning"], r["seed"]): r["accuracy"]
            for r in results if r["attack"] == "none"}
    header = ("| defense | partitioning | attack | attackers | recall | precision | FPR | F1 | "
              "AUC | accuracy | Δ vs no attack (pt) |")
    lines = [header, "|" + "---|" * 11]
    keys = []
    for r in results:
        key = (*setting(r), r["partitioning"], r["attack"], r["attackers"])
        if key not in keys:
            keys.append(key)
    for defense, overrides, control, partitioning, attack, attackers in keys:
        cell = [r for r in results if (*setting(r), r["partitioning"], r["attack"], r["attackers"])
                == (defense, overrides, control, partitioning, attack, attackers)]
        label = (Cell(defense, attack, attackers, partitioning, 0, overrides).label
                 + (" (head-control)" if control else ""))
        pooled = {m: [r["pooled"][m] for r in cell] for m in ("recall", "precision", "fpr", "f1", "auc")}
        baseline = (defense, overrides, control, partitioning)
        delta = [100 * (r["accuracy"] - none[(*baseline, r["seed"])])
                 for r in cell if (*baseline, r["seed"]) in none]
        if attack == "none":
            pooled = {m: [r["pooled"]["fpr"] for r in cell] if m == "fpr" else [] for m in pooled}
        lines.append(
            f"| {label} | {partitioning} | {attack} | {attackers} | {_mean_std(pooled['recall'])} "
            f"| {_mean_std(pooled['precision'])} | {_mean_std(pooled['fpr'])} "
            f"| {_mean_std(pooled['f1'])} | {_mean_std(pooled['auc'])} "
            f"| {_mean_std([r['accuracy'] for r in cell])} "
            f"| {_mean_std(delta) if attack != 'none' else ''} |")
    return "\n".join(lines)


def views_table(results: list[dict]) -> str:
    """Per attack and attacker count, the pooled AUC (mean over seeds) of each side's own score:
    the heat maps' |evidence| and each update view's z; empty without views."""
    from sklearn.metrics import roc_auc_score

    sides: dict[tuple, dict[str, list[float]]] = {}
    for r in results:
        if not r["attackers"] or "views" not in r["rounds"][0]["details"]:
            continue
        clients = r.get("clients", NUM_CLIENTS)
        attackers = {str(c) for c in range(clients - r["attackers"], clients)}
        pooled: dict[str, tuple[list, list]] = {}
        for row in r["rounds"]:
            d = row["details"]
            signals = {"heat maps |E|": {c: abs(e) for c, e in d["evidence"].items()},
                       **{f"{v} z": z for v, z in d["views"].items()}}
            for name, values in signals.items():
                truth, scores = pooled.setdefault(name, ([], []))
                truth += [c in attackers for c in values]
                scores += list(values.values())
        cell = sides.setdefault((r["partitioning"], r["attack"], r["attackers"]), {})
        for name, (truth, scores) in pooled.items():
            cell.setdefault(name, []).append(roc_auc_score(truth, scores))
    if not sides:
        return ""
    names = list(next(iter(sides.values())))
    lines = ["| partitioning | attack | attackers | " + " | ".join(f"AUC {n}" for n in names) + " |",
             "|" + "---|" * (3 + len(names))]
    for (partitioning, attack, attackers), cell in sides.items():
        lines.append(f"| {partitioning} | {attack} | {attackers} | "
                     + " | ".join(f"{statistics.fmean(cell[n]):.3f}" for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--defenses", nargs="+", default=["layercam-ae"])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    parser.add_argument("--attackers", type=int, nargs="+", default=[3, 6])
    parser.add_argument("--partitionings", nargs="+", default=["iid"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--set", dest="overrides", action="append", default=[], type=run_config_override,
                        metavar="KEY=VALUE", help="a run-config key for every cell (repeatable)")
    parser.add_argument("--oracle-rounds", type=int, nargs="*", default=[],
                        help="rounds in which the attackers' uploads are dropped (a control)")
    parser.add_argument("--head-control", action="store_true",
                        help="the head-direction view reads random coordinates (its control)")
    parser.add_argument("--clients", type=int, default=NUM_CLIENTS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the raw results (every round) as JSON")
    parser.add_argument("--flwr-check", action="store_true",
                        help="print the flwr run command that reproduces the first cell, and exit")
    args = parser.parse_args()
    overrides = tuple(args.overrides)
    if args.head_control:
        from task.config import RunConfig

        views = RunConfig.from_run_config(dict(overrides)).layercam_ae_view_names
        if "head-direction" not in views:
            parser.error("--head-control replaces the head-direction view's columns: "
                         "layercam-ae-views must include head-direction")
        if args.flwr_check:
            parser.error("--head-control is a benchmark control: no flwr run reproduces it")
    groups = []
    for seed in args.seeds:
        for partitioning in args.partitionings:
            for defense in args.defenses:
                cells = [Cell(defense, "none", 0, partitioning, seed, overrides)]
                cells += [Cell(defense, a, m, partitioning, seed, overrides)  # none: above
                          for a in args.attacks if a != "none" for m in args.attackers]
                groups.append(cells)
    if args.flwr_check:
        c = groups[0][1]
        keys = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides)
        print(f'flwr run . --stream --federation-config "num-supernodes={args.clients} '
              'client-resources-num-cpus=1 init-args-num-cpus=2" --run-config '
              f"\"defense='{c.defense}' attack='{c.attack}' num-attackers={c.attackers} "
              f"num-clients={args.clients} "
              f"partitioning='{c.partitioning}' seed={c.seed} num-server-rounds={args.rounds} "
              f"{keys}\"")
        return
    started = time.perf_counter()
    with mp.get_context("spawn").Pool(args.workers) as pool:
        results = [r for group in pool.starmap(run_group, [(g, args.rounds, tuple(args.oracle_rounds),
                                                            args.clients, args.head_control)
                                                           for g in groups])
                   for r in group]
    print(f"\n{args.rounds} rounds, {args.clients} clients, seeds {args.seeds}; "
          f"{time.perf_counter() - started:.0f} s\n")
    if args.out:
        args.out.write_text(json.dumps(results))
    print(table(results))
    print("\n" + views_table(results))


if __name__ == "__main__":
    main()
