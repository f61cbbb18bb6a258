"""GAE (SPEC section 10) and its controls.

Each step against an independent oracle (brute force, scikit-learn, numpy, scipy), then the
whole attack in its production regime -- real MNIST updates of the embedded CNN, 21 benign
clients after one round of FedAvg -- where the first implementation's failure modes showed: a
degenerate graph, a constant decoded structure, an output that a 1e-9 perturbation rotates, an
attack carried by a hidden filler.
"""

import itertools
import tracemalloc

import numpy as np
import pytest
from scipy.optimize import minimize
from sklearn.metrics.pairwise import cosine_similarity

from attacks import AttackInput, build_attack
from attacks.controls import RadiusNoise, UndoUpdate
from attacks.gae import (Gae, GaeReport, GaeSettings, adversarial_structure, cosine_graph, encoder_input,
                         graph_nodes,
                         laplacian, optimal_graph_update, select_benign, span_basis,
                         spectral_transfer, standardised)
from attacks.observed import observe_round
from task.params import flat, gather
from task.config import ConfigError, RunConfig
from tests.helpers import benign_trajectory

# ---------------------------------------------------------------- steps against oracles


def test_knapsack_selection_matches_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(20):
        distances = rng.uniform(0.5, 3.0, size=9)
        budget = rng.uniform(0.2, 0.8)
        capacity = budget * distances.sum()
        # weights rounded up by at most one unit (1/10,000 of the capacity) each: the result is
        # at least as good as the best subset within capacity * (1 - 9 / 10,000)
        # (of at least three models: a graph needs three)
        fitting = [sum(distances[list(s)]) for r in range(3, 10)
                   for s in itertools.combinations(range(9), r)
                   if sum(distances[list(s)]) <= capacity * (1 - 9 / 10_000)]
        chosen = select_benign(distances, budget)
        assert chosen.sum() >= 3
        if fitting:
            assert max(fitting) - 1e-9 <= distances[chosen].sum() <= capacity + 1e-9
        else:  # none fits: the three nearest
            assert sorted(np.flatnonzero(chosen)) == sorted(np.argsort(distances)[:3])


def test_knapsack_hand_case_and_minimum_of_three():
    distances = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    chosen = select_benign(distances, 0.5)  # capacity 10.5: a subset summing to 10
    assert distances[chosen].sum() == 10.0 and chosen.sum() >= 3
    # the best within capacity 5 holds two models ({1, 4} or {2, 3}), and a graph of two is two
    # sign cliques: of three or more, only {1, 2, ...} would do, and 1 + 2 + 3 = 6 > 5 does not
    # fit: the three nearest, past the capacity
    assert select_benign(np.array([1.0, 2.0, 3.0, 4.0]), 0.5).tolist() == [True, True, True, False]
    # the best subset within capacity 9.84 is the one model 9; of three or more, 1.2 + 1.1 + 1.0
    assert select_benign(np.array([9.0, 1.2, 1.1, 1.0]), 0.8).tolist() == [False, True, True, True]
    # 1 + 2 + 4 = 7 fits capacity 7.5 and beats every other three that fit
    assert select_benign(np.array([1.0, 2.0, 4.0, 8.0]), 0.5).tolist() == [True, True, True, False]
    assert select_benign(np.array([1.0, 9.0]), 0.05).tolist() == [True, True]  # all there are


def test_knapsack_choice_does_not_depend_on_the_order_of_the_models():
    distances = np.array([1.0, 2.0, 3.0, 4.0, 2.5, 1.5])  # several optimal subsets
    chosen = sorted(distances[select_benign(distances, 0.4)])
    for seed in range(10):
        order = np.random.default_rng(seed).permutation(len(distances))
        assert sorted(distances[order][select_benign(distances[order], 0.4)]) == chosen


def test_standardised_rows_have_correlation_as_cosine_and_graph_matches_scikit_learn():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 7)) + rng.normal(size=(60, 1)) * 5  # rows with offsets
    features[4] = 0.25  # a constant row: no correlation with anything
    unit = standardised(features)
    rows = [i for i in range(60) if i != 4]
    np.testing.assert_allclose((unit @ unit.T)[np.ix_(rows, rows)],
                               np.corrcoef(features[rows]), atol=1e-12)
    expected = (cosine_similarity(unit) >= 0.3).astype(float)
    np.fill_diagonal(expected, 0)
    expected[4, :] = expected[:, 4] = 0
    np.testing.assert_array_equal(cosine_graph(unit, 0.3), expected)


