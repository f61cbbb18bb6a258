"""The views of the updates beside the heat maps, the clipping and FLAME, on crafted rounds
whose answers are computed by hand or by an independent route."""

import numpy as np
import pytest

from attacks import AttackInput, build_attack
from strategies.aggregation import clipped_to
from strategies.flame import Flame, cosine_distances, flame_admitted, flame_update
from strategies.records import ClientUpload
from task.params import row_norms
from strategies.detection.update_views import (VIEW_TAILS, VIEWS, norm_bound, collusion_view, column_median, direction_view, norm_view,
                                     outside_range_view, robust_z, view_scores)
from task.config import UPDATE_VIEWS, RunConfig


def benign_round(k=24, d=2000, seed=0):
    """k updates sharing a direction, each with its own noise (independent benign clients)."""
    rng = np.random.default_rng(seed)
    return 0.1 * rng.normal(0.0, 1.0, d) + 0.05 * rng.normal(0.0, 1.0, (k, d))


HEAD = (slice(1950, 2000),)
"""``benign_round``'s last 50 coordinates, as an output layer (head-direction's columns)."""


def test_the_views_are_the_ones_the_config_names():
    assert tuple(VIEWS) == UPDATE_VIEWS == tuple(VIEW_TAILS)


def test_robust_z_by_hand():
    z = robust_z(np.array([1.0, 2.0, 3.0, 4.0, 100.0]))  # median 3, MAD 1
    np.testing.assert_allclose(z, (np.array([1, 2, 3, 4, 100]) - 3) / 1.4826)
    np.testing.assert_array_equal(robust_z(np.ones(4)), np.zeros(4))
    # MAD 0 but not all equal: the mean absolute deviation (0.25 here) scales
    np.testing.assert_allclose(robust_z(np.array([0.0, 0.0, 0.0, 1.0])), [0, 0, 0, 4])


def test_norm_and_direction_views_by_hand():
    updates = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    np.testing.assert_allclose(norm_view(updates), np.log([5.0, 1.0, 2.0, 1.0]))
    centre = np.array([1.0, 0.0])
    np.testing.assert_allclose(direction_view(updates, centre), [1 - 0.6, 0.0, 1.0, 2.0])


def test_outside_range_counts_the_share_of_distance_in_outlying_coordinates():
    # 5 clients, 3 coordinates; coordinate medians 0, MADs 1 (sigma 1.4826): client 4's 10 in
    # coordinate 0 lies outside 4 sigma, its 1 in coordinate 1 does not
    updates = np.array([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0], [0.0, 0.0, 0.0],
                        [-1.0, -1.0, 1.0], [10.0, 1.0, 0.0]])
    share = outside_range_view(updates, np.median(updates, axis=0))
    np.testing.assert_allclose(share, [0, 0, 0, 0, 100 / 101])


def test_collusion_view_scores_identical_uploads_highest():
    updates = benign_round(k=10)
    updates[7:] = updates[7]  # three colluders upload one model
    z = robust_z(collusion_view(updates))
    assert z[7:].min() > 10 * max(1.0, z[:7].max())


@pytest.mark.parametrize("case, view", [("boost", "norm"), ("flip", "direction"),
                                        ("graph", "outside-range"), ("copies", "collusion")])
def test_each_view_singles_out_the_upload_it_is_built_for(case, view):
    updates = benign_round()
    rng = np.random.default_rng(1)
    if case == "boost":
        updates[-1] *= 24  # model replacement
    elif case == "flip":
        updates[-1] = -updates[-1]  # sign flip: same norm, opposite direction
    elif case == "graph":  # a GAE-like upload: benign elsewhere, large values on 50 coordinates
        updates[-1, rng.choice(updates.shape[1], 50, replace=False)] += 0.6
    else:
        updates[-3:] = updates[:-3].mean(axis=0)
    scores = view_scores(updates, UPDATE_VIEWS, head=HEAD)
    crafted = slice(-3, None) if case == "copies" else slice(-1, None)
    benign = slice(0, -3) if case == "copies" else slice(0, -1)
    assert scores[view][crafted].min() > 8.0, scores[view][crafted]
    assert np.abs(scores[view][benign]).max() < 4.0


def test_the_views_are_quiet_on_a_benign_round_and_need_three_clients():
    scores = view_scores(benign_round(), UPDATE_VIEWS, head=HEAD)
    assert max(float(np.max(z)) for z in scores.values()) < 4.0
    assert all((z == 0).all() for z in view_scores(benign_round(k=2), UPDATE_VIEWS).values())
    assert all(len(z) == 0 for z in view_scores(np.empty((0, 10)), UPDATE_VIEWS).values())


