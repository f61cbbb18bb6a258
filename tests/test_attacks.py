"""Each attack's defining property, the registry, and the attacker ClientApp path."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from attacks import ATTACKS, AttackInput, build_attack
from attacks.classic import GaussianNoise, LabelFlip, SignFlip, UniformNoise
from client_app.app import is_attacker, train
from task.config import ConfigError, RunConfig
from task.data import load_federated_data
from task.models import build_model
from task.train import evaluate, load_numpy_state
from tests.helpers import act_as_serverapp


def _states(seed=0):
    rng = np.random.default_rng(seed)
    global_state = {"w": rng.normal(size=(50, 40)).astype(np.float32),
                    "b": rng.normal(size=40).astype(np.float32), "n": np.array(7, dtype=np.int64)}
    own = {k: (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v + 3
           for k, v in global_state.items()}
    return global_state, own, rng


def test_sign_flip_negates_and_scales_the_update():
    g, own, rng = _states()
    out = SignFlip(scale=2.0).craft(AttackInput(g, own, rng))
    np.testing.assert_allclose(out["w"] - g["w"], -2.0 * (own["w"] - g["w"]), rtol=1e-5, atol=1e-6)
    assert out["n"] == own["n"] and out["w"].dtype == np.float32


def test_gaussian_noise_has_the_configured_spread():
    g, own, rng = _states()
    out = GaussianNoise(sigma=0.5).craft(AttackInput(g, own, rng))
    noise = out["w"] - own["w"]
    assert abs(noise.mean()) < 0.05 and noise.std() == pytest.approx(0.5, rel=0.05)
    assert out["n"] == own["n"]


def test_uniform_noise_stays_within_its_scale_and_fills_it():
    g, own, rng = _states()
    noise = UniformNoise(scale=0.3).craft(AttackInput(g, own, rng))["w"] - own["w"]
    assert np.abs(noise).max() <= 0.3 + 1e-6 and np.abs(noise).max() > 0.29
    assert noise.std() == pytest.approx(0.3 / np.sqrt(3), rel=0.05)  # U(-a, a): std a / sqrt(3)


def test_same_seed_same_output():
    g, own, _ = _states()
    a = GaussianNoise().craft(AttackInput(g, own, np.random.default_rng(3)))
    b = GaussianNoise().craft(AttackInput(g, own, np.random.default_rng(3)))
    assert np.array_equal(a["w"], b["w"])


def test_label_flip_maps_each_class_to_its_mirror():
    labels = np.arange(10)
    assert LabelFlip().flip_labels(labels, 10).tolist() == list(range(9, -1, -1))


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_registered_attack_builds_by_name(name):
    assert build_attack(RunConfig(attack=name), build_model("cnn", 1, 10, 28)).name == name


def _context(node_config, **run_config):
    config = {**RunConfig().to_run_config(), "local-epochs": 2, **run_config}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=config)


def test_roles_from_node_config_or_the_last_partitions():
    assert is_attacker(_context({"partition-id": 0, "num-partitions": 4, "role": "attacker"}), 0)
    assert not is_attacker(_context({"partition-id": 3, "num-partitions": 4, "role": "benign"}), 1)
    assert is_attacker(_context({"partition-id": 3, "num-partitions": 4}), 1)
    assert not is_attacker(_context({"partition-id": 2, "num-partitions": 4}), 1)
    with pytest.raises(ValueError, match="role"):
        is_attacker(_context({"partition-id": 0, "num-partitions": 4, "role": "spy"}), 0)


def test_label_flip_attacker_trains_on_flipped_labels_and_reports_ground_truth():
    act_as_serverapp()
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model("cnn", 1, 10, 28).state_dict())
    msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=7, message_type="train")
    out = train(msg, _context({"partition-id": 1, "num-partitions": 4, "role": "attacker"},
                              attack="label-flip", **{"num-attackers": 1}))
    assert out.content["metrics"]["attacker"] == 1.0
    model = build_model("cnn", 1, 10, 28)
    load_numpy_state(model, {k: v.numpy() for k, v in out.content["arrays"].items()})
    test = load_federated_data("mnist-embedded", RunConfig().seed).test
    flipped = type(test)(test.images, 9 - test.labels, 10, test.mean, test.std)
    _, true_accuracy = evaluate(model, test, torch.device("cpu"))
    _, flipped_accuracy = evaluate(model, flipped, torch.device("cpu"))
    assert flipped_accuracy > 0.6 > 0.2 > true_accuracy


def test_an_attacker_with_an_unknown_attack_fails_naming_the_key():
    """The server's harness imports no attack: an unknown ``attack`` is refused where attacks
    run, and the server records the attacker's error reply with this reason."""
    act_as_serverapp()
    arrays = ArrayRecord(build_model("cnn", 1, 10, 28).state_dict())
    msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=7, message_type="train")
    context = _context({"partition-id": 1, "num-partitions": 4, "role": "attacker"},
                       attack="magic", **{"num-attackers": 1})
    with pytest.raises(ConfigError, match=r"attack='magic' is not one of \[.*'gae'"):
        train(msg, context)
