"""Replies crafted to break the server: each is rejected with a reason, nothing raises, and what
is aggregated equals the aggregate of the valid replies alone, for every defense that screens
through ``aggregate_train``."""

from __future__ import annotations

import dataclasses
import io
import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server_app.defenses import build_defense, server_assets
from strategies.registry import DEFENSES
from strategies.validation import MAX_CLAIM_RATIO, MAX_EXAMPLES
from task.config import RunConfig
from task.data import load_federated_data
from task.models import build_model
from task.train import state_to_numpy
from tests.helpers import act_as_serverapp, reply

VALID = 7
SCREENED_DEFENSES = [d for d in DEFENSES.names() if d != "faa-dl"]  # FAA-DL verifies over its Grid


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    data = load_federated_data("mnist-embedded", 0)
    global_state = state_to_numpy(build_model("cnn", 1, 10, 28))
    rng = np.random.default_rng(0)
    valid = [{k: (v + rng.normal(0, 0.01, v.shape)).astype(v.dtype) for k, v in global_state.items()}
             for _ in range(VALID)]
    return data, global_state, valid


def make_defense(name: str, data):
    config = RunConfig(defense=name, num_clients=VALID, num_attackers=1, krum_f=1, min_replies=1)
    return build_defense(config, server_assets(config, data.test))


def npy_bytes(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getvalue()


def raw_reply(node_id: int, arrays: dict[str, Array] | None, metrics: dict | None) -> Message:
    act_as_serverapp()
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type="train")
    content = RecordDict()
    if metrics is not None:
        content["metrics"] = MetricRecord(metrics)
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    return Message(content, reply_to=instruction)


def arrays_of(state: dict[str, np.ndarray]) -> dict[str, Array]:
    return {k: Array(np.ascontiguousarray(v)) for k, v in state.items()}


def malformed(kind: str, node_id: int, state: dict[str, np.ndarray], draw) -> Message:
    """A reply from ``node_id`` broken in the way ``kind`` names."""
    name = draw(st.sampled_from(sorted(state)))
    target = state[name]
    arrays = arrays_of(state)
    metrics = {"num-examples": 100, "train-loss": 0.1}
    if kind == "made-up dtype":
        arrays[name] = Array(dtype=draw(st.text(min_size=1, max_size=12)), shape=target.shape,
                             stype="numpy.ndarray", data=npy_bytes(target))
    elif kind == "bytes of another shape":
        arrays[name] = Array(dtype=str(target.dtype), shape=target.shape, stype="numpy.ndarray",
                             data=npy_bytes(np.ones(target.size + 1, dtype=target.dtype)))
    elif kind == "bytes of another dtype":
        other = draw(st.sampled_from([np.int64, np.float64, np.float16, np.int32]))
        with np.errstate(over="ignore", invalid="ignore"):
            data = npy_bytes((target * 1e6).astype(other))
        arrays[name] = Array(dtype=str(target.dtype), shape=target.shape, stype="numpy.ndarray",
                             data=data)
    elif kind == "garbage bytes":
        arrays[name] = Array(dtype=str(target.dtype), shape=target.shape, stype="numpy.ndarray",
                             data=draw(st.binary(max_size=64)))
    elif kind == "other serialisation":
        arrays[name] = Array(dtype=str(target.dtype), shape=target.shape,
                             stype=draw(st.text(max_size=8)), data=npy_bytes(target))
    elif kind == "wrong header shape":
        arrays[name] = Array(target.reshape(-1)) if target.ndim != 1 else Array(target[:-1])
    elif kind == "not finite":
        bad = target.copy()
        bad.flat[draw(st.integers(0, target.size - 1))] = draw(st.sampled_from(
            [np.nan, np.inf, -np.inf]))
        arrays[name] = Array(bad)
    elif kind == "absurd norm":
        arrays = arrays_of({k: v * 1e9 for k, v in state.items()})
    elif kind == "missing array":
        del arrays[name]
    elif kind == "extra array":
        arrays["extra." + name] = Array(target)
    elif kind == "num-examples":
        metrics["num-examples"] = draw(st.one_of(
            st.sampled_from([0, -1, float("nan"), float("inf"), 1e308, MAX_EXAMPLES * 10]),
            st.floats(max_value=0.0), st.lists(st.floats(1, 10), min_size=1, max_size=2)))
    elif kind == "no num-examples":
        del metrics["num-examples"]
    elif kind == "no metrics":
        metrics = None
    elif kind == "no arrays":
        arrays = None
    elif kind == "error":
        act_as_serverapp()
        instruction = Message(RecordDict(), dst_node_id=node_id, message_type="train")
        return Message(Error(code=0, reason=draw(st.text(max_size=20))), reply_to=instruction)
    return raw_reply(node_id, arrays, metrics)


KINDS = ["made-up dtype", "bytes of another shape", "bytes of another dtype", "garbage bytes",
         "other serialisation", "wrong header shape", "not finite", "absurd norm", "missing array",
         "extra array", "num-examples", "no num-examples", "no metrics", "no arrays", "error"]


def aggregate(name, data, global_state, replies):
    strategy = make_defense(name, data)
    strategy.global_state = global_state
    arrays, _ = strategy.aggregate_train(1, replies)
    return (None if arrays is None else {k: v.numpy() for k, v in arrays.items()}), strategy.last_record


