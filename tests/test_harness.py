"""The experiment harness's Grid between real ClientApp handlers and a strategy: ground truth
reaches the metrics and nothing else, and an eavesdropping attacker's reply looks benign; and
how the ServerApp waits for its SuperNodes."""

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from server_app.eavesdrop import (ATTACK_MESSAGE, EavesdroppingGrid, claimed_size,
                                  serves_benign_uploads)
from strategies.base import DetectingFedAvg
from task.config import ConfigError, RunConfig
from task.models import build_model
from task.reply import HARNESS_METRICS, RAY_NODE, RUNTIME
from tests.helpers import act_as_serverapp
from tests.local_grid import LocalGrid

NODES = (1, 2, 3, 4)


def handler_grid(attack: str) -> LocalGrid:
    """Nodes 1-3 benign, node 4 the attacker, on small partitions (1/24 of the data each)."""
    run_config = {**RunConfig().to_run_config(), "local-epochs": 1, "num-clients": 4,
                  "num-attackers": 1, "attack": attack}
    return LocalGrid(run_config, len(NODES), 1, num_partitions=24)


class SpyFedAvg(DetectingFedAvg):
    """FedAvg that remembers every metric key its detection step could read."""

    seen_keys: set[str] = set()

    def detect(self, server_round, uploads):
        for upload in uploads:
            self.seen_keys |= set(upload.metrics)
        return super().detect(server_round, uploads)


@pytest.fixture(scope="module", params=["undo-update", "sign-flip"])
def harness_round(request):
    act_as_serverapp()
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model("cnn", 1, 10, 28).state_dict())
    inner = handler_grid(request.param)
    grid = EavesdroppingGrid(inner, serve_benign=True)
    messages = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                        dst_node_id=node, message_type="train", group_id="1") for node in NODES]
    replies = list(grid.send_and_receive(messages))
    return request.param, grid, replies, arrays


def test_ground_truth_reaches_the_harness_only(harness_round):
    attack, grid, replies, arrays = harness_round
    assert grid.truth == {1: False, 2: False, 3: False, 4: True}
    for reply in replies:
        for record in reply.content.metric_records.values():
            assert not set(HARNESS_METRICS) & set(record), (attack, dict(record))
    strategy = SpyFedAvg()
    strategy.global_state = {k: v.numpy() for k, v in arrays.items()}
    _, metrics = strategy.aggregate_train(1, replies)
    assert strategy.seen_keys == {"train-loss", "num-examples"}
    assert not set(HARNESS_METRICS) & set(metrics)


def test_attacker_reply_has_the_fields_of_a_benign_reply(harness_round):
    attack, _, replies, arrays = harness_round
    by_node = {r.metadata.src_node_id: r for r in replies}
    assert sorted(by_node) == [1, 2, 3, 4]
    benign_keys = {tuple(sorted(by_node[n].content["metrics"])) for n in (1, 2, 3)}
    assert benign_keys == {tuple(sorted(by_node[4].content["metrics"]))}
    for key, value in by_node[1].content["metrics"].items():  # and of their types
        assert type(by_node[4].content["metrics"][key]) is type(value), key
    assert set(by_node[4].content.array_records) == set(by_node[1].content.array_records)
    attacker = by_node[4].content["arrays"]
    assert not all(np.array_equal(attacker[k].numpy(), arrays[k].numpy()) for k in arrays.keys())
    if attack == "undo-update":  # eavesdropping: claims the benign median size and loss
        metrics = [by_node[n].content["metrics"] for n in (1, 2, 3)]
        assert by_node[4].content["metrics"]["train-loss"] == pytest.approx(
            np.median([m["train-loss"] for m in metrics]))
        assert by_node[4].content["metrics"]["num-examples"] == pytest.approx(
            np.median([m["num-examples"] for m in metrics]))


def test_an_eavesdropper_claims_a_whole_number_of_examples():
    assert claimed_size([600, 601]) == 600 and type(claimed_size([600, 601])) is int
    assert claimed_size([600, 603]) == 602 and claimed_size([5.0, 7.0, 9.0]) == 7
    assert claimed_size([]) == 1


