"""Builders shared by strategy tests: Flower reply messages, benign training rounds and a
round's benign reconstruction errors; the textbook autoencoder (nn.Sequential,
loss.backward(), unfused Adam) the strategy's one is checked against."""

from __future__ import annotations

import statistics

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from experiments.federation import LocalFederation, run_rounds
from strategies.detection.autoencoder import PATIENCE
from task.config import RunConfig


def act_as_serverapp() -> None:
    """Messages carry the sender's task identity; outside a Flower run, set one."""
    from flwr.supercore.task_identity import TaskIdentity

    for attribute in ("_run_id", "_node_id", "_task_id"):
        if getattr(TaskIdentity, attribute) is None:
            setattr(TaskIdentity, attribute, 1)


def reply(node_id: int, arrays: dict[str, np.ndarray] | None, metrics: dict) -> Message:
    """A training reply from ``node_id`` as the strategy receives it."""
    act_as_serverapp()
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type="train")
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})
    return Message(content, reply_to=instruction)


def benign_trajectory(rounds: int, num_clients: int, seed: int = 0):
    """Per round: the global model and every client's honestly trained state (1 local epoch,
    the embedded MNIST's CNN, IID), following clean FedAvg as ``flwr run`` runs it
    (``experiments.federation``: the ClientApp's training seeds, one intra-op thread, so the
    states do not depend on the machine's thread count). Returns (list of global states, list
    of lists of states in client order, sizes, data)."""
    config = RunConfig(dataset="mnist-embedded", model="cnn", partitioning="iid",
                       num_clients=num_clients, seed=seed, local_epochs=1, defense="fedavg",
                       attack="none", num_attackers=0)
    federation = LocalFederation(config)
    globals_, states = [], []
    for played in run_rounds(federation, config, rounds):
        globals_.append(played.global_state)
        states.append([u.arrays for u in sorted(played.uploads, key=lambda u: u.node_id)])
    return globals_, states, [len(p) for p in federation.partitions], federation.data


def autograd_reconstruction_errors(maps, *, hidden, epochs, lr=1e-3, weight_decay=1e-5, seed=0,
                                   tolerance=0.0):
    """The oracle: the same AE as nn.Sequential, autograd and torch.optim.Adam (unfused)."""
    generator = torch.Generator().manual_seed(seed)
    dim = maps.shape[1]
    ae = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(),
                             torch.nn.Linear(hidden, dim), torch.nn.Sigmoid())
    with torch.no_grad():
        for layer in (ae[0], ae[2]):
            bound = 1.0 / layer.in_features ** 0.5
            layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) * 2 * bound - bound)
            layer.bias.copy_(torch.rand(layer.bias.shape, generator=generator) * 2 * bound - bound)
    optimizer = torch.optim.Adam(ae.parameters(), lr=lr, weight_decay=weight_decay,
                                 foreach=False, fused=False)
    best, stale, ran = float("inf"), 0, 0
    for ran in range(1, epochs + 1):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(ae(maps), maps)
        loss.backward()
        optimizer.step()
        if tolerance > 0:
            stale = 0 if loss.item() < best * (1 - tolerance) else stale + 1
            best = min(best, loss.item())
            if stale >= PATIENCE:
                break
    with torch.no_grad():
        return (ae(maps) - maps).abs().mean(dim=1), ran


def check_faa_dl_round(row: dict, attackers_flagged: bool) -> dict:
    """The checks every FAA-DL round of rounds.jsonl passes: the OC-SVM flagged someone, each
    suspect was verified or cleared, only verified ones were excluded, no benign client was
    (a benign suspect's update is always reproduced), and a cleared suspect was reproduced;
    ``attackers_flagged``: at least one attacker was caught. Returns the round's record."""
    record, detection = row["defense"], row["detection"]
    details = record["details"]
    assert details["suspects"], "the OC-SVM (nu = 0.9) flags someone among six"
    assert sorted(details["verified"] + details["cleared"]) == details["suspects"]
    assert record["excluded"] == details["verified"]
    assert detection["fp"] == 0
    for node in details["cleared"]:  # cleared = reproduced, which no poisoned upload is
        assert details["mismatch"][str(node)] <= 1e-3
    if attackers_flagged:
        assert detection["tp"] >= 1, details
    return record


def benign_errors(rng: np.random.Generator, k: int = 24, spread: float = 0.05) -> np.ndarray:
    """A round's benign reconstruction errors: k normal quantiles around 1, in random order."""
    quantiles = statistics.NormalDist().inv_cdf
    return 1.0 + spread * rng.permutation([quantiles((i + 0.5) / k) for i in range(k)])