def test_laplacian_rows_sum_to_zero_and_are_psd():
    adjacency = cosine_graph(np.random.default_rng(1).normal(size=(40, 4)), 0.0)
    lap = laplacian(adjacency)
    np.testing.assert_allclose(lap.sum(axis=1), 0, atol=1e-12)
    assert np.linalg.eigvalsh(lap).min() > -1e-9


def test_graph_nodes_come_from_the_most_energetic_coordinates():
    energy = np.arange(100.0)
    nodes = graph_nodes(energy, 20, 10, np.random.default_rng(0))
    assert len(set(nodes)) == 10 and nodes.min() >= 80 and np.all(np.diff(nodes) > 0)
    tied = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 2.0])  # top 4: the three 3s, then the first 2
    assert graph_nodes(tied, 4, 4, np.random.default_rng(0)).tolist() == [0, 2, 3, 4]


def test_gather_reads_the_flat_coordinates():
    rng = np.random.default_rng(5)
    state = {"a": rng.normal(size=(3, 4)).astype(np.float32), "n": np.array(2),
             "b": rng.normal(size=7), "c": rng.normal(size=(2, 2, 2)).astype(np.float32)}
    names = ["a", "b", "c"]
    indices = np.sort(rng.choice(27, size=11, replace=False))
    np.testing.assert_array_equal(gather(state, names, indices), flat(state, names)[indices])


def _cycle(n):
    adjacency = np.zeros((n, n))
    for i in range(n):
        adjacency[i, (i + 1) % n] = adjacency[(i + 1) % n, i] = 1
    return adjacency


def test_spectral_transfer_is_the_identity_on_the_same_graph_a_contraction_and_continuous():
    adjacency = cosine_graph(np.random.default_rng(4).normal(size=(50, 5)), 0.2)
    transfer, distinct = spectral_transfer(adjacency, adjacency.copy())
    np.testing.assert_allclose(transfer, np.eye(50), atol=1e-8)
    structure = np.random.default_rng(5).uniform(size=(50, 50))
    structure = (structure + structure.T) / 2
    np.fill_diagonal(structure, 0)
    transfer, _ = spectral_transfer(adjacency, structure)
    assert np.linalg.norm(transfer, 2) <= 1 + 1e-10  # a Gaussian Schur multiplier of B_hat^T B
    assert np.linalg.norm(transfer - np.eye(50)) > 1  # and another graph moves the features
    noise = np.random.default_rng(6).normal(size=(50, 50))
    noise = (noise + noise.T) / 2
    np.fill_diagonal(noise, 0)
    changes = [np.linalg.norm(spectral_transfer(adjacency, structure + eps * noise)[0] - transfer)
               for eps in (1e-6, 1e-7)]
    assert changes[0] < 1e-3 and changes[0] / changes[1] == pytest.approx(10, rel=0.05)  # linear


def test_spectral_transfer_does_not_depend_on_the_eigenbasis_of_a_repeated_eigenvalue():
    # A cycle's Laplacian has every nonzero eigenvalue twice: its eigenbasis is arbitrary, and
    # relabelling the nodes makes LAPACK return another one. The transfer must follow the
    # relabelling exactly (T' = P T P^T); pairing eigenvectors by index alone would not.
    n = 30
    adjacency = _cycle(n)
    rng = np.random.default_rng(6)
    structure = adjacency * rng.uniform(0.5, 1.0, size=(n, n))
    structure = (structure + structure.T) / 2 + 0.01 * rng.uniform(size=(n, n))
    structure = (structure + structure.T) / 2
    np.fill_diagonal(structure, 0)
    transfer, distinct = spectral_transfer(adjacency, structure)
    assert distinct == n // 2 + 1  # 0, then 14 double eigenvalues, then 4 (single)
    permutation = np.eye(n)[rng.permutation(n)]
    relabelled, _ = spectral_transfer(permutation @ adjacency @ permutation.T,
                                      permutation @ structure @ permutation.T)
    np.testing.assert_allclose(relabelled, permutation @ transfer @ permutation.T, atol=1e-8)