def test_benign_uploads_are_served_only_with_attackers_and_in_simulation_or_by_opt_in():
    assert serves_benign_uploads(3, simulated=True, in_deployment=False)
    assert serves_benign_uploads(3, simulated=False, in_deployment=True)
    assert not serves_benign_uploads(3, simulated=False, in_deployment=False)
    assert not serves_benign_uploads(0, simulated=True, in_deployment=True)


def test_a_node_asking_for_benign_uploads_gets_nothing_when_none_are_served():
    """A node that says ``awaits-benign`` in a run that serves no benign uploads (a deployment,
    or an attack that needs none) is sent nothing, and its reply goes on as it sent it."""
    act_as_serverapp()
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model("cnn", 1, 10, 28).state_dict())
    inner = handler_grid("undo-update")  # node 4 asks for the benign uploads
    grid = EavesdroppingGrid(inner, serve_benign=False)
    messages = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                        dst_node_id=node, message_type="train", group_id="1") for node in NODES]
    replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(messages)}
    assert inner.sent == ["train"] * len(NODES)  # no train.attack message went out
    asked = replies[4].content
    assert all(np.array_equal(asked["arrays"][k].numpy(), arrays[k].numpy()) for k in arrays.keys())
    assert not set(HARNESS_METRICS) & set(asked["metrics"])
    assert grid.truth == {1: False, 2: False, 3: False, 4: True}


class AskingBenignNode(LocalGrid):
    """Node 2 is benign but its reply asks for the benign uploads, as a modified client could."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            if reply.metadata.src_node_id == 2 and reply.has_content():
                reply.content["metrics"]["awaits-benign"] = 1.0
        return replies


def test_a_node_that_is_no_configured_attacker_gets_nothing_when_it_asks():
    act_as_serverapp()
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model("cnn", 1, 10, 28).state_dict())
    run_config = {**RunConfig().to_run_config(), "local-epochs": 1, "num-clients": 4,
                  "num-attackers": 1, "attack": "undo-update"}
    inner = AskingBenignNode(run_config, len(NODES), 1, num_partitions=24)
    grid = EavesdroppingGrid(inner, serve_benign=True)
    messages = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                        dst_node_id=node, message_type="train", group_id="1") for node in NODES]
    replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(messages)}
    assert inner.sent == ["train"] * len(NODES) + [ATTACK_MESSAGE]  # to the attacker alone
    assert not set(HARNESS_METRICS) & set(replies[2].content["metrics"])  # passed on as sent
    trained = replies[2].content["arrays"]
    assert any(not np.array_equal(trained[k].numpy(), arrays[k].numpy()) for k in arrays.keys())


class LyingBenignNodes(LocalGrid):
    """Benign nodes 1 and 2 reply with claims a modified client could send: a list for
    ``num-examples``, and bytes that decode to nothing."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            if reply.metadata.message_type != "train" or not reply.has_content():
                continue
            if reply.metadata.src_node_id == 1:
                reply.content["metrics"]["num-examples"] = [1, 2]
            if reply.metadata.src_node_id == 2:
                name = next(iter(reply.content["arrays"].keys()))
                reply.content["arrays"][name].data = b"not npy"
        return replies


def test_malformed_benign_replies_are_not_served_to_attackers_and_break_nothing():
    """The eavesdropping channel forwards only well-formed benign uploads; the malformed ones
    go on to the strategy as sent, whose screening rejects them."""
    act_as_serverapp()
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model("cnn", 1, 10, 28).state_dict())
    nodes = (1, 2, 3, 4, 5)  # 5 attacks, with the uploads of 3 and 4 (it needs two)
    run_config = {**RunConfig().to_run_config(), "local-epochs": 1, "num-clients": 5,
                  "num-attackers": 1, "attack": "undo-update"}
    inner = LyingBenignNodes(run_config, len(nodes), 1, num_partitions=24)
    forwarded = []
    inner_send = inner.send_and_receive

    def spy(messages, *, timeout=None):
        messages = list(messages)
        forwarded.extend(m.content["config"]["num-benign"] for m in messages
                         if m.metadata.message_type == ATTACK_MESSAGE)
        return inner_send(messages, timeout=timeout)

    inner.send_and_receive = spy
    grid = EavesdroppingGrid(inner, serve_benign=True)
    messages = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                        dst_node_id=node, message_type="train", group_id="1") for node in nodes]
    replies = list(grid.send_and_receive(messages))
    assert forwarded == [2]  # the uploads of 3 and 4
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3, 4, 5]
    strategy = DetectingFedAvg()
    strategy.global_state = {k: v.numpy() for k, v in arrays.items()}
    strategy.aggregate_train(1, replies)
    assert sorted(strategy.last_record.rejected) == [1, 2]
    assert sorted(strategy.last_record.kept) == [3, 4, 5]


