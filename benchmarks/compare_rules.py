"""Measure LayerCAM-AE's two per-round outlier rules on the same rounds, against attacks.

21 benign clients train the run config's model on its data (defaults: the embedded-MNIST CNN,
IID); 3 attackers upload what an attack of ``attacks/`` crafts from their own model and the
round's benign uploads. Each round LayerCAM-AE, built from the shipped defaults with
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

from attacks import ATTACKS, AttackInput, build_attack
from benchmarks.cli import run_config_override
from client_app.app import training_seed
from server_app.defenses import build_defense, server_assets
from strategies.records import ClientUpload
from task.config import RunConfig
from task.data import load_federated_data
from task.models import build_model
from task.partition import client_indices
from task.train import evaluate, load_numpy_state, state_to_numpy, train

DEFAULT_ATTACKS = ("ipm", "gaussian", "sign-flip")


def benign_round(global_state, data, config: RunConfig, server_round):
    """Train every client's model from ``global_state``; returns their states and sizes."""
    states, sizes = [], []
    for cid in range(config.num_clients):
        idx = client_indices(data.train.labels.numpy(), cid, config.num_clients,
                             config.partitioning, config.dirichlet_alpha, config.seed)
        local = data.train.subset(idx)
        model = build_model(config.model, local.in_channels, local.num_classes, local.image_size)
        load_numpy_state(model, global_state)
        train(model, local, epochs=config.local_epochs, batch_size=config.batch_size,
              learning_rate=config.learning_rate, weight_decay=config.weight_decay,
              device=torch.device("cpu"), seed=training_seed(config, server_round, cid))
        states.append(state_to_numpy(model))
        sizes.append(len(local))
    return states, sizes


def run(config: RunConfig, rounds: int) -> list[dict]:
    """``rounds`` rounds of ``config.attack`` against LayerCAM-AE (``config``'s rule)."""
    data = load_federated_data(config.dataset, config.seed)
    torch.manual_seed(config.seed)
    assets = server_assets(config, data.test)
    global_state = state_to_numpy(assets.model_fn())
    strategy = build_defense(config, assets)
    attack = build_attack(config, assets.model_fn())
    rng = np.random.default_rng(config.seed)
    num_clients, num_attackers = config.num_clients, config.num_attackers
    rows = []
    for server_round in range(1, rounds + 1):
        states, sizes = benign_round(global_state, data, config, server_round)
        attackers = list(range(num_clients - num_attackers, num_clients))
        benign = tuple(states[: num_clients - num_attackers])
        for i in attackers:
            states[i] = attack.craft(AttackInput(global_state, states[i], rng, benign))
        uploads = [ClientUpload(1000 + i, s, float(n)) for i, (s, n) in enumerate(zip(states, sizes))]
        strategy.global_state = global_state
        detection = strategy.detect(server_round, uploads)
        truth = np.array([i in attackers for i in range(num_clients)], dtype=int)
        ids = [u.node_id for u in uploads]
        d = detection.details
        auc_upper = roc_auc_score(truth, [d["upper_scores"][n] for n in ids])
        auc_two = roc_auc_score(truth, [d["two_sided_scores"][n] for n in ids])
        kept = [u for u in uploads if u.node_id in set(detection.kept)]
        if kept:
            global_state = strategy.new_global_state(detection, kept)
        model = assets.model_fn()
        load_numpy_state(model, global_state)
        _, acc = evaluate(model, data.test, torch.device("cpu"))
        excluded = sorted(set(ids) - set(detection.kept))
        row = dict(attack=config.attack, rule=config.layercam_ae_threshold, round=server_round,
                   auc_upper=auc_upper, auc_two_sided=auc_two, accuracy=acc,
                   attackers_excluded=sum(1000 + i in excluded for i in attackers),
                   benign_excluded=sum(1000 + i in excluded for i in range(num_clients)
                                       if i not in attackers),
                   attacker_two_sided=sorted(round(d["two_sided_scores"][1000 + i], 2) for i in attackers),
                   benign_two_sided_top=sorted(round(d["two_sided_scores"][1000 + i], 2)
                                               for i in range(num_clients) if i not in attackers)[-3:],
                   seconds={k: round(v, 3) for k, v in detection.timings.items()})
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


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
    summary = []
    for attack in args.attacks:
        for rule in args.rules:
            config = RunConfig.from_run_config({
                **overrides, "defense": "layercam-ae", "attack": attack,
                "layercam-ae-decision": "voting", "layercam-ae-threshold": rule})
            rows = run(config, args.rounds)
            summary.append((attack, rule, np.mean([r["auc_upper"] for r in rows]),
                            np.mean([r["auc_two_sided"] for r in rows]), rows[-1]["accuracy"],
                            sum(r["attackers_excluded"] for r in rows),
                            sum(r["benign_excluded"] for r in rows)))
    print(f"\n{'attack':10} {'rule':10} {'AUC upper':>9} {'AUC 2-side':>10} {'final acc':>9} "
          f"{'attk excl':>9} {'benign excl':>11}")
    for attack, rule, au, at, acc, ae, be in summary:
        print(f"{attack:10} {rule:10} {au:9.3f} {at:10.3f} {acc:9.4f} {ae:9d} {be:11d}")


if __name__ == "__main__":
    main()
