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
from strategies.records import ClientUpload
from strategies.validation import (MAX_COUNT_STEP, MAX_EXAMPLES, MAX_WEIGHT_SHARE, bound_claims,
                                   claim_bound)
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
    return {k: Array(np.asarray(v, order="C")) for k, v in state.items()}


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


def test_only_the_superlink_says_a_node_dropped_out(setting):
    """The SuperLink's own "node unavailable" reply marks a dropout (missing, nothing
    rejected); a node that sends that code itself has sent a client error (rejected)."""
    from flwr.common.constant import ErrorCode
    from flwr.server.superlink.linkstate.utils import (
        create_message_error_unavailable_res_message)

    images, global_state, valid = setting
    act_as_serverapp()
    to_node_3 = Message(RecordDict(), dst_node_id=3, message_type="train")
    gone = create_message_error_unavailable_res_message(to_node_3.metadata, "node_unavail")
    feigned = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="not me"),
                      reply_to=Message(RecordDict(), dst_node_id=4, message_type="train"))
    _, record = aggregate("fedavg", images, global_state,
                          [reply(1, valid[0], {"num-examples": 10}),
                           reply(2, valid[1], {"num-examples": 10}), gone, feigned])
    assert record.kept == [1, 2]
    assert record.rejected == {4: "client error: not me"}


def test_a_rejection_records_one_bounded_line_of_what_the_client_sent(setting):
    """A client error's reason is the client's text (a ClientApp's whole traceback, colour
    codes and all, or whatever an attacker chooses): the record keeps its last line, cleaned
    and cut; the same for the screening's reasons, which quote the client's array names."""
    from strategies.validation import MAX_REASON_CHARS

    images, global_state, valid = setting
    act_as_serverapp()
    traceback = ("Traceback (most recent call last):\n  \x1b[36mray::ClientAppActor.run()\x1b[39m"
                 "\n    raise ClientAppException(str(ex))\nException occurred. Message: attack='x'\n")
    errors = [Message(Error(code=0, reason=text),
                      reply_to=Message(RecordDict(), dst_node_id=node, message_type="train"))
              for node, text in ((3, traceback), (4, "\x07" * 10 + "y" * 10**6),
                                 (6, "\x1b]0;a title\x07ok \u202etxt.exe\u202c"))]
    named = dict(valid[0]) | {"z" * 10**5: np.zeros(1, dtype=np.float32)}
    _, record = aggregate("fedavg", images, global_state,
                          [reply(1, valid[0], {"num-examples": 10}),
                           reply(2, valid[1], {"num-examples": 10}), *errors,
                           reply(5, named, {"num-examples": 10})])
    assert record.kept == [1, 2]
    assert record.rejected[3] == "client error: Exception occurred. Message: attack='x'"
    assert record.rejected[4] == ("client error: " + "y" * 10**6)[:MAX_REASON_CHARS - 1] + "…"
    assert len(record.rejected[4]) == MAX_REASON_CHARS
    assert record.rejected[6] == "client error: ok txt.exe"  # no title escape, no bidi override
    assert len(record.rejected[5]) <= MAX_REASON_CHARS and "zzz" in record.rejected[5]


@pytest.mark.parametrize("text, last_line, expected", [
    ("Traceback\n\x1b]0;title\nValueError: important", True, "ValueError: important"),
    ("\x1b(Bok \x1b7x\x1b8 \x9b31mred \x1bcdone", True, "ok x red done"),
    ("key:\tvalue", True, "key: value"),
    ("shown\rwritten over", True, "written over"),
    ("header bad\nhint: see docs", False, "header bad hint: see docs"),
    ("\n\n", True, ""),
])
def test_a_reason_is_one_clean_line(text, last_line, expected):
    from strategies.validation import reason_line

    assert reason_line(text, last_line=last_line) == expected


