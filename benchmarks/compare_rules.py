"""Measure LayerCAM-AE's two outlier rules on the same rounds, against crafted malicious uploads.

21 benign clients train the embedded-MNIST CNN on IID partitions; 3 attackers upload one of:
- ``scaled``: the same reversed, scaled mean benign update, w_g - 3 * mean(delta) (colluding);
- ``noise``:  their own trained model plus independent Gaussian noise (sigma = 0.05);
- ``sign-flip``: their own update negated, w_g - delta_i.
Each round, the strategy (default rule) aggregates; both rules' continuous scores are recorded
and their ROC AUC printed with scikit-learn, with the test accuracy of the resulting model.

    python benchmarks/compare_rules.py --rounds 4 --attacks scaled noise sign-flip
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

from strategies.aggregation import weighted_average
from strategies.layercam_ae import LayerCamAe
from strategies.records import ClientUpload
from task.data import load_federated_data
from task.models import build_model
from task.partition import client_indices
from task.train import evaluate, load_numpy_state, state_to_numpy, train

ATTACKS = ("scaled", "noise", "sign-flip")


def benign_round(global_state, data, num_clients, seed, server_round):
    """Train every client's model from ``global_state``; returns their states and sizes."""
    states, sizes = [], []
    for cid in range(num_clients):
        idx = client_indices(data.train.labels.numpy(), cid, num_clients, "iid", 0.5, seed)
        local = data.train.subset(idx)
        model = build_model("cnn", 1, 10, 28)
        load_numpy_state(model, global_state)
        train(model, local, epochs=1, batch_size=64, learning_rate=1e-3, weight_decay=0.0,
              device=torch.device("cpu"), seed=seed * 1000 + server_round * 100 + cid)
        states.append(state_to_numpy(model))
        sizes.append(len(local))
    return states, sizes


def craft(attack, global_state, own_states, benign_states, rng):
    """Malicious states for the attackers (``own_states``: what they trained honestly)."""
    mean_delta = {k: np.mean([s[k] - global_state[k] for s in benign_states], axis=0)
                  for k in global_state}
    out = []
    for own in own_states:
        if attack == "scaled":
            out.append({k: global_state[k] - 3.0 * mean_delta[k] for k in global_state})
        elif attack == "noise":
            out.append({k: (own[k] + rng.normal(0, 0.05, own[k].shape)).astype(own[k].dtype)
                        for k in own})
        elif attack == "sign-flip":
            out.append({k: global_state[k] - (own[k] - global_state[k]) for k in own})
        else:
            raise ValueError(attack)
    return out


def run(attack: str, rounds: int, num_clients: int, num_attackers: int, seed: int, rule: str,
        probes: int = 1, z: float = 3.0, warmup_state=None):
    data = load_federated_data("mnist-embedded", seed)
    torch.manual_seed(seed)
    global_state = warmup_state or state_to_numpy(build_model("cnn", 1, 10, 28))
    order = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(seed))
    strategy = LayerCamAe(model_fn=lambda: build_model("cnn", 1, 10, 28),
                          probes=data.test.as_float(order[:probes]), target_layer="conv2",
                          decision="voting", threshold=rule, robust_z=z, seed=seed)
    rng = np.random.default_rng(seed)
    rows = []
    for server_round in range(1, rounds + 1):
        states, sizes = benign_round(global_state, data, num_clients, seed, server_round)
        attackers = list(range(num_clients - num_attackers, num_clients))
        malicious = craft(attack, global_state, [states[i] for i in attackers],
                          states[: num_clients - num_attackers], rng)
        for i, state in zip(attackers, malicious):
            states[i] = state
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
            global_state = weighted_average(kept)
        model = build_model("cnn", 1, 10, 28)
        load_numpy_state(model, global_state)
        _, acc = evaluate(model, data.test, torch.device("cpu"))
        excluded = sorted(set(ids) - set(detection.kept))
        row = dict(attack=attack, rule=rule, round=server_round, auc_upper=auc_upper,
                   auc_two_sided=auc_two, accuracy=acc,
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
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--rules", nargs="+", default=["upper", "two-sided"])
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--attackers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probes", type=int, default=1, help="probe images per heat map")
    parser.add_argument("--z", type=float, default=3.0, help="two-sided rule's cut")
    args = parser.parse_args()
    torch.set_num_threads(2)
    summary = []
    for attack in args.attacks:
        for rule in args.rules:
            rows = run(attack, args.rounds, args.clients, args.attackers, args.seed, rule,
                       args.probes, args.z)
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