def _solve_iteratively(generated, mean_graph, radius):
    """scipy's SLSQP over the combination weights c: max -<F_hat c, u_bar_G> subject to
    ||F_hat c||^2 <= radius^2, run to convergence."""
    scale = np.linalg.norm(mean_graph)
    result = minimize(
        lambda c: (generated @ c) @ mean_graph / scale,
        x0=np.zeros(generated.shape[1]),
        jac=lambda c: generated.T @ mean_graph / scale,
        constraints=[{"type": "ineq", "fun": lambda c: radius**2 - (generated @ c) @ (generated @ c),
                      "jac": lambda c: -2 * generated.T @ (generated @ c)}],
        method="SLSQP", options={"ftol": 1e-12, "maxiter": 1000},
    )
    assert result.success, result.message
    return generated @ result.x


@pytest.mark.parametrize("rank", [8, 5])  # full column rank, and rank-deficient F_hat
def test_step6_optimum_matches_an_iterative_solver(rank):
    rng = np.random.default_rng(rank)
    generated = rng.normal(size=(80, rank)) @ rng.normal(size=(rank, 8))
    mean_graph = rng.normal(size=80)
    closed = optimal_graph_update(span_basis(generated), mean_graph, 1.7)
    iterative = _solve_iteratively(generated, mean_graph, 1.7)
    assert np.linalg.norm(closed) == pytest.approx(1.7, rel=1e-12)
    np.testing.assert_allclose(closed, iterative, atol=1e-5)
    assert -closed @ mean_graph >= -iterative @ mean_graph - 1e-9  # never worse


# ---------------------------------------------------------------- the production regime


@pytest.fixture(scope="module")
def trajectory():
    """Three FedAvg rounds of 21 honestly trained clients of the embedded CNN."""
    return benign_trajectory(rounds=3, num_clients=21, seed=0)


def _round(trajectory, index):
    globals_, states, sizes, _ = trajectory
    return globals_[index], tuple(states[index]), tuple(float(n) for n in sizes)


@pytest.fixture(scope="module")
def mnist_round(trajectory):
    """The global model after one FedAvg round, and the clients' models trained from it."""
    return _round(trajectory, 1)


def _craft(round_, seed=7, states=None, **kwargs):
    global_state, benign, sizes = round_
    attack = Gae(settings=GaeSettings(**kwargs.pop("settings", {})), **kwargs)
    state, report = attack.craft_with_report(
        AttackInput(global_state, global_state, np.random.default_rng(seed),
                    states if states is not None else benign, sizes))
    return state, report


def _deviation(round_, state):
    """w' - w_bar (float64): what the attack adds to the benign aggregate."""
    global_state, benign, sizes = round_
    observed = observe_round(global_state, benign, sizes)
    return flat(state, observed.names) - (observed.global_vector + observed.mean_update)


