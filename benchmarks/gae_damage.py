"""Damage of the GAE attack against its controls, under plain FedAvg.

For every seed, partitioning and number of attackers (of 24 clients), R rounds of FedAvg under
``none``, ``gae``, ``radius-noise`` and ``undo-update``; printed as one Markdown table:
- the global model's test accuracy after R rounds (mean +- std over seeds) and its change
  against ``none`` with the same seed and partitioning;
- the crafted models' own test accuracy and their update's cosine with -u_bar (the benign mean
  update reversed), averaged over attackers and rounds;
- GAE's craft time per attacker and its split over the steps.

The rounds run in-process (``experiments.federation``), as ``flwr run`` runs them with
``defense='fedavg'`` and default keys otherwise: the same partitions, initial model
(``torch.manual_seed(seed)`` before the data and the model are built), per-client training
seeds (``client_app.training_seed``), attack seeds, benign uploads forwarded to the attackers
in the harness's order, claimed data sizes (the median benign size for attackers) and
aggregation (the strategy's, on uploads in the order of their content, as the server sums
them); only Flower's messaging is absent. ``--flwr-check`` says how to compare one cell with a
real ``flwr run``.

    python benchmarks/gae_damage.py                     # 3 seeds x iid/dirichlet x 3/6/12 attackers
    python benchmarks/gae_damage.py --rounds 5 --seeds 42 --attackers 3 --partitionings iid
    python benchmarks/gae_damage.py --attacks gae        # GAE's rows (and no attack) only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ATTACKS = ("none", "gae", "radius-noise", "undo-update")
NUM_CLIENTS = 24


def _cosine(a, b) -> float:
    import numpy as np

    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def run_group(task: tuple[int, str, tuple[int, ...], int, tuple[str, ...]]) -> list[dict]:
    """Every attack and attacker count for one (seed, partitioning), after the run without
    attackers (the change column's reference): round 1's benign training is the same for all
    of them, so it is done once."""
    import torch

    from attacks.gae import Gae
    from attacks.observed import observe_round
    from experiments.federation import LocalFederation, run_rounds
    from task.config import RunConfig

    seed, partitioning, attacker_counts, rounds, attacks = task
    torch.set_num_threads(1)
    base = RunConfig(num_clients=NUM_CLIENTS, partitioning=partitioning, seed=seed,
                     defense="fedavg", num_server_rounds=rounds)
    federation = LocalFederation(base)
    cells = [("none", 0)] + [(a, m) for a in attacks for m in attacker_counts]
    results = []
    for attack_name, attackers in cells:
        config = dataclasses.replace(base, attack=attack_name, num_attackers=attackers)
        crafted_accuracy, cosines, craft_seconds = [], [], []

        def timed(attack, client, state, seconds):
            if isinstance(attack, Gae):
                craft_seconds.append({**attack.last_report.seconds, "total": seconds})

        started = time.perf_counter()
        for played in run_rounds(federation, config, rounds, on_craft=timed):
            if played.attackers:
                observed = observe_round(played.global_state, [u.arrays for u in played.benign],
                                         [u.num_examples for u in played.benign])
            for upload in sorted(played.crafted, key=lambda u: u.node_id):
                crafted_accuracy.append(federation.accuracy(upload.arrays))
                cosines.append(_cosine(observed.update_of(upload.arrays), -observed.mean_update))
            global_state = played.new_global_state
        results.append({
            "seed": seed, "partitioning": partitioning, "attack": attack_name,
            "attackers": attackers, "accuracy": federation.accuracy(global_state),
            "crafted_accuracy": statistics.fmean(crafted_accuracy) if crafted_accuracy else None,
            "cosine_with_undo": statistics.fmean(cosines) if cosines else None,
            "craft_seconds": craft_seconds, "seconds": time.perf_counter() - started,
        })
        print(f"  seed {seed} {partitioning:9s} {attack_name:12s} m={attackers:2d}: "
              f"accuracy {results[-1]['accuracy']:.4f} ({results[-1]['seconds']:.0f} s)",
              flush=True)
    return results


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(results: list[dict], attacker_counts, partitionings) -> str:
    """One row per partitioning x attack x attackers; the none row is shared by all counts."""
    none = {(r["seed"], r["partitioning"]): r["accuracy"] for r in results if r["attack"] == "none"}
    lines = ["| partitioning | attack | attackers | FedAvg accuracy | change vs none | "
             "crafted model's accuracy | cos(update, -u_bar) |", "|---|---|---|---|---|---|---|"]
    for partitioning in partitionings:
        rows = [r for r in results if r["partitioning"] == partitioning]
        base = [r["accuracy"] for r in rows if r["attack"] == "none"]
        lines.append(f"| {partitioning} | none | 0 | {_mean_std(base)} | | | |")
        for attack in ATTACKS[1:]:
            for m in attacker_counts:
                cell = [r for r in rows if r["attack"] == attack and r["attackers"] == m]
                if not cell:
                    continue
                change = [r["accuracy"] - none[(r["seed"], partitioning)] for r in cell]
                lines.append(
                    f"| {partitioning} | {attack} | {m} | {_mean_std([r['accuracy'] for r in cell])} "
                    f"| {_mean_std(change)} | {_mean_std([r['crafted_accuracy'] for r in cell])} "
                    f"| {_mean_std([r['cosine_with_undo'] for r in cell])} |")
    return "\n".join(lines)


def craft_times(results: list[dict]) -> str:
    """GAE's seconds per attacker and step, mean over every craft of the run."""
    crafts = [c for r in results for c in r["craft_seconds"]]
    if not crafts:
        return ""
    steps = list(crafts[0])
    return ("GAE craft seconds per attacker (mean of %d crafts): " % len(crafts)
            + ", ".join(f"{s} {statistics.fmean(c[s] for c in crafts):.3f}" for s in steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--attackers", type=int, nargs="+", default=[3, 6, 12])
    parser.add_argument("--partitionings", nargs="+", default=["iid", "dirichlet"])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS[1:]), choices=ATTACKS[1:],
                        help="the attacks to run (no attack always runs: the reference)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the raw results as JSON")
    parser.add_argument("--flwr-check", action="store_true",
                        help="print the flwr run command that reproduces one cell, and exit")
    args = parser.parse_args()
    if args.flwr_check:
        print('flwr run . --stream --federation-config "num-supernodes=24 '
              'client-resources-num-cpus=1 init-args-num-cpus=2" --run-config '
              f'"defense=\'fedavg\' attack=\'gae\' num-attackers=3 seed={args.seeds[0]} '
              f'num-server-rounds={args.rounds}"')
        return
    tasks = [(seed, p, tuple(args.attackers), args.rounds, tuple(args.attacks))
             for seed in args.seeds for p in args.partitionings]
    started = time.perf_counter()
    with mp.get_context("spawn").Pool(args.workers) as pool:
        results = [r for group in pool.imap_unordered(run_group, tasks) for r in group]
    print(f"\n{args.rounds} rounds of FedAvg, {NUM_CLIENTS} clients, seeds {args.seeds}; "
          f"{time.perf_counter() - started:.0f} s\n")
    print(table(results, args.attackers, args.partitionings))
    print("\n" + craft_times(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
