"""Each attack's defining property, the registry, and the attacker ClientApp path."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from attacks import ATTACKS, AttackInput, build_attack
from attacks.classic import GaussianNoise, LabelFlip, SignFlip, UniformNoise
from attacks.model_replacement import ModelReplacement
from client_app.app import attack_with_eavesdropped_uploads, is_attacker, train
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


def _batchnorm_states(seed=0):
    """A state with BatchNorm's buffers beside a weight: small variances, as late in training."""
    rng = np.random.default_rng(seed)
    g = {"conv.weight": rng.normal(size=(8, 3)).astype(np.float32),
         "bn.running_mean": rng.normal(size=8).astype(np.float32),
         "bn.running_var": np.full(8, 1e-3, dtype=np.float32),
         "bn.num_batches_tracked": np.array(40, dtype=np.int64)}
    own = {**{k: (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype) for k, v in g.items()
              if v.dtype.kind == "f"}, "bn.num_batches_tracked": np.array(47, dtype=np.int64)}
    own["bn.running_var"] = np.abs(own["bn.running_var"])
    return g, own, rng


@pytest.mark.parametrize("attack", [GaussianNoise(sigma=0.5), UniformNoise(scale=0.5),
                                    ModelReplacement(boost=24.0), SignFlip(scale=5.0)],
                         ids=lambda a: a.name)
def test_weight_attacks_leave_batchnorm_statistics_and_counters_their_own(attack):
    """Noise, a boost and a flip are meant for the weights: on BatchNorm's running statistics
    they would make a variance negative, which the screening rejects before any defense looks."""
    g, own, rng = _batchnorm_states()
    out = attack.craft(AttackInput(g, own, rng, server_round=1))
    assert not np.allclose(out["conv.weight"], own["conv.weight"], atol=1e-3)
    for name in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert np.array_equal(out[name], own[name]) and out[name].dtype == own[name].dtype, name
    if attack.name in ("model-replacement", "sign-flip"):
        factor = 24.0 if attack.name == "model-replacement" else 5.0
        np.testing.assert_allclose(out["conv.weight"] - g["conv.weight"],
                                   -factor * (own["conv.weight"] - g["conv.weight"]), rtol=1e-4)


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


def _attack_message(global_state, benign, **config):
    """A ``train.attack`` message as the harness sends it."""
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in global_state.items()}),
        "config": ConfigRecord({"server-round": 2, "num-benign": len(benign),
                                "claimed-train-loss": 0.5, "claimed-num-examples": 300,
                                **config}),
        **{f"benign-{i}": ArrayRecord({k: Array(v) for k, v in s.items()})
           for i, s in enumerate(benign)}})
    return Message(content, dst_node_id=7, message_type="train.attack")


def _eavesdropped_round(counts=(47, 48, 47, 46)):
    rng = np.random.default_rng(0)
    global_state = {"w": rng.normal(size=(6, 4)).astype(np.float32),
                    "bn.num_batches_tracked": np.array(40, dtype=np.int64)}
    benign = [{"w": (global_state["w"] + rng.normal(0, 0.1, (6, 4))).astype(np.float32),
               "bn.num_batches_tracked": np.array(c, dtype=np.int64)} for c in counts]
    return global_state, benign


ALIE_ATTACKER = ({"partition-id": 23, "num-partitions": 24}, {"attack": "alie", "num-attackers": 3})


def test_an_eavesdropping_attacker_uploads_the_batch_counters_the_benign_uploads_carry():
    """Each benign client counts its batches into BatchNorm's ``num_batches_tracked``; an
    attacker that crafts from the eavesdropped uploads (and trains nothing) takes their median,
    not the global model's count, which would single out its upload."""
    act_as_serverapp()
    global_state, benign = _eavesdropped_round()
    node, run = ALIE_ATTACKER
    out = attack_with_eavesdropped_uploads(_attack_message(global_state, benign),
                                           _context(node, **run))
    upload = out.content["arrays"]
    assert upload["bn.num_batches_tracked"].numpy() == 47
    assert upload["bn.num_batches_tracked"].numpy().dtype == np.int64
    assert not np.allclose(upload["w"].numpy(), global_state["w"])  # crafted


def test_a_train_attack_message_is_refused_where_it_does_not_fit():
    """Only an attacker whose attack crafts from benign uploads answers one, and a message
    missing a record, a field or an array's shape is named, not met with a KeyError."""
    act_as_serverapp()
    global_state, benign = _eavesdropped_round()
    node, run = ALIE_ATTACKER
    for other_node, other_run, match in (
            ({**node, "role": "benign"}, run, r"attack='alie', role benign"),
            (node, {**run, "attack": "sign-flip"}, r"attack='sign-flip', role attacker")):
        with pytest.raises(ValueError, match="crafts nothing from benign uploads .*" + match):
            attack_with_eavesdropped_uploads(_attack_message(global_state, benign),
                                             _context(other_node, **other_run))
    short = _attack_message(global_state, benign, **{"num-benign": 5})
    wrong = _attack_message(global_state, [*benign[:3], {**benign[3], "w": benign[3]["w"][:5]}])
    sizes = _attack_message(global_state, benign, **{"benign-num-examples": [1.0, 2.0]})
    for msg, match in ((short, r"no 'benign-4' record \(num-benign=5\)"),
                       (wrong, r"'benign-3' does not hold the global model's arrays"),
                       (sizes, r"2 benign-num-examples for 4 benign uploads")):
        with pytest.raises(ValueError, match=match):
            attack_with_eavesdropped_uploads(msg, _context(node, **run))
    bare = Message(RecordDict({"config": ConfigRecord({"server-round": 2})}), dst_node_id=7,
                   message_type="train.attack")
    with pytest.raises(ValueError, match="no 'arrays' record"):
        attack_with_eavesdropped_uploads(bare, _context(node, **run))
