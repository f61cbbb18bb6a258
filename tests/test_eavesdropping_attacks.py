"""ALIE, IPM, Min-Max and Min-Sum: each attack's defining property on generated updates."""

import numpy as np
import pytest

from attacks import AttackInput, build_attack
from attacks.eavesdropping import Alie, Ipm, MinMax, MinSum, alie_z
from task.config import RunConfig
from task.params import flatten_updates, squared_distances


@pytest.fixture
def round_states():
    rng = np.random.default_rng(0)
    global_state = {"w": rng.normal(size=(30, 20)).astype(np.float32), "n": np.array(5)}
    direction = rng.normal(size=(30, 20))
    benign = tuple({"w": (global_state["w"] + 0.1 * direction + 0.05 * rng.normal(size=(30, 20))
                          ).astype(np.float32), "n": np.array(6)} for _ in range(12))
    return global_state, benign


def _craft(attack, global_state, benign):
    return attack.craft(AttackInput(global_state, global_state, np.random.default_rng(0), benign))


def test_alie_z_max_of_baruch_et_al():
    # n = 24, m = 3: s = floor(13) - 3 = 10 supporters, z = Phi^-1(14 / 24)
    assert alie_z(24, 3) == pytest.approx(0.2104, abs=1e-3)


def test_alie_takes_z_max_from_the_round_its_upload_is_averaged_in():
    # 1,000 clients, 100 attackers, 50 a round: n = 50, m = 5, s = 26 - 5 = 21, Phi^-1(29 / 50)
    sampled = build_attack(RunConfig(attack="alie", num_clients=1000, num_attackers=100,
                                     clients_per_round=50))
    assert sampled.z == pytest.approx(alie_z(50, 5)) == pytest.approx(0.2019, abs=1e-3)
    assert build_attack(RunConfig(attack="alie", num_clients=24, num_attackers=3)).z == \
        pytest.approx(alie_z(24, 3))


def test_alie_stays_within_mean_plus_minus_z_std(round_states):
    g, benign = round_states
    out = _craft(Alie(z=1.5, num_clients=13, num_attackers=1), g, benign)
    updates, _ = flatten_updates(benign, g)
    mal = (out["w"].astype(np.float64) - g["w"]).ravel()
    mean, std = updates.mean(0), updates.std(0)
    assert np.all(np.abs(mal - mean) <= 1.5 * std + 1e-5)
    np.testing.assert_allclose(mal, mean - 1.5 * std, atol=1e-5)
    assert out["n"] == g["n"]


def test_ipm_reverses_the_benign_mean(round_states):
    g, benign = round_states
    updates, _ = flatten_updates(benign, g)
    mal = (_craft(Ipm(0.5), g, benign)["w"].astype(np.float64) - g["w"]).ravel()
    np.testing.assert_allclose(mal, -0.5 * updates.mean(0), atol=1e-5)
    assert mal @ updates.mean(0) < 0


def test_squared_distances_match_brute_force(round_states):
    g, benign = round_states
    updates, _ = flatten_updates(benign, g)
    brute = ((updates[:, None] - updates[None]) ** 2).sum(-1)
    np.testing.assert_allclose(squared_distances(updates), brute, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("attack", [MinMax(), MinSum()])
def test_min_max_and_min_sum_meet_their_distance_bound_tightly(round_states, attack):
    g, benign = round_states
    updates, _ = flatten_updates(benign, g)
    mal = (_craft(attack, g, benign)["w"].astype(np.float64) - g["w"]).ravel()
    mean, direction = updates.mean(0), -updates.std(0)
    gamma = float(np.linalg.norm(mal - mean) / np.linalg.norm(direction))
    assert gamma > 0.1

    def value(m):
        d = np.linalg.norm(updates - m, axis=1)
        return d.max() if isinstance(attack, MinMax) else (d ** 2).sum()

    d2 = squared_distances(updates)
    bound = np.sqrt(d2.max()) if isinstance(attack, MinMax) else d2.sum(1).max()
    assert value(mal) <= bound * (1 + 1e-9)
    assert value(mean + 1.01 * gamma * direction) > bound  # gamma is (nearly) the largest


def test_needs_two_benign_uploads(round_states):
    g, benign = round_states
    with pytest.raises(ValueError, match="two"):
        _craft(MinMax(), g, benign[:1])
