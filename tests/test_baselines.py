"""Baseline defenses against hand-computed cases and independent implementations: Flower's own
Krum selection, numpy/scipy for median, trimmed mean and the geometric median."""

import numpy as np
import pytest
import scipy.optimize
import scipy.stats
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.serverapp.strategy.multikrum import select_multikrum

from strategies.auror import Auror, two_means_1d
from strategies.cosdefense import CosDefense, cosine_scores
from strategies.records import ClientUpload
from strategies.robust import Bulyan, GeoMed, Krum, Median, MultiKrum, TrimmedMean
from strategies.detection.robust_math import geometric_median, krum_scores, krum_select
from tests.helpers import reply


def test_krum_picks_the_expected_vector_among_five():
    points = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.4, 0.4], [10.0, 10.0]])
    # f = 1: each point's score sums its n - f - 2 = 2 nearest squared distances;
    # [0.4, 0.4] has 0.32 + 0.52 = 0.84 (vs. 1.0 + 0.32 = 1.32 for the origin)
    np.testing.assert_allclose(krum_scores(points, 1)[3], 0.84)
    assert krum_select(points, 1, 1).tolist() == [3]
    assert 4 not in krum_select(points, 1, 4)


def test_multi_krum_selection_equals_flowers_select_multikrum():
    rng = np.random.default_rng(0)
    for f, m in ((0, 1), (2, 5), (3, 18)):
        vectors = rng.normal(size=(24, 30))
        contents = [RecordDict({"arrays": ArrayRecord({"w": Array(v)})}) for v in vectors]
        flower = select_multikrum(contents, num_malicious_nodes=f, num_nodes_to_select=m)
        ours = krum_select(vectors, f, m)
        assert [contents.index(c) for c in flower] == ours.tolist()


def _uploads(vectors, sizes=None):
    return [ClientUpload(i + 10, {"w": v.astype(np.float32), "steps": np.array(3)},
                         float(sizes[i] if sizes is not None else 1.0))
            for i, v in enumerate(vectors)]


def _run(strategy, vectors, sizes=None):
    strategy.global_state = {"w": np.zeros(vectors.shape[1], np.float32), "steps": np.array(2)}
    uploads = _uploads(vectors, sizes)
    detection = strategy.detect(1, uploads)
    kept = [u for u in uploads if u.node_id in detection.kept]
    return detection, strategy.new_global_state(detection, kept) if kept else None


@pytest.fixture
def round_vectors():
    rng = np.random.default_rng(1)
    benign = rng.normal(0.0, 0.1, size=(21, 40))
    return np.vstack([benign, 5.0 + rng.normal(0, 0.1, size=(3, 40))])  # last 3 attack


def test_krum_and_multi_krum_exclude_the_far_cluster(round_vectors):
    detection, state = _run(Krum(num_malicious=3), round_vectors)
    assert len(detection.kept) == 1 and detection.kept[0] < 31
    np.testing.assert_allclose(state["w"], round_vectors[detection.kept[0] - 10], rtol=1e-6)
    detection, state = _run(MultiKrum(num_malicious=3), round_vectors)
    assert sorted(detection.kept) == list(range(10, 31))  # n - f = 21 kept: all benign
    np.testing.assert_allclose(state["w"], round_vectors[:21].mean(axis=0), atol=1e-6)
    assert min(detection.scores[n] for n in (31, 32, 33)) > max(detection.scores[n] for n in range(10, 31))
    assert state["steps"] == 3


def test_bulyan_selects_n_minus_2f_and_averages_the_closest_to_the_median(round_vectors):
    detection, state = _run(Bulyan(num_malicious=3), round_vectors)
    assert len(detection.kept) == 24 - 2 * 3
    selected = round_vectors[np.array(sorted(detection.kept)) - 10]
    median = np.median(selected, axis=0)
    beta = 24 - 4 * 3
    expected = [np.sort(selected[:, j][np.argsort(np.abs(selected[:, j] - median[j]))[:beta]]).mean()
                for j in range(selected.shape[1])]
    np.testing.assert_allclose(state["w"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule, needed", [(Bulyan(num_malicious=3), 15), (Krum(num_malicious=3), 9),
                                          (MultiKrum(num_malicious=2), 7),
                                          (Auror(num_features=20), 3)])
def test_the_krum_family_keeps_the_previous_model_below_its_n(rule, needed, round_vectors):
    rule.global_state = {"w": np.zeros(round_vectors.shape[1], np.float32), "steps": np.array([2])}
    replies = [reply(i + 10, {"w": v.astype(np.float32), "steps": np.array([3])}, {"num-examples": 1})
               for i, v in enumerate(round_vectors[:needed])]
    arrays, _ = rule.aggregate_train(1, replies[:-1])
    assert arrays is None and not rule.last_record.aggregated
    assert f"{needed - 1} valid upload(s), fewer than the {needed} needed" in rule.last_record.note
    arrays, _ = rule.aggregate_train(1, replies[:1])  # one upload: no rule may fail on it
    assert arrays is None and "1 valid upload(s)" in rule.last_record.note
    arrays, _ = rule.aggregate_train(2, replies)
    assert arrays is not None and rule.last_record.kept