def test_clipping_by_hand_keeps_integer_buffers_and_short_updates():
    global_state = {"w": np.zeros(2, np.float32), "steps": np.array(5, np.int64)}
    long = ClientUpload(1, {"w": np.array([3.0, 4.0], np.float32), "steps": np.array(9, np.int64)}, 1.0)
    short = ClientUpload(2, {"w": np.array([0.3, 0.4], np.float32), "steps": np.array(7, np.int64)}, 1.0)
    clipped = clipped_to([long, short], global_state, bound=2.5)
    np.testing.assert_allclose(clipped[0].arrays["w"], [1.5, 2.0])
    assert clipped[0].arrays["steps"] == 9 and clipped[0].arrays["steps"].shape == ()
    assert clipped[1] is short
    given = clipped_to([long, short], global_state, bound=2.5, norms={1: 5.0, 2: 0.5})
    np.testing.assert_array_equal(given[0].arrays["w"], clipped[0].arrays["w"])
    assert given[1] is short  # with the norms given, only the upload to clip is touched


def test_flame_on_a_hand_computed_case():
    # three updates along +x, two against it: cosine distances ~0 within, ~2 across
    updates = np.array([[1.0, 0.0], [2.0, 0.1], [3.0, -0.1], [-4.0, 0.0], [-5.0, 0.2]])
    distances = cosine_distances(updates)
    assert distances[0, 3] == pytest.approx(2.0) and distances[0, 1] == pytest.approx(
        1 - 2 / np.hypot(2, 0.1))
    admitted = flame_admitted(updates)
    np.testing.assert_array_equal(admitted, [True, True, True, False, False])
    # norms 1, 2.0025, 3.0017, 4, 5.004: median S = 3.0017; the admitted are within S except
    # none, so the mean is their plain mean; no noise
    vector, bound = flame_update(updates, admitted, 0.0, np.random.default_rng(0))
    assert bound == pytest.approx(np.hypot(3.0, 0.1))
    np.testing.assert_allclose(vector, updates[:3].mean(axis=0))
    # a long admitted update is clipped to S before averaging
    updates[2] = [30.0, 0.0]
    vector, bound = flame_update(updates, admitted, 0.0, np.random.default_rng(0))
    assert bound == pytest.approx(4.0)
    np.testing.assert_allclose(vector, (updates[0] + updates[1] + [4.0, 0.0]) / 3)


def test_flame_noise_has_lambda_times_the_median_norm_as_its_deviation():
    updates = benign_round(k=9, d=200_000)
    admitted = np.ones(9, dtype=bool)
    plain, bound = flame_update(updates, admitted, 0.0, np.random.default_rng(0))
    noisy, _ = flame_update(updates, admitted, 0.01, np.random.default_rng(0))
    assert np.std(noisy - plain) == pytest.approx(0.01 * bound, rel=0.01)


def test_flame_adds_no_noise_to_batchnorm_statistics():
    """A small running variance plus noise of lambda times a large median norm would turn
    negative (and the model's outputs NaN): the statistics get the clipped mean alone, every
    weight its noise."""
    rng = np.random.default_rng(0)
    g = {"conv.weight": rng.normal(size=(64, 50)).astype(np.float32),
         "bn.running_var": np.full(64, 1e-3, dtype=np.float32),
         "bn.num_batches_tracked": np.array(9, dtype=np.int64)}
    uploads = [ClientUpload(i, {"conv.weight": (g["conv.weight"] + rng.normal(0, 0.5, (64, 50))
                                                ).astype(np.float32),
                                "bn.running_var": np.full(64, 1.1e-3, dtype=np.float32),
                                "bn.num_batches_tracked": np.array(12, dtype=np.int64)}, 1.0)
               for i in range(5)]
    flame = Flame(noise=0.01, seed=0)
    flame.global_state = g
    aggregate = flame.detect(1, uploads).aggregate
    without = Flame(noise=0.0, seed=0)
    without.global_state = g
    plain = without.detect(1, uploads).aggregate
    np.testing.assert_array_equal(aggregate["bn.running_var"], plain["bn.running_var"])
    assert (aggregate["bn.running_var"] > 1e-3).all()
    bound = flame.detect(1, uploads).details["clip_bound"]
    assert np.std(aggregate["conv.weight"] - plain["conv.weight"]) == pytest.approx(0.01 * bound,
                                                                                 rel=0.05)