def _cosine(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def reference(mnist_round):
    return _craft(mnist_round)


def test_graph_on_updates_is_not_degenerate(reference):
    _, report = reference
    assert report.graph["nodes"] == 500
    assert 0.02 < report.graph["density"] < 0.3
    assert report.graph["distinct-eigenvalues"] == 500  # the first implementation had 387/2,000


def test_adversarial_structure_is_a_controlled_perturbation_neither_a_nor_a_constant(mnist_round):
    global_state, benign, sizes = mnist_round
    observed = observe_round(global_state, benign, sizes)
    nodes = graph_nodes(observed.energy, 1000, 500, np.random.default_rng(0))
    features = observed.updates_at(benign, nodes)
    adjacency = cosine_graph(standardised(features), 0.5, ramp=0.2)
    pairs = 500 * 499 // 2
    fitted, fitted_record = adversarial_structure(encoder_input(features), adjacency,
                                                  GaeSettings(adversarial=False))
    structure, record = adversarial_structure(encoder_input(features), adjacency, GaeSettings())
    upper = np.triu_indices(500, k=1)
    assert fitted_record["reconstruction-auc"] > 0.9  # the GAE learned A
    assert record["reconstruction-loss"] > fitted_record["reconstruction-loss"]  # ascent worked
    assert 0.01 * pairs < record["edges-flipped-vs-reconstruction"] < 0.2 * pairs
    assert np.count_nonzero((structure[upper] >= 0.5) != (fitted[upper] >= 0.5)) == \
        record["edges-flipped-vs-reconstruction"]
    assert record["mean-change"] <= GaeSettings().perturbation + 1e-9
    assert record["structure-std"] > 0.1 and 0.75 < record["auc"] < 0.999  # structure, not A
    assert np.all(np.diag(structure) == 0)


def test_constraint_holds_and_is_attained(mnist_round, reference):
    global_state, benign, sizes = mnist_round
    observed = observe_round(global_state, benign, sizes)
    state, report = reference
    distance = np.linalg.norm(flat(state, observed.names) - observed.global_vector)
    assert report.radius == pytest.approx(observed.largest_benign_distance)
    assert 0.999 * report.radius < distance <= report.radius * (1 + 1e-6)
    mean_norm = np.linalg.norm(observed.mean_update)
    for radius in (1.2 * mean_norm, 0.5 * mean_norm):  # with and without room for the attack
        state, report = _craft(mnist_round, radius=radius)
        distance = np.linalg.norm(flat(state, observed.names) - observed.global_vector)
        assert 0.999 * radius < distance <= radius * (1 + 1e-6)
        assert (report.graph_radius > 0) == (radius > mean_norm)
    assert state["fc2.weight"].dtype == np.float32


def test_a_radius_that_leaves_no_room_is_said_on_the_client(monkeypatch, caplog):
    """Below the benign mean's off-graph norm the upload is that mean shrunk, no attack (the
    report's graph radius 0, test above): the client's log says so, its report staying there."""
    attack = Gae(radius=0.1)
    for graph_radius, said in ((0.0, True), (0.3, False)):
        monkeypatch.setattr(attack, "craft_with_report", lambda _: (
            {}, GaeReport(radius=0.1, graph_radius=graph_radius)))
        caplog.clear()
        with caplog.at_level("WARNING", logger="flwr"):
            attack.craft(AttackInput({}, {}, np.random.default_rng(0), server_round=3))
        assert ("GAE, round 3: d_T = 0.1 leaves the graph no room" in caplog.text) == said
        assert "raise gae-radius" in caplog.text or not said


def test_attack_lives_on_the_graph_and_nothing_hides_off_it(mnist_round, reference):
    state, report = reference
    deviation = _deviation(mnist_round, state)
    on_graph = np.abs(deviation) > 1e-6
    assert on_graph.sum() <= 500
    # off the graph only float32 rounding of the benign mean is left
    assert np.linalg.norm(deviation[~on_graph]) < 1e-4 * np.linalg.norm(deviation[on_graph])


def test_same_seed_same_output(mnist_round, reference):
    again, _ = _craft(mnist_round)
    assert all(np.array_equal(again[k], reference[0][k]) for k in again)


@pytest.mark.parametrize("index", [1, 2])
def test_output_is_stable_under_a_1e9_perturbation_of_the_inputs(trajectory, index):
    # round 3 (index 2) is one where eigenvectors paired in bands, aligned by sign, moved the
    # output to cosine 0.959 under the first of these draws, and on an AMD EPYC (MKL, AVX-512)
    # round 2 (index 1) to 0.870 under two of them. On that machine the GAE's own training
    # moves A_hat by 2.5e-3 under one of those draws (by 6e-6 under another), which step 5 as built
    # now carries to 0.985; elsewhere it gives >= 0.99997 there (docs/attacks.md). The bound
    # sits between the two constructions on both machines.
    round_ = _round(trajectory, index)
    global_state, benign, sizes = round_
    ours = _deviation(round_, _craft(round_)[0])
    for seed in (11, 12, 13):
        rng = np.random.default_rng(seed)
        perturbed = tuple({k: v.astype(np.float64) + 1e-9 * rng.standard_normal(v.shape)
                           if v.dtype.kind == "f" else v for k, v in s.items()} for s in benign)
        state, _ = _craft(round_, states=perturbed)
        assert _cosine(_deviation(round_, state), ours) >= 0.98, seed


def test_output_depends_on_the_trained_adversarial_gae_beyond_solver_noise(mnist_round, reference):
    ours = _deviation(mnist_round, reference[0])
    for settings in ({"adversarial": False},  # the reconstruction A_fit, not adversarial
                     {"epochs": 0, "adversarial_epochs": 0}):  # an untrained GAE
        other, _ = _craft(mnist_round, settings=settings)
        assert _cosine(ours, _deviation(mnist_round, other)) < 0.95, settings


def test_output_changes_with_the_eavesdropped_models_not_with_their_order(mnist_round, reference):
    global_state, benign, sizes = mnist_round
    ours = _deviation(mnist_round, reference[0])
    fewer = (global_state, benign[4:], sizes[4:])  # four fewer models overheard
    state, _ = _craft(fewer)
    assert _cosine(_deviation(mnist_round, state), ours) < 0.95
    order = np.random.default_rng(0).permutation(len(benign))
    shuffled = (global_state, tuple(benign[i] for i in order), tuple(sizes[i] for i in order))
    state, _ = _craft(shuffled)
    assert _cosine(_deviation(mnist_round, state), ours) > 0.9999


def test_craft_adds_no_copy_of_all_updates(mnist_round):
    # The first implementation held an I x D float64 matrix plus a temporary of its size per
    # attacker. Here the working memory beyond the inputs stays a few model-sized vectors.
    global_state, benign, sizes = mnist_round
    vector_bytes = 8 * sum(v.size for v in global_state.values())
    tracemalloc.start()
    _craft(mnist_round)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 10 * vector_bytes, (peak, vector_bytes)  # I x D would be 21 vectors


# ---------------------------------------------------------------- controls


def test_controls_sit_at_the_same_radius_in_their_directions(mnist_round, reference):
    global_state, benign, sizes = mnist_round
    observed = observe_round(global_state, benign, sizes)
    attack_input = AttackInput(global_state, global_state, np.random.default_rng(3), benign, sizes)
    undo = flat(UndoUpdate().craft(attack_input), observed.names) - observed.global_vector
    noise = flat(RadiusNoise().craft(attack_input), observed.names) - observed.global_vector
    for update in (undo, noise):
        assert np.linalg.norm(update) == pytest.approx(reference[1].radius, rel=1e-6)
    assert _cosine(undo, -observed.mean_update) == pytest.approx(1.0, abs=1e-6)
    assert abs(_cosine(noise, observed.mean_update)) < 0.02  # D = 383k: a random direction
    def noise_with(seed):
        return RadiusNoise().craft(AttackInput(global_state, global_state,
                                               np.random.default_rng(seed), benign, sizes))
    assert np.array_equal(noise_with(3)["fc1.weight"], noise_with(3)["fc1.weight"])
    assert not np.array_equal(noise_with(3)["fc1.weight"], noise_with(4)["fc1.weight"])
    # undo-update attains the damage surrogate's maximum within the bound; GAE stays below it
    assert reference[1].damage < -undo @ observed.mean_update / np.linalg.norm(observed.mean_update)


def test_controls_and_gae_need_two_benign_uploads():
    one = {"w": np.zeros(3, np.float32)}
    for attack in (Gae(), RadiusNoise(), UndoUpdate()):
        with pytest.raises(ValueError, match="two eavesdropped benign uploads"):
            attack.craft(AttackInput(one, one, np.random.default_rng(0), (one,)))


@pytest.mark.parametrize("key, value", [("gae-candidate-nodes", 100), ("gae-perturbation", 0.0),
                                        ("gae-perturbation", 1.5), ("gae-learning-rate", 0.0),
                                        ("gae-adversarial-epochs", -1)])
def test_gae_keys_are_validated(key, value):
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_run_config({key: value})


def test_run_config_reaches_the_attack():
    attack = build_attack(RunConfig.from_run_config(
        {"gae-graph-nodes": 300, "gae-candidate-nodes": 900, "gae-perturbation": 0.1,
         "gae-adversarial": False, "gae-radius": 2.0}))
    assert (attack.graph_nodes, attack.candidate_nodes, attack.radius) == (300, 900, 2.0)
    assert attack.settings.perturbation == 0.1 and not attack.settings.adversarial
    assert build_attack(RunConfig.from_run_config({"attack": "undo-update",
                                                   "gae-radius": 2.0})).radius == 2.0


def test_the_graph_library_loads_without_torchs_deprecation_notice():
    """torch_geometric scripts some of its modules as it is imported, and torch then prints
    that ``torch.jit.script`` is deprecated, once in every attacker's log."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c",
                           "from attacks.gae import _geometric_nn; _geometric_nn().GAE"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