def test_a_decision_that_fails_keeps_the_previous_model_and_the_server_running(setting):
    """Uploads that pass the screening but make a rule raise (a case it does not handle) cost
    the round, recorded with the error, not the ServerApp."""
    data, global_state, valid = setting
    strategy = make_defense("median", data)
    strategy.global_state = global_state

    def fails(server_round, uploads):
        raise FloatingPointError("a case the rule does not handle")

    strategy.detect = fails
    arrays, _ = strategy.aggregate_train(1, [reply(i + 1, v, {"num-examples": 10})
                                             for i, v in enumerate(valid)])
    record = strategy.last_record
    assert arrays is None and not record.aggregated and record.kept == []
    assert "the decision failed: FloatingPointError: a case the rule does not handle" in record.note
    assert record.excluded == list(range(1, VALID + 1))


def test_a_huge_claim_is_rejected_and_a_large_one_carries_at_most_twice_the_fair_share(setting):
    """Two clients claiming 1e308 would overflow the weight sum (rejected); one claiming 1e11
    would take nearly all the weight: it is counted as the t with t / (t + 500) = 2 / 4."""
    images, global_state, valid = setting
    claims = {0: 100.0, 1: 100.0, 2: 300.0, 3: 1e11, 4: 1e308, 5: 1e308}
    got, record = aggregate("fedavg", images, global_state,
                            [reply(c, valid[c], {"num-examples": n}) for c, n in claims.items()])
    assert set(record.rejected) == {4, 5} and record.bounded_claims == {3: 1e11}
    weights = np.array([100.0, 100.0, 300.0, 500.0])  # 500 / 1000 = 2 / K, K = 4
    expected = sum(w * valid[c]["fc2.bias"].astype(np.float64) for c, w in enumerate(weights))
    np.testing.assert_allclose(got["fc2.bias"], expected / weights.sum(), rtol=1e-6)
    assert np.isfinite(got["fc2.bias"]).all()
    assert dataclasses.asdict(record)["bounded_claims"] == {3: 1e11}


@pytest.mark.parametrize("clients", [8, 24])
def test_one_liar_among_honest_clients_gets_twice_the_fair_share_at_most(clients):
    """A liar claiming 1e11 among honest clients of 300-400 examples: FedAvg gives it 2/K of
    the weight (with the previous bound, 10x the median, it got 59% among 8), and the honest
    clients keep their proportions."""
    rng = np.random.default_rng(clients)
    honest = rng.integers(300, 400, clients - 1).astype(float)
    uploads = [ClientUpload(c, {}, n) for c, n in enumerate(honest)]
    uploads.append(ClientUpload(clients - 1, {}, 1e11))
    bounded, original = bound_claims(uploads)
    weights = np.array([u.num_examples for u in bounded])
    share = weights / weights.sum()
    assert original == {clients - 1: 1e11}
    assert share[-1] == pytest.approx(MAX_WEIGHT_SHARE / clients)
    np.testing.assert_allclose(weights[:-1], honest)  # honest claims untouched
    assert share[:-1].max() < MAX_WEIGHT_SHARE / clients


def test_the_claim_bound_holds_among_the_uploads_a_defense_keeps(setting):
    """Honest claims of 1,000 (nodes 0-2) and 100 (3-6), a liar claiming 1e11: cut among all 8
    it counts as 1,133. The defense excludes nodes 0-2; among the 5 kept, 1,133 would carry 74%
    of the aggregate, so it is cut again, to 266.7: 2/5."""
    from strategies.base import DetectingFedAvg
    from strategies.records import Detection

    class ExcludesThree(DetectingFedAvg):
        def detect(self, server_round, uploads):
            return Detection(kept=[u.node_id for u in uploads if u.node_id not in (0, 1, 2)])

    images, global_state, valid = setting
    strategy = ExcludesThree()
    strategy.global_state = global_state
    claims = [1000.0, 1000.0, 1000.0, 100.0, 100.0, 100.0, 100.0]
    replies = [reply(c, valid[c], {"num-examples": n}) for c, n in enumerate(claims)]
    replies.append(reply(7, valid[0], {"num-examples": 1e11}))
    arrays, _ = strategy.aggregate_train(1, replies)
    weights = {3: 100.0, 4: 100.0, 5: 100.0, 6: 100.0, 7: 0.4 * 400 / 0.6}
    assert weights[7] / sum(weights.values()) == pytest.approx(2 / 5)
    expected = sum(w * valid[0 if c == 7 else c]["fc2.bias"].astype(np.float64)
                   for c, w in weights.items()) / sum(weights.values())
    np.testing.assert_allclose(arrays["fc2.bias"].numpy(), expected, rtol=1e-5)
    assert strategy.last_record.bounded_claims == {7: 1e11}


