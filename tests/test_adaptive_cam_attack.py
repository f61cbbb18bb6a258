"""The adaptive attack keeps its LayerCAM heat maps and its distance within the benign spread
while reversing the benign update, and is built with the architecture it attacks."""

import numpy as np
import pytest
import torch

from attacks import AttackInput, build_attack
from task.params import columns_of, flatten_updates
from strategies.detection.heatmaps import layercam_heatmaps
from task.config import RunConfig
from task.models import build_model
from tests.helpers import benign_trajectory


@pytest.fixture(scope="module")
def trained_round():
    globals_, states, sizes, data = benign_trajectory(rounds=2, num_clients=6, seed=3)
    return globals_[1], tuple(states[1]), data


def test_adaptive_cam_stays_within_the_benign_heat_map_and_distance_spread(trained_round):
    global_state, benign, data = trained_round
    model = build_model("cnn", 1, 10, 28)
    attack = build_attack(RunConfig(attack="adaptive-cam", layercam_ae_views=""), model)
    probes = data.train.as_float(torch.arange(16))
    crafted = attack.craft(AttackInput(global_state, global_state, np.random.default_rng(0),
                                       benign, probes=probes))

    updates, _ = flatten_updates(benign, global_state)
    mean = updates.mean(axis=0)
    update, _ = flatten_updates((crafted,), global_state)
    gamma = 1.0 - (update[0] @ mean) / (mean @ mean)
    np.testing.assert_allclose(update[0], (1.0 - gamma) * mean, atol=1e-5)  # on the line
    assert np.linalg.norm(update[0] - mean) <= np.linalg.norm(updates - mean, axis=1).max() * 1.001
    assert gamma > 0  # it does move against the benign update

    # independent check of the heat-map bound with the classes the benign mean predicts
    mean_model = build_model("cnn", 1, 10, 28)
    mean_model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in
                                {**global_state, **_add(global_state, mean)}.items()})
    classes = mean_model.eval()(probes).argmax(dim=1)
    maps = layercam_heatmaps(model, list(benign) + [crafted], probes, "conv2", classes).flatten(1)
    center = maps[:-1].mean(dim=0)
    assert (maps[-1] - center).norm() <= (maps[:-1] - center).norm(dim=1).max() * 1.001


def _add(global_state, vector):
    out, offset = {}, 0
    for k, v in global_state.items():
        if v.dtype.kind == "f":
            out[k] = (v + vector[offset:offset + v.size].reshape(v.shape)).astype(v.dtype)
            offset += v.size
    return out


def test_adaptive_cam_needs_the_architecture():
    with pytest.raises(ValueError, match="architecture"):
        build_attack(RunConfig(attack="adaptive-cam"))


def test_adaptive_cam_on_a_model_without_a_linear_output_layer_names_the_views_key():
    """It knows the head-direction view, a default one, through the model's last ``nn.Linear``:
    without one it stops as the defense does, naming the key to change."""
    from task.config import ConfigError

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())
    with pytest.raises(ConfigError, match="layercam-ae-views: Sequential has no nn.Linear"):
        build_attack(RunConfig(attack="adaptive-cam"), model)
    assert build_attack(RunConfig(attack="adaptive-cam", layercam_ae_views="norm"),
                        model).head_names == ()


@pytest.mark.parametrize("views", ["norm,direction,outside-range,collusion",
                                   "norm,direction,outside-range,collusion,head-direction"])  # default
def test_adaptive_cam_that_knows_the_views_stays_within_each_views_benign_range(trained_round,
                                                                               views):
    from strategies.detection.thresholds import robust_z
    from strategies.detection.update_views import VIEWS, nearest_distances, views_excess

    global_state, benign, data = trained_round
    model = build_model("cnn", 1, 10, 28)
    config = RunConfig(attack="adaptive-cam", layercam_ae_views=views)
    attack = build_attack(config, model)
    checked = [v for v in config.layercam_ae_view_names if v != "collusion"]  # offsets: collusion
    head = columns_of(global_state, ("fc2.weight", "fc2.bias"))
    probes = data.train.as_float(torch.arange(16))
    crafted = [attack.craft(AttackInput(global_state, global_state, np.random.default_rng(s),
                                        benign, probes=probes)) for s in (0, 1)]
    updates, _ = flatten_updates(benign, global_state)
    malicious, _ = flatten_updates(crafted, global_state)
    centre = np.median(updates, axis=0)
    for view in checked:
        highest = VIEWS[view](updates, centre, head=head).max()
        for m in malicious:
            assert VIEWS[view](np.vstack([updates, m]), centre, head=head)[-1] <= highest * (
                1 + 1e-9), view
    # and the pair rule: its two highest views pass it no further than a benign upload's do
    for m in malicious:
        stacked = np.vstack([updates, m])
        excess = views_excess({v: robust_z(VIEWS[v](stacked, centre, head=head)) for v in checked},
                              config.layercam_ae_view_z, config.layercam_ae_view_pair)
        assert excess[-1] <= min(1.0, excess[:-1].max()) + 1e-9
    mean = updates.mean(axis=0)
    # it does turn away from the benign mean: less progress along it than the mean makes
    assert all(m @ mean < 0.99 * (mean @ mean) for m in malicious)
    # two attackers are no closer to each other than benign clients are to their nearest
    assert np.linalg.norm(malicious[0] - malicious[1]) > 0


@pytest.mark.parametrize("offsets", ["span", "isotropic"])
def test_adaptive_cam_offsets_lie_in_the_benign_deviations_span_or_not(trained_round, offsets):
    from strategies.detection.update_views import nearest_distances

    global_state, benign, _ = trained_round
    attack = build_attack(RunConfig(attack="adaptive-cam", adaptive_cam_offsets=offsets),
                          build_model("cnn", 1, 10, 28))
    updates, _ = flatten_updates(benign, global_state)
    _, offset = attack.turn(updates, np.random.default_rng(0))
    _, other = attack.turn(updates, np.random.default_rng(1))
    # as long as the median nearest-neighbour distance over sqrt(2): two offsets lie about that
    # far apart
    radius = np.median(nearest_distances(updates)) / np.sqrt(2.0)
    np.testing.assert_allclose([np.linalg.norm(offset), np.linalg.norm(other)], radius, rtol=1e-9)
    assert not np.allclose(offset, other)  # each attacker draws its own
    basis, _ = np.linalg.qr((updates - updates.mean(axis=0)).T)
    outside = np.linalg.norm(offset - basis @ (basis.T @ offset)) / radius
    if offsets == "span":  # a mix of the benign deviations: nothing outside their span
        assert outside < 1e-9
    else:  # a random direction of ~10^5 parameters: almost all of it outside a 6-vector span
        assert outside > 0.99


def test_adaptive_cam_rejects_an_unknown_offset():
    with pytest.raises(ValueError, match="adaptive-cam-offsets"):
        RunConfig.from_run_config({"adaptive-cam-offsets": "gaussian"})