def test_median_and_trimmed_mean_match_numpy_and_scipy(round_vectors):
    _, state = _run(Median(), round_vectors)
    np.testing.assert_allclose(state["w"], np.median(round_vectors.astype(np.float32), axis=0),
                               rtol=1e-6, atol=1e-7)
    detection, state = _run(TrimmedMean(beta=0.2), round_vectors)
    expected = scipy.stats.trim_mean(round_vectors.astype(np.float32), 0.2, axis=0)
    np.testing.assert_allclose(state["w"], expected, rtol=1e-5, atol=1e-6)
    assert len(detection.kept) == 24 and detection.details["trimmed_per_side"] == 4


def test_geometric_median_matches_a_numerical_optimiser():
    rng = np.random.default_rng(2)
    points, weights = rng.normal(size=(15, 4)), rng.uniform(1, 3, size=15)
    median, _ = geometric_median(points, weights, max_iterations=1000, tolerance=1e-12)
    reference = scipy.optimize.minimize(
        lambda z: weights @ np.linalg.norm(points - z, axis=1), points.mean(axis=0),
        method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000}).x
    np.testing.assert_allclose(median, reference, atol=1e-5)


def test_geomed_is_robust_to_the_far_cluster(round_vectors):
    detection, state = _run(GeoMed(), round_vectors, sizes=np.full(24, 300.0))
    assert np.linalg.norm(state["w"]) < 0.2  # the mean would be pulled to about 0.625 * sqrt(40)
    assert detection.details["weights"][33] < detection.details["weights"][10] / 10


def test_two_means_1d_is_the_exact_best_split():
    rng = np.random.default_rng(4)
    values = rng.normal(size=(9, 6))
    explained, upper = two_means_1d(values)
    for j in range(6):
        column = values[:, j]
        best = max(((column[column <= t].size * (column[column <= t].mean() - column.mean()) ** 2
                     + column[column > t].size * (column[column > t].mean() - column.mean()) ** 2)
                    / ((column - column.mean()) ** 2).sum(), t) for t in np.sort(column)[:-1])
        assert explained[j] == pytest.approx(best[0])
        assert upper[:, j].tolist() == (column > best[1]).tolist()


def test_auror_marks_the_minority_that_moves_together(round_vectors):
    detection, _ = _run(Auror(num_features=20), round_vectors)
    assert sorted(set(range(10, 34)) - set(detection.kept)) == [31, 32, 33]
    assert detection.scores[31] == 1.0 and detection.scores[10] == 0.0


def test_auror_marks_no_one_where_benign_clients_split_near_evenly():
    """Without attackers, benign updates split into two groups of similar size in many
    high-variance coordinates (ReLU units alive for some clients' data, dead for others'): each
    split is separated, but its smaller cluster is no minority, and no one is excluded. The
    same split of a minority of 3 of 24 marks them."""
    rng = np.random.default_rng(2)
    vectors = rng.normal(0.0, 0.01, size=(24, 40))
    for j in range(40):  # each coordinate its own near-even split: 10 to 12 clients up
        vectors[rng.permutation(24)[:rng.integers(10, 13)], j] += 1.0
    detection, _ = _run(Auror(num_features=40), vectors)
    assert detection.details["separated_features"] == 40
    assert detection.details["marking_features"] == 0 and len(detection.kept) == 24
    # where any smaller cluster marks (minority 0.5), benign clients are excluded
    assert len(_run(Auror(num_features=40, minority=0.5), vectors)[0].kept) < 24
    vectors[21:, :] += 5.0  # three move together in every coordinate
    detection, _ = _run(Auror(num_features=40), vectors)
    assert sorted(set(range(10, 34)) - set(detection.kept)) == [31, 32, 33]


def test_auror_marks_a_lone_outlier_among_three():
    """With three uploads a quarter is no one: the minority is at least one upload."""
    rng = np.random.default_rng(3)
    vectors = rng.normal(0.0, 0.01, size=(3, 40))
    vectors[2] += 5.0
    detection, _ = _run(Auror(num_features=40), vectors)
    assert detection.details["marking_features"] == 40 and sorted(detection.kept) == [10, 11]


def test_cosdefense_scores_the_cosine_with_the_global_last_layer():
    global_weight = np.array([[1.0, 0.0], [0.0, 1.0]])
    weights = [global_weight + [[1.0, 0.0], [0.0, 1.0]], global_weight + [[0.0, 1.0], [1.0, 0.0]]]
    np.testing.assert_allclose(cosine_scores(global_weight, weights), [1.0, 0.0], atol=1e-12)


def test_cosdefense_filters_updates_aligned_with_the_global_model():
    rng = np.random.default_rng(5)
    global_state = {"fc": rng.normal(size=(10, 20)).astype(np.float32), "steps": np.array(1)}
    updates = [rng.normal(0, 0.1, size=(10, 20)) for _ in range(21)]
    updates += [0.3 * global_state["fc"] + rng.normal(0, 0.01, size=(10, 20)) for _ in range(3)]
    strategy = CosDefense()
    strategy.global_state = global_state
    uploads = [ClientUpload(i, {"fc": (global_state["fc"] + u).astype(np.float32),
                                "steps": np.array(1)}, 1.0) for i, u in enumerate(updates)]
    detection = strategy.detect(1, uploads)
    assert set(range(24)) - set(detection.kept) == {21, 22, 23}
    # the recorded cut is in the recorded scores' units: it separates them as the decision did
    # (the report draws it over those scores)
    cut = detection.details["threshold"]
    assert {n for n, s in detection.scores.items() if s > cut} == {21, 22, 23}
    normalised = np.array(list(detection.scores.values()))
    normalised = (normalised - normalised.min()) / np.ptp(normalised)
    assert detection.details["normalised_threshold"] == pytest.approx(
        normalised.mean() + normalised.std())