def test_model_replacement_boosts_the_reversed_update_in_its_round_only():
    global_state = {"w": np.array([1.0, 2.0], np.float32)}
    own = {"w": np.array([1.5, 1.0], np.float32)}
    attack = build_attack(RunConfig(attack="model-replacement", num_clients=8,
                                    model_replacement_round=5))
    crafted = attack.craft(AttackInput(global_state, own, np.random.default_rng(0), server_round=5))
    np.testing.assert_allclose(crafted["w"], [1.0 - 8 * 0.5, 2.0 + 8 * 1.0])
    quiet = attack.craft(AttackInput(global_state, own, np.random.default_rng(0), server_round=4))
    assert quiet is own
    every = build_attack(RunConfig(attack="model-replacement", model_replacement_boost=2.0))
    np.testing.assert_allclose(
        every.craft(AttackInput(global_state, own, np.random.default_rng(0), server_round=3))["w"],
        [0.0, 4.0])
    # gamma is the n of the round's average: with partial participation the clients a round
    sampled = build_attack(RunConfig(attack="model-replacement", num_clients=1000,
                                     num_attackers=100, clients_per_round=50))
    np.testing.assert_allclose(
        sampled.craft(AttackInput(global_state, own, np.random.default_rng(0)))["w"],
        [1.0 - 50 * 0.5, 2.0 + 50 * 1.0])


def test_block_wise_median_and_outside_range_equal_the_whole_array_computation(monkeypatch):
    import strategies.detection.update_views as views

    updates = benign_round(k=7, d=1001)
    updates[3, :40] += 1.0
    whole = np.median(updates, axis=0)
    expected = outside_range_view(updates, whole)
    monkeypatch.setattr(views, "BLOCK_BYTES", 7 * 64 * 8)  # 16 blocks, the last one short
    monkeypatch.setattr(views, "MIN_BLOCK_COLUMNS", 1)
    assert len(views.column_blocks(updates)) == 16
    np.testing.assert_array_equal(views.coordinate_median(updates), whole)
    np.testing.assert_allclose(views.outside_range_view(updates, whole), expected, rtol=1e-12)


