"""GAE (SPEC section 10): each step against an independent oracle, then the whole attack's
defining properties -- the distance bound, and dependence on the eavesdropped models and on the
trained graph autoencoder rather than on noise."""

import itertools

import numpy as np
import pytest
import torch
from sklearn.metrics.pairwise import cosine_similarity

from attacks import AttackInput
from task.params import flatten_updates
from attacks.gae import (Gae, adversarial_structure, cosine_graph, laplacian,
                         deviation_at_radius, select_benign, spectral_generation)


def test_knapsack_selection_matches_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(20):
        distances = rng.uniform(0.5, 3.0, size=9)
        budget = rng.uniform(0.2, 0.8)
        capacity = budget * distances.sum()
        # weights rounded up by at most one unit (1/10,000 of the capacity) each: the result is
        # at least as good as the best subset within capacity * (1 - 9 / 10,000)
        best = max(sum(distances[list(s)]) for r in range(10)
                   for s in itertools.combinations(range(9), r)
                   if sum(distances[list(s)]) <= capacity * (1 - 9 / 10_000))
        chosen = select_benign(distances, budget)
        assert best - 1e-9 <= distances[chosen].sum() <= capacity + 1e-9


def test_knapsack_hand_case_and_minimum_of_two():
    chosen = select_benign(np.array([1.0, 2.0, 3.0, 4.0]), 0.5)  # capacity 5: {1, 4} or {2, 3}
    assert np.array([1.0, 2.0, 3.0, 4.0])[chosen].sum() == 5.0
    assert select_benign(np.array([1.0, 9.0, 2.0]), 0.05).tolist() == [True, False, True]


def test_cosine_graph_matches_scikit_learn():
    features = torch.randn(60, 7, dtype=torch.float64)
    expected = (cosine_similarity(features.numpy()) >= 0.3).astype(float)
    np.fill_diagonal(expected, 0)
    np.testing.assert_array_equal(cosine_graph(features, 0.3).numpy(), expected)


def test_spectral_generation_is_the_identity_on_the_same_graph_and_keeps_norms():
    features = torch.randn(80, 5, dtype=torch.float64)
    adjacency = cosine_graph(features, 0.2)
    same = spectral_generation(features, adjacency, adjacency.clone())
    torch.testing.assert_close(same, features)
    other = spectral_generation(features, adjacency, cosine_graph(features, -0.2))
    torch.testing.assert_close(other.norm(dim=0), features.norm(dim=0))  # B_hat B^T orthogonal
    assert not torch.allclose(other, features)


def test_laplacian_rows_sum_to_zero_and_are_psd():
    adjacency = cosine_graph(torch.randn(40, 4, dtype=torch.float64), 0.0)
    lap = laplacian(adjacency)
    torch.testing.assert_close(lap.sum(dim=1), torch.zeros(40, dtype=torch.float64))
    assert torch.linalg.eigvalsh(lap).min() > -1e-9


def test_autoencoder_training_direction_changes_the_structure():
    features = torch.randn(120, 6)
    adjacency = cosine_graph(features, 0.5)
    fitted = adversarial_structure(features, adjacency, epochs=60, adversarial=False)
    adversarial = adversarial_structure(features, adjacency, epochs=60, adversarial=True)
    edges, non_edges = adjacency > 0, (adjacency == 0) & ~torch.eye(120, dtype=torch.bool)

    def gap(structure):  # how much more likely an edge is decoded on true edges
        return structure[edges].mean() - structure[non_edges].mean()

    assert gap(fitted) > 0.3 and gap(adversarial) < gap(fitted) - 0.3
    assert torch.all(fitted.diagonal() == 0)


def test_deviation_lies_on_the_radius_along_the_start_direction():
    start = np.array([0.3, -0.4, 0.0])
    for radius in (0.1, 2.0):
        delta = deviation_at_radius(start, radius)
        assert np.linalg.norm(delta) == pytest.approx(radius, rel=1e-12)
        np.testing.assert_allclose(delta / np.linalg.norm(delta), start / 0.5, atol=1e-12)


@pytest.fixture(scope="module")
def round_states():
    rng = np.random.default_rng(0)
    global_state = {"conv": rng.normal(0, 0.05, (16, 1, 5, 5)).astype(np.float32),
                    "fc": rng.normal(0, 0.05, (10, 300)).astype(np.float32),
                    "steps": np.array(4, dtype=np.int64)}
    direction = {k: rng.normal(0, 0.01, v.shape) for k, v in global_state.items() if k != "steps"}
    benign = tuple({**{k: (global_state[k] + direction[k] + rng.normal(0, 0.01, v.shape))
                       .astype(np.float32) for k, v in direction.items()},
                    "steps": np.array(5, dtype=np.int64)} for _ in range(10))
    return global_state, benign, tuple(float(n) for n in rng.integers(200, 400, size=10))


def _craft(global_state, benign, sizes, seed=1, **params):
    attack = Gae(**{"graph_nodes": 300, "epochs": 20, **params})
    return attack.craft(AttackInput(global_state, global_state, np.random.default_rng(seed),
                                    benign, sizes))


def test_gae_meets_its_distance_bound_to_the_benign_mean(round_states):
    global_state, benign, sizes = round_states
    updates, _ = flatten_updates(benign, global_state)
    mean = np.asarray(sizes) @ updates / sum(sizes)
    largest = np.linalg.norm(updates - mean, axis=1).max()
    for radius in (0.0, 0.5 * largest):
        crafted, _ = flatten_updates((_craft(global_state, benign, sizes, radius=radius),),
                                     global_state)
        bound = radius or largest
        distance = np.linalg.norm(crafted[0] - mean)
        assert distance <= bound * (1 + 1e-6) and distance > 0.99 * bound
    out = _craft(global_state, benign, sizes)
    assert out["steps"] == global_state["steps"] and out["fc"].dtype == np.float32


def test_gae_output_is_deterministic_and_depends_on_models_graph_and_autoencoder(round_states):
    global_state, benign, sizes = round_states
    reference = _craft(global_state, benign, sizes)
    assert all(np.array_equal(reference[k], _craft(global_state, benign, sizes)[k])
               for k in reference)

    def differs(other):
        return not np.allclose(reference["fc"], other["fc"])

    assert differs(_craft(global_state, benign, sizes, edge_threshold=0.8))  # another graph
    assert differs(_craft(global_state, benign, sizes, epochs=0))  # untrained autoencoder
    assert differs(_craft(global_state, benign, sizes, adversarial=False))
    shifted = tuple({**s, "fc": s["fc"] + 0.01} for s in benign)  # other eavesdropped models
    assert differs(_craft(global_state, shifted, sizes))
    assert differs(_craft(global_state, benign, sizes, seed=2))  # other graph nodes


def test_gae_sees_only_what_it_is_given():
    # No data, no model, no training: craft's only inputs are the numpy states of the round.
    with pytest.raises(ValueError, match="two eavesdropped benign uploads"):
        Gae().craft(AttackInput({"w": np.zeros(3, np.float32)}, {"w": np.zeros(3, np.float32)},
                                np.random.default_rng(0), ({"w": np.ones(3, np.float32)},)))
