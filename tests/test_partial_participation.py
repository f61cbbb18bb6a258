"""Partial participation (``clients-per-round``): which nodes a round samples, and that the
records, the evidence and the detection metrics count only the client-rounds that happened."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from server_app.app import run_experiment
from strategies.base import sample_nodes
from strategies.detection.evidence import EvidenceLedger
from task.config import ConfigError, RunConfig
from tests.local_grid import LocalGrid


def test_a_sample_depends_on_the_seed_and_the_round_not_on_the_order_of_the_nodes():
    nodes = [17, 3, 99, 5, 42, 8, 61, 23]
    first = sample_nodes(nodes, 3, seed=7, server_round=1)
    assert len(first) == len(set(first)) == 3 and set(first) <= set(nodes)
    assert first == sorted(first)
    assert sample_nodes(list(reversed(nodes)), 3, seed=7, server_round=1) == first
    assert sample_nodes(nodes, 3, seed=7, server_round=1) == first
    draws = {tuple(sample_nodes(nodes, 3, seed=7, server_round=r)) for r in range(1, 11)}
    assert len(draws) > 5  # the rounds draw differently
    assert sample_nodes(nodes, 3, seed=8, server_round=1) != first or \
        sample_nodes(nodes, 3, seed=8, server_round=2) != sample_nodes(nodes, 3, seed=7, server_round=2)


def test_a_sample_is_every_node_when_too_few_and_at_least_one():
    assert sample_nodes([4, 2, 9], 5, seed=0, server_round=1) == [2, 4, 9]
    assert len(sample_nodes([4, 2, 9], 0, seed=0, server_round=1)) == 1


def test_every_node_is_sampled_about_equally_often():
    nodes, rounds, size = list(range(20)), 2_000, 5
    counts = Counter(n for r in range(1, rounds + 1) for n in sample_nodes(nodes, size, 3, r))
    expected = rounds * size / len(nodes)  # 500, binomial sd ~19.4
    assert set(counts) == set(nodes)
    assert all(abs(c - expected) < 5 * 19.4 for c in counts.values()), counts


def test_clients_per_round_is_checked_against_the_federation():
    with pytest.raises(ConfigError, match="clients-per-round"):
        RunConfig.from_run_config({"num-clients": 10, "clients-per-round": 11})
    with pytest.raises(ConfigError, match="clients-per-round"):
        RunConfig.from_run_config({"num-clients": 10, "min-replies": 4, "clients-per-round": 3})
    assert RunConfig.from_run_config({"num-clients": 10, "clients-per-round": 4}).clients_per_round == 4


def test_a_client_absent_for_rounds_keeps_its_evidence_until_it_is_scored_again():
    ledger = EvidenceLedger(memory=0.8, cap=3.0)
    first = ledger.update({1: -2.0, 2: 0.5})
    for _ in range(5):  # client 1 is not sampled for five rounds
        ledger.update({2: 0.1})
    assert ledger.sums[1] == -2.0 and ledger.variances[1] == 1.0
    back = ledger.update({1: -2.0})[1]
    assert back == pytest.approx((0.8 * -2.0 - 2.0) / np.sqrt(0.8**2 + 1))
    assert back < first[1]  # its second low round adds to the first, however long ago


def test_with_decay_by_rounds_the_evidence_of_an_absent_client_fades_with_the_rounds_missed():
    ledger = EvidenceLedger(memory=0.8, cap=3.0, decay="rounds")
    ledger.update({1: -2.0, 2: 0.5}, server_round=1)
    for server_round in range(2, 7):  # client 1 misses rounds 2-6
        ledger.update({2: 0.1}, server_round=server_round)
    keep = 0.8 ** 6  # five rounds missed, then this round's own forgetting
    back = ledger.update({1: -2.0}, server_round=7)[1]
    assert back == pytest.approx((keep * -2.0 - 2.0) / np.sqrt(keep**2 + 1))
    every_round = EvidenceLedger(memory=0.8, cap=3.0, decay="rounds")
    by_participation = EvidenceLedger(memory=0.8, cap=3.0)
    for server_round in range(1, 5):  # a client scored every round: both decays agree
        scores = {3: -1.5 + 0.1 * server_round}
        assert every_round.update(scores, server_round) == by_participation.update(scores)


@pytest.mark.e2e
def test_a_run_sends_each_round_to_its_sample_and_counts_only_those_client_rounds(tmp_path):
    clients, per_round, rounds, attackers = 8, 4, 3, 2
    config = RunConfig.from_run_config({
        "num-clients": clients, "num-attackers": attackers, "attack": "sign-flip",
        "sign-flip-scale": 4.0, "defense": "layercam-ae", "local-epochs": 1,
        "layercam-ae-epochs": 50, "min-replies": 2, "clients-per-round": per_round,
        "num-server-rounds": rounds, "results-dir": str(tmp_path)})
    grid = LocalGrid(config.to_run_config(), clients, attackers, num_partitions=4 * clients)
    summary = run_experiment(grid, config)
    rows = [json.loads(line) for line in
            (Path(summary["results_dir"]) / "rounds.jsonl").read_text().splitlines()][1:]
    attacker_ids = set(range(clients - attackers + 1, clients + 1))  # LocalGrid's last nodes
    samples = [row["defense"]["sampled"] for row in rows]
    assert samples == [sample_nodes(list(range(1, clients + 1)), per_round, config.seed, r)
                       for r in range(1, rounds + 1)]
    assert len({tuple(s) for s in samples}) > 1  # the rounds sampled differently
    counted = Counter()
    for row, sample in zip(rows, samples):
        record, detection = row["defense"], row["detection"]
        assert sorted(record["received"]) == sample  # only the sampled nodes were asked
        assert record["missing"] == []  # the nodes left out are no dropouts
        positives = len(attacker_ids & set(sample))
        assert detection["tp"] + detection["fn"] == positives
        assert detection["tn"] + detection["fp"] == per_round - positives
        counted.update(tp=detection["tp"], fp=detection["fp"], tn=detection["tn"],
                       fn=detection["fn"])
    pooled = {k: summary["detection"][k] for k in ("tp", "fp", "tn", "fn")}
    assert pooled == dict(counted) | {k: 0 for k in pooled if k not in counted}
    assert sum(pooled.values()) == rounds * per_round