def test_the_claim_bound_is_the_largest_cut_that_keeps_every_share_within_2_over_k():
    """Against a brute-force search over cuts, on claims with several large ones."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(3, 12))
        claims = list(rng.lognormal(5, 2, k))
        bound = claim_bound(claims)
        cut = np.minimum(claims, bound)
        assert (cut / cut.sum()).max() <= MAX_WEIGHT_SHARE / k + 1e-9
        if np.isfinite(bound):  # any larger cut gives some claim more than 2/K
            larger = np.minimum(claims, bound * 1.001)
            assert (larger / larger.sum()).max() > MAX_WEIGHT_SHARE / k
        else:
            assert max(claims) / sum(claims) <= MAX_WEIGHT_SHARE / k


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



# BatchNorm uploads: buffers are data too

@pytest.fixture(scope="module")
def bn_setting():
    """The CNN with BatchNorm after each convolution (FAA-DL's Fashion-MNIST variant), made
    selectable as ``model = "cnn-bn"`` for these tests, and valid uploads of it."""
    from task.models import MODELS, FaaDlCnn, ModelSpec

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(MODELS, "cnn-bn", ModelSpec(
            lambda c, n, s: FaaDlCnn(c, n, s, batch_norm=True), "conv2"))
        torch.manual_seed(0)
        data = load_federated_data("mnist-embedded", 0)
        global_state = state_to_numpy(build_model("cnn-bn", 1, 10, 28))
        rng = np.random.default_rng(0)
        valid = [{k: (v + np.abs(rng.normal(0, 0.01, v.shape))).astype(v.dtype)
                  if v.dtype.kind == "f" else v + 3 for k, v in global_state.items()}
                 for _ in range(VALID)]
        yield data, global_state, valid


class SilentClients:
    """FAA-DL's channel to its suspects, with no client answering (each suspect is verified)."""

    def ask(self, message_type, server_round, requests, timeout):
        return {}


def bn_aggregate(name, data, global_state, replies):
    config = RunConfig(defense=name, model="cnn-bn", num_clients=VALID, num_attackers=1,
                       krum_f=1, min_replies=1)
    assets = dataclasses.replace(server_assets(config, data.test), queries=SilentClients())
    strategy = build_defense(config, assets)
    strategy.global_state = global_state
    arrays, _ = strategy.aggregate_train(1, replies)
    return (None if arrays is None else {k: v.numpy() for k, v in arrays.items()}), strategy.last_record


BUFFERS = ("bn1.running_mean", "bn1.running_var", "bn2.running_var", "bn1.num_batches_tracked")


def broken_buffer(state: dict[str, np.ndarray], draw) -> dict[str, np.ndarray]:
    """``state`` with one buffer that cannot be: NaN/Inf, a negative variance or count, an
    integer past 2^53."""
    name = draw(st.sampled_from(BUFFERS))
    bad = {k: v.copy() for k, v in state.items()}
    if name.endswith("num_batches_tracked"):
        bad[name] = np.array(draw(st.sampled_from([-1, -(2**62), 2**53 + 1, 2**63 - 1])),
                             dtype=np.int64)
    elif name.endswith("running_var"):
        bad[name].flat[draw(st.integers(0, bad[name].size - 1))] = draw(st.sampled_from(
            [-100.0, -1e-6, np.nan, np.inf, -np.inf]))
    else:
        bad[name].flat[0] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return bad


@pytest.mark.parametrize("defense", DEFENSES.names())
@settings(max_examples=3, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_impossible_buffers_are_rejected_and_change_nothing(defense, bn_setting, data):
    images, global_state, valid = bn_setting
    count = data.draw(st.integers(1, 3), label="broken uploads")
    bad = [reply(100 + i, broken_buffer(valid[i], data.draw), {"num-examples": 100})
           for i in range(count)]
    good = [reply(c, state, {"num-examples": 100 + c}) for c, state in enumerate(valid)]
    expected, clean_record = bn_aggregate(defense, images, global_state, good)
    got, record = bn_aggregate(defense, images, global_state, good + bad)

    assert set(record.rejected) == {100 + i for i in range(count)}, record.rejected
    assert all("NaN or Inf" in r or "negative" in r or "2^53" in r
               for r in record.rejected.values()), record.rejected
    assert record.kept == clean_record.kept and record.excluded == clean_record.excluded
    assert got is not None and all(np.array_equal(got[k], expected[k]) for k in expected)
    assert got["bn1.num_batches_tracked"].shape == ()  # 0-d buffers stay 0-d


def extreme_buffers(state: dict[str, np.ndarray], draw) -> dict[str, np.ndarray]:
    """``state`` with buffers at the edge of what they can be: zero variances, large means,
    a count of 2^53, or every weight scaled up (the model's outputs may overflow)."""
    out = {k: v.copy() for k, v in state.items()}
    kind = draw(st.sampled_from(["zero variance", "large mean", "huge count", "scaled"]))
    if kind == "zero variance":
        out["bn1.running_var"][:] = 0.0
        out["bn2.running_var"][:] = 0.0
    elif kind == "large mean":
        out["bn2.running_mean"][:] = draw(st.sampled_from([-30.0, 30.0]))
    elif kind == "huge count":
        out["bn2.num_batches_tracked"] = np.array(2**53, dtype=np.int64)
    else:
        factor = draw(st.sampled_from([50.0, 400.0]))
        for name in ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"):
            out[name] = out[name] * np.float32(factor)
        out["bn1.running_var"][:] = 1e-12
        out["bn2.running_var"][:] = 1e-12
    return out


@pytest.mark.parametrize("defense", DEFENSES.names())
@settings(max_examples=3, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_extreme_but_possible_buffers_leave_everything_finite(defense, bn_setting, data):
    """Every defense decides, nothing raises, and no NaN/Inf reaches a score, the record or the
    model; an upload that a defense cannot use is rejected with the reason."""
    import json

    images, global_state, valid = bn_setting
    count = data.draw(st.integers(1, 2), label="extreme uploads")
    extreme = [reply(100 + i, extreme_buffers(valid[i], data.draw), {"num-examples": 100})
               for i in range(count)]
    good = [reply(c, state, {"num-examples": 100 + c}) for c, state in enumerate(valid)]
    got, record = bn_aggregate(defense, images, global_state, good + extreme)

    assert got is not None
    assert all(np.isfinite(v).all() for v in got.values() if v.dtype.kind == "f")
    assert (got["bn1.running_var"] >= 0).all() and (got["bn2.running_var"] >= 0).all()
    assert all(np.isfinite(s) for s in (record.scores or {}).values()), record.scores
    json.dumps(record.to_json(), allow_nan=False)  # nothing non-finite in the record
    assert set(record.received) == set(range(VALID)) | {100 + i for i in range(count)}
    assert all(isinstance(r, str) and r for r in record.rejected.values())


@pytest.mark.parametrize("defense", DEFENSES.names())
def test_a_minority_cannot_move_the_global_batch_count(defense, bn_setting):
    """Uploads whose lie is mostly ``num_batches_tracked``, as far past the global count as the
    screening lets a count move in a round (their float arrays honest, a little apart from the
    others', so no view need see them, and Krum may keep one), leave the global count where
    the honest clients put it. Averaged, such counts crept to the screening's cap of 2^53, and
    then every honest upload (the count plus its own batches) was rejected for good."""
    images, global_state, valid = bn_setting
    rng = np.random.default_rng(1)
    liars = [reply(100 + i, {**{k: (v + rng.normal(0, 1e-3, v.shape)).astype(v.dtype)
                                if v.dtype.kind == "f" and "running_var" not in k else v
                                for k, v in valid[i].items()},
                             **{k: global_state[k] + MAX_COUNT_STEP
                                for k in ("bn1.num_batches_tracked", "bn2.num_batches_tracked")}},
                   {"num-examples": 100}) for i in range(2)]
    good = [reply(c, state, {"num-examples": 100 + c}) for c, state in enumerate(valid)]
    got, record = bn_aggregate(defense, images, global_state, good + liars)

    assert not record.rejected and got is not None
    for name in ("bn1.num_batches_tracked", "bn2.num_batches_tracked"):
        assert got[name] == global_state[name] + 3, (name, got[name])  # each honest client: +3
        assert got[name].shape == () and got[name].dtype == np.int64


def test_a_count_moves_one_round_of_batches_at_most_and_a_liar_majority_locks_nothing():
    """A count further than ``MAX_COUNT_STEP`` from the global's is rejected; liars at that step
    who are the majority of one round move the global count by it, and honest uploads of the
    next round (that count plus their batches) are accepted."""
    from strategies.base import DetectingFedAvg

    rng = np.random.default_rng(0)
    state = {"bn.weight": np.ones(4, np.float32), "bn.num_batches_tracked": np.array(0, np.int64)}

    def round_of(liars: int, step: int):
        strategy = DetectingFedAvg()
        strategy.global_state = state
        replies = [reply(c + 1, {
            "bn.weight": (state["bn.weight"] + rng.normal(0, 1e-3, 4)).astype(np.float32),
            "bn.num_batches_tracked": state["bn.num_batches_tracked"] + (step if c < liars else 20)},
            {"num-examples": 600}) for c in range(5)]
        arrays, _ = strategy.aggregate_train(1, replies)
        return {k: v.numpy() for k, v in arrays.items()}, strategy.last_record

    _, record = round_of(1, MAX_COUNT_STEP + 1)
    assert list(record.rejected) == [1] and "moves" in record.rejected[1]
    state, record = round_of(3, MAX_COUNT_STEP)  # liars are three of five
    assert not record.rejected and state["bn.num_batches_tracked"] == MAX_COUNT_STEP
    state, record = round_of(0, 0)
    assert not record.rejected and state["bn.num_batches_tracked"] == MAX_COUNT_STEP + 20


def test_the_norm_check_is_float64_exact_past_float32s_range():
    """The norm check's step is summed in float32, and again in float64 where float32
    overflows: an upload of a float32 model whose step is beyond 1.8e19 (its square past
    float32's range) but inside the bound is kept, one beyond the bound is rejected."""
    from strategies.validation import screen_replies, squared_step

    rng = np.random.default_rng(0)
    small = rng.normal(0, 1, 1000).astype(np.float32)
    assert squared_step(small + 1, small) == pytest.approx(1000.0, rel=1e-6)
    half = np.float16(60000.0) * np.ones(100, np.float16)  # float16 squares would overflow
    assert squared_step(half, -half) == pytest.approx(100 * 120000.0 ** 2, rel=1e-6)
    global_state = {"w": np.full(4, 1e18, np.float32)}
    inside = {"w": np.full(4, 2e19, np.float32)}  # step 3.8e19 against a bound of 2e21
    outside = {"w": np.full(4, 3e21, np.float32)}
    uploads, rejected, _ = screen_replies(
        [reply(1, inside, {"num-examples": 10}), reply(2, outside, {"num-examples": 10})],
        global_state, "num-examples")
    assert [u.node_id for u in uploads] == [1]
    assert "exceeds" in rejected[2] and "inf" not in rejected[2]