@pytest.mark.parametrize("defense", SCREENED_DEFENSES)
@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_malformed_replies_are_rejected_and_change_nothing(defense, setting, data):
    images, global_state, valid = setting
    kinds = data.draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=4), label="kinds")
    bad_replies = [malformed(kind, 100 + i, valid[i % VALID], data.draw)
                   for i, kind in enumerate(kinds)]
    good_replies = [reply(c, state, {"num-examples": 100 + c, "train-loss": 0.1})
                    for c, state in enumerate(valid)]
    mixed = good_replies + bad_replies
    random.Random(data.draw(st.integers(0, 2**16), label="order")).shuffle(mixed)

    expected, clean_record = aggregate(defense, images, global_state, good_replies)
    got, record = aggregate(defense, images, global_state, mixed)

    assert set(record.rejected) == {100 + i for i in range(len(kinds))}, record.rejected
    assert all(isinstance(r, str) and r for r in record.rejected.values())
    assert record.kept == clean_record.kept and record.excluded == clean_record.excluded
    if expected is None:
        assert got is None
    else:
        assert got is not None and all(np.array_equal(got[k], expected[k]) for k in expected)


def test_each_crafted_reply_is_named_in_its_reason(setting):
    """The review's table, row by row, through FedAvg."""
    images, global_state, valid = setting
    state = valid[0]
    name = "fc2.bias"
    target = state[name]

    def with_array(array):
        return raw_reply(0, {**arrays_of(state), name: array}, {"num-examples": 100})

    cases = {
        1: with_array(Array(dtype="complex-thing", shape=target.shape, stype="numpy.ndarray",
                            data=npy_bytes(target))),
        2: with_array(Array(dtype="float32", shape=target.shape, stype="numpy.ndarray",
                            data=npy_bytes(np.ones((1, 10), dtype=np.float32)))),  # broadcasts
        3: with_array(Array(dtype="float32", shape=target.shape, stype="numpy.ndarray",
                            data=npy_bytes(np.full(target.shape, 10**15, dtype=np.int64)))),
        4: reply(0, state, {"num-examples": 1e18}),
        5: reply(0, state, {"num-examples": [100.0]}),
    }
    reasons = {}
    for case, message in cases.items():
        node_reply = Message(message.content, reply_to=Message(RecordDict(), dst_node_id=case,
                                                               message_type="train"))
        _, record = aggregate("fedavg", images, global_state,
                              [node_reply] + [reply(10 + c, s, {"num-examples": 100})
                                              for c, s in enumerate(valid[1:3])])
        assert record.kept == [10, 11], (case, record.rejected)
        reasons[case] = record.rejected[case]
    assert "complex-thing" in reasons[1]
    assert "decodes to float32[1, 10]" in reasons[2]
    assert "decodes to int64" in reasons[3]
    assert "num-examples" in reasons[4] and "1e+18" in reasons[4]
    assert "not a number" in reasons[5]


def test_an_error_after_an_accepted_reply_is_ignored(setting):
    images, global_state, valid = setting
    act_as_serverapp()
    error = Message(Error(code=0, reason="late"),
                    reply_to=Message(RecordDict(), dst_node_id=1, message_type="train"))
    _, record = aggregate("fedavg", images, global_state,
                          [reply(1, valid[0], {"num-examples": 10}),
                           reply(2, valid[1], {"num-examples": 10}), error])
    assert record.kept == [1, 2] and not record.rejected


def test_a_claim_far_above_the_median_counts_as_the_bound(setting):
    """Two clients claiming 1e308 would overflow the weight sum; one claiming 1e11 would take
    nearly all the weight. Rejected and bounded respectively, the others keep their share."""
    images, global_state, valid = setting
    claims = {0: 100.0, 1: 100.0, 2: 300.0, 3: 1e11, 4: 1e308, 5: 1e308}
    got, record = aggregate("fedavg", images, global_state,
                            [reply(c, valid[c], {"num-examples": n}) for c, n in claims.items()])
    assert set(record.rejected) == {4, 5} and record.bounded_claims == {3: 1e11}
    bound = MAX_CLAIM_RATIO * float(np.median([100.0, 100.0, 300.0, 1e11]))  # 10 x 200
    weights = np.array([100.0, 100.0, 300.0, bound])
    expected = sum(w * valid[c]["fc2.bias"].astype(np.float64) for c, w in enumerate(weights))
    np.testing.assert_allclose(got["fc2.bias"], expected / weights.sum(), rtol=1e-6)
    assert np.isfinite(got["fc2.bias"]).all()
    assert dataclasses.asdict(record)["bounded_claims"] == {3: 1e11}


def test_an_npy_header_claiming_a_huge_array_is_rejected_before_it_is_allocated(setting):
    images, global_state, valid = setting
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (2**20, 2**20)})  # 4 TiB
    target = valid[0]["fc2.bias"]
    bomb = Array(dtype="float32", shape=target.shape, stype="numpy.ndarray",
                 data=header.getvalue())  # the magic string, version 1.0, header; no data
    _, record = aggregate("fedavg", images, global_state,
                          [raw_reply(0, {**arrays_of(valid[0]), "fc2.bias": bomb},
                                     {"num-examples": 100}),
                           reply(1, valid[1], {"num-examples": 100})])
    assert record.kept == [1] and "decodes to float32[1048576, 1048576]" in record.rejected[0]