def test_blocks_hold_at_least_min_block_columns_and_cover_every_column():
    from strategies.detection.update_views import MIN_BLOCK_COLUMNS, column_blocks

    for shape in [(1000, 300_000), (24, 383_306), (3, 10), (5000, 100)]:
        blocks = column_blocks(shape)
        assert blocks[0].start == 0 and blocks[-1].stop == shape[1]
        assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))
        assert all(b.stop - b.start >= min(MIN_BLOCK_COLUMNS, shape[1]) for b in blocks[:-1])
    assert len(column_blocks((1000, 300_000))) == -(-300_000 // MIN_BLOCK_COLUMNS)


def plain_outside_range(updates, centre, width=4.0, reference=slice(None)):
    """The outside-range view written with numpy's median and ``np.where``, each coordinate's
    sigma over the ``reference`` rows: the oracle."""
    magnitude = np.abs(updates - centre)
    sigma = 1.4826 * np.median(magnitude[reference], axis=0)
    sigma = np.where(sigma > 0, sigma, magnitude[reference].mean(axis=0))
    squared = (updates - centre) ** 2
    return np.where(magnitude > width * sigma, squared, 0.0).sum(axis=1) / squared.sum(axis=1)


@pytest.mark.parametrize("k", [3, 4, 7, 24, 25])
def test_round_sums_are_the_views_sums_of_the_whole_matrix(k, monkeypatch):
    """``round_sums`` (one sort per block giving the median and the MAD, the blocks on
    threads) against each sum written on the whole matrix with numpy's median, with tied
    values and coordinates whose MAD is 0; the same to the last bit for any number of
    workers."""
    import strategies.detection.update_views as views

    updates = benign_round(k=k, d=3001, seed=k)
    updates[:, :50] = 0.0  # every client equal: MAD 0, mean deviation 0
    updates[:2, 50:80] = 5.0  # MAD 0 with two clients off it
    updates[:, 80:200] = np.round(updates[:, 80:200] * 20) / 20  # many ties
    updates[-1, 200:230] += 1.0  # one client's outlying coordinates
    monkeypatch.setattr(views, "BLOCK_BYTES", k * 128 * 8)  # many blocks, the last one short
    monkeypatch.setattr(views, "MIN_BLOCK_COLUMNS", 1)
    centre = np.median(updates, axis=0)
    plain = plain_outside_range(updates, centre)
    assert plain.max() > 0.02  # a share to get right
    close = dict(rtol=1e-12, atol=1e-15)
    for workers in (1, 2, 3):
        sums = views.round_sums(updates, workers=workers)
        np.testing.assert_allclose(sums.squared_norms, (updates ** 2).sum(axis=1), **close)
        np.testing.assert_allclose(sums.median_dots, updates @ centre, **close)
        np.testing.assert_allclose(sums.median_squared_norm, centre @ centre, **close)
        np.testing.assert_allclose(sums.distance, ((updates - centre) ** 2).sum(axis=1), **close)
        np.testing.assert_allclose(sums.outside / sums.distance, plain, **close)
        np.testing.assert_allclose(sums.gram, updates @ updates.T, **close)
        if workers == 1:
            first = sums
        for name in ("squared_norms", "median_dots", "outside", "distance", "gram"):
            np.testing.assert_array_equal(getattr(sums, name), getattr(first, name))
        assert sums.median_squared_norm == first.median_squared_norm
    without = views.round_sums(updates, outside=False, gram=False)
    assert without.outside is None and without.distance is None and without.gram is None
    np.testing.assert_array_equal(without.median_dots, first.median_dots)


@pytest.mark.parametrize("k", [8, 24, 25])
def test_round_sums_against_reference_rows_take_the_centre_and_ranges_over_those_rows(
        k, monkeypatch):
    """With ``reference``, the median and each coordinate's sigma are the reference rows'
    (numpy's median over them, the oracle), the sums every row's; the scores' medians and
    spreads are the reference clients' too (``robust_z`` over them)."""
    import strategies.detection.update_views as views

    updates = benign_round(k=k, d=3001, seed=k)
    updates[:, :50] = 0.0  # MAD 0
    updates[:, 80:200] = np.round(updates[:, 80:200] * 20) / 20  # ties
    updates[-3:] = updates[-1] + 0.02  # three identical uploads, off the others
    updates[0, 200:240] += 0.3
    monkeypatch.setattr(views, "BLOCK_BYTES", k * 128 * 8)
    monkeypatch.setattr(views, "MIN_BLOCK_COLUMNS", 1)
    reference = np.arange(k - 3)
    centre = np.median(updates[reference], axis=0)
    expected = plain_outside_range(updates, centre, reference=reference)
    assert not np.allclose(expected, plain_outside_range(updates, np.median(updates, axis=0)))
    close = dict(rtol=1e-12, atol=1e-15)
    head = (slice(2950, 2990), slice(2990, 3001))
    for workers in (1, 2):
        sums = views.round_sums(updates, workers=workers, reference=reference, head=head)
        np.testing.assert_allclose(sums.head_dots, updates[:, 2950:] @ centre[2950:], **close)
        np.testing.assert_allclose(sums.head_squared_norms, (updates[:, 2950:] ** 2).sum(axis=1),
                                   **close)
        np.testing.assert_allclose(sums.head_median_squared_norm, centre[2950:] @ centre[2950:],
                                   **close)
        np.testing.assert_allclose(sums.median_dots, updates @ centre, **close)
        np.testing.assert_allclose(sums.median_squared_norm, centre @ centre, **close)
        np.testing.assert_allclose(sums.distance, ((updates - centre) ** 2).sum(axis=1), **close)
        np.testing.assert_allclose(sums.outside / sums.distance, expected, **close)
        np.testing.assert_allclose(sums.squared_norms, (updates ** 2).sum(axis=1), **close)
    scores = views.scores_from_sums(sums, UPDATE_VIEWS, reference)
    nearest = views.nearest_distances(updates)
    scale = np.median(nearest[reference])  # the identical uploads' floor is 1e-6 of it
    definitions = {"norm": np.log(row_norms(updates)),
                   "direction": 1 - updates @ centre / (row_norms(updates)
                                                         * np.linalg.norm(centre)),
                   "outside-range": expected,
                   "collusion": np.log(scale / np.maximum(nearest, 1e-6 * scale)),
                   "head-direction": 1 - updates[:, 2950:] @ centre[2950:] / (
                       row_norms(updates[:, 2950:]) * np.linalg.norm(centre[2950:]))}
    for view, values in definitions.items():
        basis = values[reference]
        mad = 1.4826 * np.median(np.abs(basis - np.median(basis)))
        np.testing.assert_allclose(scores[view], (values - np.median(basis)) / mad,
                                   rtol=1e-9, atol=1e-9, err_msg=view)
    assert (scores["collusion"][-3:] > 50).all()


def test_a_second_judgement_readmits_whom_it_clears_against_the_clients_the_first_keeps(
        monkeypatch):
    """By hand, on the norm and collusion views (their sums need no centre): 21 honest log norms
    0.5 apart around 0 (MAD 2.5), three identical uploads at the median norm. The three shrink
    the MAD to 2.25, so an honest client 5.5 robust sd above the median without them is past
    the cut of 6 (z = 5.5 x 2.5 / 2.25 = 6.1); the collusion view excludes the three
    (identical: the floor). Judged again against the other 20, the honest client is back under
    the cut (5.4–5.6) and readmitted; the three stay excluded. The second judgement only readmits:
    a client the first keeps keeps its first scores, whatever the second says. With a margin,
    only the excluded clients whose first excess is within it are judged again (none: no
    second pass). Without ``again``, or with more than half the clients set aside, one
    judgement decides."""
    from strategies.detection import update_views
    from strategies.detection.update_views import RoundSums, judge_views

    spread = 1.4826 * 2.5
    logs = np.concatenate([np.arange(-10, 11) * 0.5, [0.0] * 3])
    logs[20] = 5.5 * spread  # the honest client with the longest update
    points = np.random.default_rng(0).normal(0.0, 1.0, (24, 24))
    points[21:] = points[21]  # the identical uploads
    gram = points @ points.T
    sums = RoundSums(np.exp(2 * logs), np.zeros(24), 0.0, gram=gram)
    views = ("norm", "collusion")

    scores, excess, aside, _ = judge_views(sums, views, 6.0, 0.6)
    assert np.flatnonzero(excess > 1).tolist() == [20, 21, 22, 23] and not aside.any()
    assert scores["norm"][20] == pytest.approx(5.5 * 2.5 / 2.25)

    first, asked = judge_views(sums, views, 6.0, 0.6)[0], []
    longer = np.exp(2 * logs)
    longer[0] = np.exp(2 * 10.0 * spread)  # what a second judgement would exclude, if it could

    def again(reference):
        asked.append(reference.tolist())
        return RoundSums(longer.copy(), np.zeros(24), 0.0)

    scores, excess, aside, once = judge_views(sums, views, 6.0, 0.6, again)
    assert asked == [list(range(20))]
    assert scores["norm"][:20].tolist() == first["norm"][:20].tolist() and excess[0] < 1
    assert np.flatnonzero(aside).tolist() == [20, 21, 22, 23]
    judged = np.log(longer[:20]) / 2  # the reference's log norms as the second pass has them
    centre = np.median(judged)
    assert scores["norm"][20] == pytest.approx(
        (logs[20] - centre) / (1.4826 * np.median(np.abs(judged - centre))))
    assert 5.0 < scores["norm"][20] < 6.0
    assert np.flatnonzero(excess > 1).tolist() == [21, 22, 23]
    assert once[20] == pytest.approx(first["norm"][20] / 6.0) and once[20] > 1  # just past
    assert (once[21:] > 3).all()  # identical: far past the collusion cut

    # a margin of 3: the honest client, just past a cut, is judged again against the same
    # reference; the three, far past theirs, keep their first scores
    asked.clear()
    scores, excess, aside, _ = judge_views(sums, views, 6.0, 0.6, again, margin=3.0)
    assert asked == [list(range(20))] and np.flatnonzero(aside).tolist() == [20]
    assert excess[20] < 1 and (excess[21:] == once[21:]).all()
    assert all((scores[v][21:] == first[v][21:]).all() for v in views)
    asked.clear()
    _, excess, aside, _ = judge_views(sums, views, 6.0, 0.6, again, margin=1.0)
    assert asked == [] and not aside.any() and (excess == once).all()  # none within: one pass

    asked.clear()
    twelve = np.r_[np.full(12, 2.0), np.zeros(12)]
    monkeypatch.setattr(update_views, "views_excess", lambda *_: twelve.copy())
    judge_views(sums, views, 6.0, 0.6, again)  # half set aside: the other half judges
    assert asked == [list(range(12, 24))]
    asked.clear()
    thirteen = np.r_[np.full(13, 2.0), np.zeros(11)]
    monkeypatch.setattr(update_views, "views_excess", lambda *_: thirteen.copy())
    _, excess, aside, _ = judge_views(sums, views, 6.0, 0.6, again)  # no majority left
    assert asked == [] and not aside.any() and (excess == thirteen).all()


@pytest.mark.parametrize("k", [3, 4, 24])
def test_view_scores_are_the_robust_scores_of_the_views_definitions(k):
    """``view_scores`` (through the block sums) against each view's definition on the whole
    matrix (``VIEWS``, the functions the adaptive attacker scores with) around numpy's median."""
    updates = benign_round(k=k, d=2003, seed=k)
    updates[0, :40] += 0.5
    updates[-1] *= -3
    head = (slice(1950, 1993), slice(1993, 2003))  # an output layer's weight and bias
    updates[1, 1950:] *= -1  # its head turned, the rest as the others'
    centre = np.median(updates, axis=0)
    scores = view_scores(updates, UPDATE_VIEWS, workers=2, head=head)
    for view, function in VIEWS.items():
        np.testing.assert_allclose(scores[view], robust_z(function(updates, centre, head=head)),
                                   rtol=1e-9, atol=1e-9, err_msg=view)
    # head-direction is the direction of the head's columns alone
    columns = np.r_[1950:2003]
    np.testing.assert_allclose(VIEWS["head-direction"](updates, centre, head=head),
                               VIEWS["direction"](updates[:, columns], centre[columns]))
    with pytest.raises(ValueError, match="output layer"):
        view_scores(updates, ("head-direction",))


@pytest.mark.parametrize("k", [1, 2, 5, 6])
def test_kth_deviation_is_the_kth_of_the_sorted_deviations(k):
    from strategies.detection.update_views import kth_deviation

    values = np.round(np.random.default_rng(k).normal(0.0, 3.0, (6, 400)))  # ties included
    centre = np.random.default_rng(9).normal(0.0, 1.0, 400)  # not only the median
    expected = np.sort(np.abs(values - centre), axis=0)[k - 1]
    in_value_order = np.abs(np.sort(values, axis=0) - centre)
    np.testing.assert_array_equal(kth_deviation(in_value_order, k), expected)


@pytest.mark.parametrize("k", [3, 4, 24, 25])
def test_outside_range_is_the_plain_numpy_formula(k):
    """Against the definition written with numpy's median, around the round's median and
    around another centre (the adaptive attacker scores a candidate against the benign one)."""
    updates = benign_round(k=k, d=2003, seed=k)
    updates[:, :40] = 0.0  # MAD 0: the mean absolute deviation scales
    updates[:, 40:300] = np.round(updates[:, 40:300] * 30) / 30  # ties
    updates[0, 300:340] += 0.5
    for centre in (np.median(updates, axis=0), np.median(updates[1:], axis=0)):
        expected = plain_outside_range(updates, centre)
        assert expected[0] > 0.1
        np.testing.assert_allclose(outside_range_view(updates, centre), expected, rtol=1e-12,
                                   atol=1e-15)


def test_view_excess_by_hand_one_view_past_its_cut_or_two_past_the_pair_share():
    from strategies.detection.update_views import view_excess

    relative = np.array([[1.2, 0.7, 0.7, 0.62, 0.0],   # a view's score over its cut
                         [0.1, 0.65, 0.5, 0.5, 0.0],
                         [0.0, 0.2, 0.2, 0.61, 0.0]])
    np.testing.assert_allclose(view_excess(relative, 0.6),
                               [1.2, 0.65 / 0.6, 0.5 / 0.6, 0.61 / 0.6, 0.0])
    excluded = view_excess(relative, 0.6) > 1
    assert excluded.tolist() == [True, True, False, True, False]
    # pair 1: the largest view alone, the rule without pairs
    np.testing.assert_allclose(view_excess(relative, 1.0), relative.max(axis=0))
    np.testing.assert_allclose(view_excess(relative[:1], 0.6), relative[0])  # one view


def test_the_heads_direction_and_the_whole_direction_are_one_side_of_the_pair_rule():
    """By hand, cut 6 (outside-range 12), pair 0.6: direction and head-direction both at 0.8 of
    their cuts are one side seen twice (kept); head-direction with outside-range at 0.8 of
    theirs are two sides (excluded); either past its cut alone is excluded."""
    from strategies.detection.update_views import view_excess, views_excess

    scores = {"norm": np.array([0.0, 0.0, 0.0, 0.0]),
              "direction": np.array([4.8, 0.0, 7.2, 4.8]),
              "outside-range": np.array([0.0, 9.6, 0.0, 0.0]),
              "head-direction": np.array([4.8, 4.8, 0.0, 3.0])}
    np.testing.assert_allclose(views_excess(scores, 6.0, 0.6),
                               [0.8, 0.8 / 0.6, 1.2, 0.8])
    # counted as two sides, the first client would be excluded (0.8 / 0.6 > 1)
    relative = np.stack([z / (6.0 * VIEW_TAILS[v]) for v, z in scores.items()])
    assert view_excess(relative, 0.6)[0] == pytest.approx(0.8 / 0.6)
    # without the head, the second client has one side at 0.8 of its cut
    default = {v: scores[v] for v in ("norm", "direction", "outside-range")}
    np.testing.assert_allclose(views_excess(default, 6.0, 0.6), [0.8, 0.8, 1.2, 0.8])


def test_the_norm_bound_by_hand_and_against_a_boosted_minority():
    updates = np.diag([1.0, 2.0, 4.0, 8.0, 16.0])  # log norms 0, ln2, 2 ln2, 3 ln2, 4 ln2
    assert norm_bound(row_norms(updates), 0.0) == pytest.approx(4.0)  # the median norm
    # MAD of the log norms = ln 2: z = 1 lies 1.4826 ln 2 above the median
    assert norm_bound(row_norms(updates), 1.0) == pytest.approx(4.0 * 2 ** 1.4826)
    boosted = benign_round()
    bound = norm_bound(row_norms(boosted), 2.0)
    boosted[-3:] *= 1000  # three model-replacement uploads barely move it
    assert norm_bound(row_norms(boosted), 2.0) == pytest.approx(bound, rel=0.1)
    assert bound < np.linalg.norm(benign_round(), axis=1).max() * 1.5


@pytest.mark.parametrize("k", [1, 3, 4, 24, 25])
def test_column_median_is_numpys_median_bit_for_bit(k):
    values = np.random.default_rng(k).normal(0.0, 1.0, (k, 301))
    np.testing.assert_array_equal(column_median(values), np.median(values, axis=0))


def float32_round(k=24, seed=0):
    """A float32 model's global state and k uploads: benign steps of about 1e-3, and one
    client writing 100x that into a few coordinates."""
    rng = np.random.default_rng(seed)
    global_state = {"w": rng.normal(0, 1, (40, 50)).astype(np.float32),
                    "steps": np.array(3, dtype=np.int64),
                    "b": rng.normal(0, 1, 37).astype(np.float32)}
    shared = {k: rng.normal(0, 1e-3, v.shape) for k, v in global_state.items() if k != "steps"}
    states = [{k: (v + shared[k] + rng.normal(0, 1e-3, v.shape)).astype(np.float32)
               if k != "steps" else np.array(9) for k, v in global_state.items()}
              for _ in range(k)]
    states[0]["w"][:2, :10] += np.float32(0.1)
    return global_state, states


def test_state_columns_are_the_stacked_matrixs_columns():
    """``StateColumns.columns`` gathers any block of the uploads' float arrays, across array
    boundaries and past the integer buffers, with the same values (and dtype) as stacking
    every upload's arrays into one matrix and slicing it."""
    from task.params import StateColumns, float_names

    global_state, states = float32_round(5)
    names = float_names(global_state)
    stacked = np.stack([np.concatenate([s[k].ravel() for k in names]) for s in states])
    columns = StateColumns(states, global_state)
    assert columns.shape == stacked.shape == (5, 2037) and columns.dtype == np.float32
    np.testing.assert_array_equal(columns.origin,
                                  np.concatenate([global_state[k].ravel() for k in names]))
    rng = np.random.default_rng(3)
    cuts = [(0, 2037), (0, 1), (1999, 2001), (2000, 2037), (2036, 2037), (7, 7), (0, 2000)]
    cuts += [tuple(sorted(rng.integers(0, 2038, 2))) for _ in range(50)]
    for start, stop in cuts:
        block = columns.columns(slice(int(start), int(stop)))
        assert block.dtype == np.float32 and block.flags.c_contiguous
        np.testing.assert_array_equal(block, stacked[:, start:stop], err_msg=f"{start}:{stop}")


def test_update_norms_are_the_flattened_updates_row_norms():
    """``update_norms`` (the clipping's norms without the views' sums) equals the norms of
    ``flatten_updates``' float64 rows, integer buffers left out, with no matrix made."""
    from task.params import flatten_updates, update_norms

    global_state, states = float32_round(6, seed=4)  # each upload's "steps" is 9, the global's 3
    states[2] = {k: v.copy() for k, v in global_state.items()}  # no update: norm 0
    updates, _ = flatten_updates(states, global_state)
    norms = update_norms(states, global_state)
    assert norms.dtype == np.float64 and norms[2] == 0.0
    np.testing.assert_allclose(norms, row_norms(updates), rtol=1e-13)


@pytest.mark.parametrize("k", [3, 24, 25])
def test_round_sums_of_a_float32_models_stack_are_the_float64_sums(k, monkeypatch):
    """A float32 model's uploads are gathered and differenced in float32 (``StateColumns``,
    ``round_sums``): every sum within float32 rounding of the float64 sums of
    ``flatten_updates``, the views' scores with them, and the same bits for any number of
    workers. A float64 array beside the float32 ones makes the stack float64: then the sums
    are ``flatten_updates``' to the last bit."""
    import strategies.detection.update_views as views
    from task.params import StateColumns, columns_of, flatten_updates

    monkeypatch.setattr(views, "BLOCK_BYTES", k * 64 * 4)  # many blocks
    monkeypatch.setattr(views, "MIN_BLOCK_COLUMNS", 1)
    global_state, states = float32_round(k, seed=k)
    weights = StateColumns(states, global_state)
    assert weights.dtype == np.float32 and weights.shape == (k, 2037)  # half the float64 bytes
    updates, _ = flatten_updates(states, global_state)
    head = columns_of(global_state, ("b",))
    single = views.round_sums(updates, head=head)
    for workers in (1, 2, 3):
        sums = views.round_sums(weights, workers=workers, head=head)
        if workers == 1:
            first = sums
        for name in ("squared_norms", "median_dots", "outside", "distance", "gram",
                     "head_squared_norms", "head_dots", "head_median_squared_norm"):
            np.testing.assert_allclose(getattr(sums, name), getattr(single, name), rtol=1e-5,
                                       atol=1e-12, err_msg=name)
            np.testing.assert_array_equal(getattr(sums, name), getattr(first, name))
    assert single.outside[0] / single.distance[0] > 0.5  # the crafted client's share
    for view, score in views.scores_from_sums(first, UPDATE_VIEWS).items():
        np.testing.assert_allclose(score, views.scores_from_sums(single, UPDATE_VIEWS)[view],
                                   rtol=1e-4, atol=1e-4, err_msg=view)
    mixed = {**global_state, "b": global_state["b"].astype(np.float64)}
    mixed_states = [{**s, "b": s["b"].astype(np.float64) + 1e-12} for s in states]
    weights = StateColumns(mixed_states, mixed)
    assert weights.dtype == np.float64
    exact = views.round_sums(weights, workers=2)
    expected = views.round_sums(flatten_updates(mixed_states, mixed)[0])
    for name in ("squared_norms", "median_dots", "outside", "distance", "gram"):
        np.testing.assert_array_equal(getattr(exact, name), getattr(expected, name))


def test_round_sums_of_a_float16_models_stack_are_taken_in_float32():
    """Half-precision uploads are differenced and summed in float32 at least: float16 squares
    of updates this size would overflow to inf."""
    import strategies.detection.update_views as views
    from task.params import StateColumns, flatten_updates

    global_state, states = float32_round(7)
    half = {k: v.astype(np.float16) if v.dtype.kind == "f" else v for k, v in global_state.items()}
    half_states = [{k: v.astype(np.float16) if v.dtype.kind == "f" else v for k, v in s.items()}
                   for s in states]
    for state in half_states:
        state["b"] = state["b"] + np.float16(300.0)  # 300^2 x 37 is past float16's 65504
    weights = StateColumns(half_states, half)
    assert weights.dtype == np.float16
    sums = views.round_sums(weights, workers=2)
    expected = views.round_sums(flatten_updates(half_states, half)[0])
    assert np.isfinite(sums.squared_norms).all() and sums.squared_norms.min() > 300.0 ** 2 * 37
    for name in ("squared_norms", "median_dots", "outside", "distance", "gram"):
        np.testing.assert_allclose(getattr(sums, name), getattr(expected, name), rtol=1e-5,
                                   atol=1e-9, err_msg=name)


def test_flatten_updates_is_each_states_float64_difference_in_name_order():
    from task.params import flatten_updates

    global_state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
                    "steps": np.array(3, dtype=np.int64), "b": np.array([0.1, 0.2])}
    states = [{"w": global_state["w"] + np.float32(0.3), "steps": np.array(9),
               "b": np.array([1.0, -1.0])},
              {"w": global_state["w"] * 2, "steps": np.array(4), "b": np.array([0.1, 0.2])}]
    updates, names = flatten_updates(states, global_state)
    assert names == ["w", "b"]  # integer buffers are not updates
    expected = [np.concatenate([(s["w"].astype(np.float64) - global_state["w"].astype(np.float64)).ravel(),
                                s["b"] - global_state["b"]]) for s in states]
    np.testing.assert_array_equal(updates, np.stack(expected))
    assert updates.dtype == np.float64


@pytest.mark.parametrize("name", ["update-views", "heatmaps"])
def test_the_long_lived_worker_pools_work_in_a_forked_child(name):
    """A child of ``os.fork`` inherits a cached pool but none of its threads: without a fresh
    pool there, whatever it submits would wait forever (a detection round in a forked worker)."""
    import os

    from strategies.detection.worker_pools import worker_pool

    assert worker_pool(name, 2).submit(int, "7").result() == 7  # the parent's threads run
    child = os.fork()
    if child == 0:  # the child never returns into pytest, whatever happens
        ok = False
        try:
            ok = worker_pool(name, 2).submit(int, "7").result(timeout=10) == 7
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
