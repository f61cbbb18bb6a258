"""Measure LayerCAM-AE's two per-round outlier rules on the same rounds, against attacks.

21 benign clients train the run config's model on its data (defaults: the embedded-MNIST CNN,
IID); 3 attackers upload what an attack of ``attacks/`` crafts, each with its own seed, from
its own model or from the round's benign uploads, as in a run (``experiments.federation``:
the ClientApp's training seeds, the harness's order of the benign uploads, the server's order
of the uploads). Each round LayerCAM-AE, built from the shipped defaults with
``layercam-ae-decision='voting'`` and the rule under test, decides and aggregates; both rules'
continuous scores are recorded and their ROC AUC printed with scikit-learn, with the test
accuracy of the resulting model. ``--set KEY=VALUE`` changes any run-config key.

    python benchmarks/compare_rules.py --rounds 4 --attacks ipm gaussian sign-flip \
        --set ipm-epsilon=3.0 --set gaussian-sigma=0.05
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from attacks import ATTACKS
from benchmarks.cli import run_config_override
from experiments.federation import LocalFederation, run_rounds
from task.config import RunConfig

DEFAULT_ATTACKS = ("ipm", "gaussian", "sign-flip")


def run(config: RunConfig, rounds: int, federation: LocalFederation | None = None) -> list[dict]:
    """``rounds`` rounds of ``config.attack`` against LayerCAM-AE (``config``'s rule), on
    ``federation`` (built from ``config`` by default)."""
    federation = federation or LocalFederation(config)
    num_clients = config.num_clients
    rows = []
    for played in run_rounds(federation, config, rounds):
        attackers = sorted(played.attackers)
        d = played.detection.details
        acc = federation.accuracy(played.new_global_state)
        if "skipped" in d:  # no decision: nothing scored
            row = dict(attack=config.attack, round=played.server_round, accuracy=acc,
                       skipped=d["skipped"], rejected=played.rejected)
            print(json.dumps(row), flush=True)
            rows.append(row)
            continue
        two_sided = d["two_sided_scores"]  # the uploads scored (not those rejected)
        ids = [u.node_id for u in played.uploads if u.node_id in two_sided]
        truth = np.array([n in played.attackers for n in ids], dtype=int)
        both = 0 < truth.sum() < len(truth)
        auc_upper = roc_auc_score(truth, [d["upper_scores"][n] for n in ids]) if both else None
        auc_two = roc_auc_score(truth, [two_sided[n] for n in ids]) if both else None
        removed = played.excluded | set(played.rejected)
        row = dict(attack=config.attack, rule=config.layercam_ae_threshold,
                   round=played.server_round, auc_upper=auc_upper, auc_two_sided=auc_two,
                   accuracy=acc, attackers_excluded=sum(i in removed for i in attackers),
                   benign_excluded=sum(i in removed for i in range(num_clients)
                                       if i not in played.attackers),
                   attacker_two_sided=sorted(round(two_sided[i], 2) for i in attackers
                                             if i in two_sided),
                   benign_two_sided_top=sorted(round(two_sided[i], 2) for i in range(num_clients)
                                               if i not in played.attackers
                                               and i in two_sided)[-3:],
                   rejected=played.rejected,
                   seconds={k: round(v, 3) for k, v in played.detection.timings.items()})
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def mean_auc(rows: list[dict], key: str) -> float:
    """The mean of ``key`` over the rows that have one (rounds with both kinds of client)."""
    aucs = [r[key] for r in rows if r[key] is not None]
    return float(np.mean(aucs)) if aucs else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--attacks", nargs="+", default=list(DEFAULT_ATTACKS), choices=ATTACKS.names())
    parser.add_argument("--rules", nargs="+", default=["upper", "two-sided"])
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        type=run_config_override, metavar="KEY=VALUE",
                        help="a run-config key, e.g. --set layercam-ae-probes=1 (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    overrides = dict(args.overrides)
    summary, federation = [], None
    for attack in args.attacks:
        for rule in args.rules:
            config = RunConfig.from_run_config({
                **overrides, "defense": "layercam-ae", "attack": attack,
                "layercam-ae-decision": "voting", "layercam-ae-threshold": rule})
            federation = federation or LocalFederation(config)  # round 1 trained once
            rows = run(config, args.rounds, federation)
            decided = [r for r in rows if "skipped" not in r]  # rounds with a decision
            summary.append((attack, rule, mean_auc(decided, "auc_upper"),
                            mean_auc(decided, "auc_two_sided"),
                            rows[-1]["accuracy"], sum(r["attackers_excluded"] for r in decided),
                            sum(r["benign_excluded"] for r in decided),
                            len(rows) - len(decided)))
    print(f"\n{'attack':10} {'rule':10} {'AUC upper':>9} {'AUC 2-side':>10} {'final acc':>9} "
          f"{'attk excl':>9} {'benign excl':>11} {'skipped':>7}")
    for attack, rule, au, at, acc, ae, be, skipped in summary:
        print(f"{attack:10} {rule:10} {au:9.3f} {at:10.3f} {acc:9.4f} {ae:9d} {be:11d} "
              f"{skipped:7d}")


if __name__ == "__main__":
    main()
