"""The ClientApp handlers on a simulated node: train and evaluate on the node's partition."""

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client_app.app import evaluate, node_partition, ray_node, train
from task.config import RunConfig
from task.models import build_model
from tests.helpers import act_as_serverapp


def _context(node_config):
    run_config = {**RunConfig().to_run_config(), "local-epochs": 1}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config=run_config)


def _instruction(message_type):
    act_as_serverapp()
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model("cnn", 1, 10, 28).state_dict())
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
    return Message(content, dst_node_id=7, message_type=message_type), arrays


def test_train_returns_a_trained_model_with_its_sample_count():
    msg, sent = _instruction("train")
    out = train(msg, _context({"partition-id": 3, "num-partitions": 24}))
    received = out.content["arrays"]
    assert list(received.keys()) == list(sent.keys())
    assert not np.array_equal(received["fc2.weight"].numpy(), sent["fc2.weight"].numpy())
    metrics = out.content["metrics"]
    assert metrics["num-examples"] in (333, 334) and metrics["train-loss"] < 2.3


def test_evaluate_reports_loss_and_accuracy_on_the_partition():
    msg, _ = _instruction("evaluate")
    metrics = evaluate(msg, _context({"partition-id": 0, "num-partitions": 24})).content["metrics"]
    assert 0.0 <= metrics["eval-acc"] <= 1.0 and metrics["eval-loss"] > 0
    assert metrics["num-examples"] in (333, 334)


def test_missing_node_config_is_named():
    with pytest.raises(ValueError, match="partition-id"):
        node_partition(_context({"num-partitions": 2}))
    for bad in ("x", 1.7, True):  # named, not read as another number
        with pytest.raises(ValueError, match=rf"node config partition-id={bad!r} is not an integer"):
            node_partition(_context({"partition-id": bad, "num-partitions": 2}))
    assert node_partition(_context({"partition-id": "1", "num-partitions": 2})) == (1, 2)
    with pytest.raises(ValueError, match="outside"):
        node_partition(_context({"partition-id": 2, "num-partitions": 2}))


def test_sign_flip_attacker_uploads_its_honest_update_reversed():
    msg, sent = _instruction("train")
    benign = train(msg, _context({"partition-id": 3, "num-partitions": 24})).content["arrays"]
    context = _context({"partition-id": 3, "num-partitions": 24, "role": "attacker"})
    context.run_config.update({"attack": "sign-flip", "num-attackers": 1})
    flipped = train(msg, context).content["arrays"]
    for key in sent.keys():
        w, honest, upload = (r[key].numpy().astype(np.float64) for r in (sent, benign, flipped))
        np.testing.assert_allclose(upload - w, -(honest - w), atol=1e-6)
        assert np.abs(honest - w).max() > 0 or key.endswith("bias")


def test_the_ray_node_is_named_only_inside_an_initialised_ray(monkeypatch):
    """Outside Ray (a deployment's ClientApp process, which never imports it) there is none."""
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert ray_node() is None and "ray" not in sys.modules  # nor does it import Ray
    idle = SimpleNamespace(is_initialized=lambda: False)
    monkeypatch.setitem(sys.modules, "ray", idle)
    assert ray_node() is None
    context = SimpleNamespace(get_node_id=lambda: "ab" * 28)
    worker = SimpleNamespace(is_initialized=lambda: True, get_runtime_context=lambda: context)
    monkeypatch.setitem(sys.modules, "ray", worker)
    assert ray_node() == "ab" * 28