class FakeRay:
    """What ``client_app.app.ray_node`` asks of Ray in a Ray worker: every reply names ``node``."""

    def __init__(self, node: str) -> None:
        self.node = node

    def is_initialized(self) -> bool:
        return True

    def get_runtime_context(self):
        return SimpleNamespace(get_node_id=lambda: self.node)


class ForgedRayNodes(LocalGrid):
    """Nodes 1-3 name their Ray node as a modified client could: no id, a number, a long one."""

    FORGED = {1: "../../etc/passwd", 2: 7, 3: "ab" * 100}

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            if reply.has_content() and reply.metadata.src_node_id in self.FORGED:
                reply.content[RUNTIME] = ConfigRecord(
                    {RAY_NODE: self.FORGED[reply.metadata.src_node_id]})
        return replies


def test_the_ray_node_of_each_reply_reaches_the_harness_only(monkeypatch):
    """On Ray, each training reply names the Ray node that made it (the eavesdropping
    attacker's crafted reply too); the harness keeps the ids that look like one, and every
    reply reaches the strategy without the record, which neither rejects nor sees it."""
    ray_node = "0f" * 28
    monkeypatch.setitem(sys.modules, "ray", FakeRay(ray_node))
    act_as_serverapp()
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model("cnn", 1, 10, 28).state_dict())
    run_config = {**RunConfig().to_run_config(), "local-epochs": 1, "num-clients": 4,
                  "num-attackers": 1, "attack": "undo-update"}  # node 4 eavesdrops
    inner = ForgedRayNodes(run_config, len(NODES), 1, num_partitions=24)
    grid = EavesdroppingGrid(inner, serve_benign=True)
    messages = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                        dst_node_id=node, message_type="train", group_id="1") for node in NODES]
    replies = list(grid.send_and_receive(messages))
    assert inner.sent == ["train"] * len(NODES) + [ATTACK_MESSAGE]
    assert grid.ray_nodes == {4: ray_node}
    assert all(set(r.content.keys()) == {"arrays", "metrics"} for r in replies)
    strategy = DetectingFedAvg()
    strategy.global_state = {k: v.numpy() for k, v in arrays.items()}
    strategy.aggregate_train(1, replies)
    assert strategy.last_record.kept == [1, 2, 3, 4] and not strategy.last_record.rejected


class CountingGrid:
    """A Grid whose connected node count follows ``counts`` poll by poll (then stays)."""

    def __init__(self, counts: list[int]) -> None:
        self.counts, self.polls = counts, 0

    def get_node_ids(self) -> list[int]:
        count = self.counts[min(self.polls, len(self.counts) - 1)]
        self.polls += 1
        return list(range(count))


@pytest.mark.parametrize("counts, polls", [([0, 0, 2, 2], 4), ([0, 2, 2], 3)])
def test_a_simulation_short_of_nodes_stops_once_its_count_is_final(counts, polls):
    from server_app.app import wait_for_nodes

    grid = CountingGrid(counts)
    with pytest.raises(ConfigError, match=r"federation has 2 SuperNode\(s\): pass "
                                          r"--federation-config \"num-supernodes=24"):
        wait_for_nodes(grid, 24, timeout=120, simulated=True, poll=0.001)
    assert grid.polls == polls  # not before two polls agree, not after


def test_a_count_still_growing_is_waited_for_and_a_deployment_waits_its_timeout():
    from server_app.app import wait_for_nodes

    assert wait_for_nodes(CountingGrid([0, 7, 15, 24]), 24, 120, simulated=True, poll=0.001) == 24
    grid = CountingGrid([2])  # SuperNodes may still be starting: the full timeout
    with pytest.raises(ConfigError, match=r"has 2 SuperNode\(s\) after 0 s: start 24 SuperNodes"):
        wait_for_nodes(grid, 24, timeout=0.05, simulated=False, poll=0.001)
    assert grid.polls > 10
