"""The benchmarks' in-process rounds (``experiments.federation.play_round``) against the server's
own ``aggregate_train`` on the same uploads: the same screening, decision and model."""

from __future__ import annotations

import types

import numpy as np
import pytest

import experiments.federation as federation
from strategies.base import DetectingFedAvg
from strategies.records import ClientUpload, Detection
from tests.helpers import reply

GLOBAL = {"w": np.ones(4, np.float32), "bn.num_batches_tracked": np.array(100, np.int64)}
ATTACKERS = frozenset({3, 4})


def upload(node: int, w: float, count: int) -> ClientUpload:
    return ClientUpload(node, {"w": np.full(4, w, np.float32),
                               "bn.num_batches_tracked": np.array(count, np.int64)}, 10.0 + node)


UPLOADS = [upload(0, 1.1, 110), upload(1, 0.9, 110), upload(2, 1.05, 111),
           upload(3, 1.2, 100 + 2**32),  # a count no view sees, as far as a round may move it
           upload(4, 1e5, 110)]  # an update past the screening's norm bound


def played(strategy, monkeypatch):
    monkeypatch.setattr(federation, "client_uploads", lambda *_: (list(UPLOADS), []))
    return federation.play_round(types.SimpleNamespace(attackers=lambda _: ATTACKERS), None,
                                 strategy, None, GLOBAL, 1)


def served(strategy):
    strategy.global_state = GLOBAL
    arrays, _ = strategy.aggregate_train(1, [reply(u.node_id, u.arrays,
                                                   {"num-examples": u.num_examples})
                                             for u in UPLOADS])
    return (None if arrays is None else {k: v.numpy() for k, v in arrays.items()},
            strategy.last_record)


def test_a_round_in_process_screens_decides_and_aggregates_as_the_server(monkeypatch):
    round_ = played(DetectingFedAvg(), monkeypatch)
    state, record = served(DetectingFedAvg())
    assert set(round_.rejected) == set(record.rejected) == {4}
    assert round_.rejected[4] == record.rejected[4] and "update norm" in round_.rejected[4]
    assert round_.truth == {0: False, 1: False, 2: False, 3: True, 4: True}
    assert sorted(u.node_id for u in round_.kept) == record.kept == [0, 1, 2, 3]
    for name in GLOBAL:
        np.testing.assert_array_equal(round_.new_global_state[name], state[name])
    assert round_.new_global_state["bn.num_batches_tracked"] == 110  # the median, not its pull


def test_a_rule_that_fails_costs_the_round_in_process_too(monkeypatch):
    class Failing(DetectingFedAvg):
        def detect(self, server_round, uploads) -> Detection:
            raise RuntimeError("no decision")

    round_ = played(Failing(), monkeypatch)
    _, record = served(Failing())
    skipped = "the decision failed: RuntimeError: no decision"
    assert round_.detection.details["skipped"] == skipped and record.note.startswith(skipped)
    assert round_.kept == [] and round_.new_global_state is GLOBAL
    assert not record.aggregated and record.kept == []


def test_the_in_process_rounds_refuse_a_sample_per_round():
    """They send every round to every client; with ``clients-per-round`` the attacks' n (ALIE,
    model replacement) would be the sample's."""
    from task.config import RunConfig

    local = federation.LocalFederation(RunConfig())
    with pytest.raises(ValueError, match="clients-per-round is for flwr run"):
        local.check(RunConfig(clients_per_round=12))
    local.check(RunConfig())


def test_the_in_process_clients_train_and_the_server_evaluates_on_the_apps_device(monkeypatch):
    """The ClientApp trains and the ServerApp evaluates on ``pick_device()`` (a GPU when there
    is one): so do the in-process rounds, or their numbers would be another run's."""
    import torch

    from task.config import RunConfig

    device = torch.device("cpu", 0)  # a device other than the CPU's default, that runs here
    monkeypatch.setattr(federation, "pick_device", lambda: device)
    used = []
    for name in ("train", "evaluate"):
        real = getattr(federation, name)
        monkeypatch.setattr(federation, name, lambda *a, real=real, **k: (
            used.append(k.get("device", a[2] if len(a) > 2 else None)), real(*a, **k))[1])
    config = RunConfig(num_clients=4, local_epochs=1)
    local = federation.LocalFederation(config)
    local.accuracy(local.train_client(config, local.initial, 1, 0))
    assert used == [device, device]
