"""Hand-made cases for the pure parts of LayerCAM-AE: AE scores, thresholds, evidence over
rounds, voting, aggregation."""

import numpy as np
import pytest
import torch

from strategies.aggregation import weighted_average
from strategies.detection.autoencoder import PATIENCE, reconstruction_errors, torch_threads
from strategies.detection.evidence import (EvidenceLedger, SpreadHistory, excluded_by_evidence,
                                          still_held)
from strategies.records import ClientUpload
from strategies.detection.thresholds import robust_z, two_sided_rule, upper_rule
from task.config import RunConfig
from strategies.detection.voting import OutlierHistory, is_voting_round, vote_malicious
from task.params import content_key
from tests.helpers import autograd_reconstruction_errors, benign_errors


def test_upper_rule_matches_eq_13_14():
    errors = np.array([1.0, 2.0, 3.0, 10.0])
    decision = upper_rule(errors, beta=1.0)
    mean, std = 4.0, np.sqrt(((errors - 4.0) ** 2).mean())  # population std, eq. (14)
    assert decision.threshold == pytest.approx(mean + std)
    assert decision.benign.tolist() == [True, True, True, False]
    assert upper_rule(errors, beta=0.0).benign.tolist() == [True, True, True, False]
    assert upper_rule(errors, beta=3.0).benign.all()


def test_two_sided_rule_flags_both_tails():
    errors = np.array([0.01, 0.50, 0.51, 0.49, 0.52, 0.48, 0.50, 1.20])
    decision = two_sided_rule(errors, z=3.0)
    # median 0.50, MAD 0.015 -> scale 0.0222; |0.01-0.5|/scale = 22, |1.2-0.5|/scale = 31.5
    assert decision.benign.tolist() == [False, True, True, True, True, True, True, False]
    assert decision.scores[0] == pytest.approx(0.49 / (1.4826 * 0.015), rel=1e-6)
    assert upper_rule(errors).benign[0]


def test_two_sided_rule_with_zero_mad_still_separates():
    decision = two_sided_rule(np.array([0.3, 0.3, 0.3, 0.3, 0.9]), z=3.0)
    assert decision.benign.tolist() == [True, True, True, True, False]


def test_robust_z_is_signed_and_defined_for_ties_and_two_clients():
    z = robust_z(np.array([0.01, 0.50, 0.51, 0.49, 0.52, 0.48, 0.50, 1.20]))
    assert z[0] < -20 and z[-1] > 30 and z[1] == 0.0
    assert robust_z(np.full(6, 0.7)).tolist() == [0.0] * 6  # all equal: nobody stands out
    assert np.allclose(robust_z(np.array([1.0, 3.0])), [-1 / 1.4826, 1 / 1.4826])  # K = 2
    assert robust_z(np.array([0.4])).tolist() == [0.0]


def test_evidence_is_the_exponentially_weighted_stouffer_sum():
    ledger = EvidenceLedger(memory=0.5)
    assert ledger.update({1: -2.0, 2: 1.0}) == {1: -2.0, 2: 1.0}
    second = ledger.update({1: -2.0})  # node 2 skipped the round: its evidence is kept
    assert second[1] == pytest.approx((-2.0 * 0.5 - 2.0) / np.sqrt(1 + 0.25))
    assert ledger.update({2: 0.0})[2] == pytest.approx(0.5 / np.sqrt(1.25))
    assert EvidenceLedger(memory=0.0).update({1: 2.5}) == {1: 2.5}
    clipped = EvidenceLedger(memory=0.5, cap=3.0)
    assert clipped.update({1: -9.0}) == {1: -3.0}
    assert clipped.update({1: 1.0})[1] == pytest.approx((-3.0 * 0.5 + 1.0) / np.sqrt(1.25))
    with pytest.raises(ValueError, match="memory"):
        EvidenceLedger(memory=1.0)


def excluded_per_round(rounds: list[np.ndarray], memory=0.8, cut=3.0, cap=4.0, scale_rounds=5,
                       group_z=2.25, group_size=3, low_cut=None) -> list[set[int]]:
    """The evidence decision on a sequence of rounds' reconstruction errors; the keys default
    to the values these tests were written for (cut 3, clip 4, band from -2.25), the defaults
    before native maps (``RunConfig`` holds the current ones)."""
    ledger, spreads, out = EvidenceLedger(memory, cap), SpreadHistory(scale_rounds), []
    for errors in rounds:
        evidence = ledger.update(dict(enumerate(spreads.scores(errors))))
        out.append(excluded_by_evidence(evidence, cut, group_z, group_size, low_cut))
    return out


def default_keys() -> dict:
    """``excluded_per_round``'s keys at the run config's defaults."""
    d = RunConfig()
    return dict(memory=d.layercam_ae_memory, cut=d.layercam_ae_robust_z,
                cap=d.layercam_ae_score_cap, scale_rounds=d.layercam_ae_scale_rounds,
                group_z=d.layercam_ae_group_z, group_size=d.layercam_ae_group_size,
                low_cut=d.layercam_ae_low_z)


def test_a_low_group_is_excluded_together_a_pair_or_a_high_group_is_not():
    evidence = {n: 0.1 * (n % 5) for n in range(24)}
    group = {**evidence, 21: -2.4, 22: -2.6, 23: -2.3}
    assert excluded_by_evidence(group, 3.0, 2.25, 3) == {21, 22, 23}
    assert excluded_by_evidence(group, 3.0, 2.25, 0) == set()  # group rule off
    assert excluded_by_evidence(group, 3.0, 2.25, 4) == set()
    pair = {**evidence, 22: -2.6, 23: -2.3, 5: 3.2}
    assert excluded_by_evidence(pair, 3.0, 2.25, 3) == {5}  # only the one beyond the cut
    # three clear attackers beyond the cut do not pull a benign client near -2.25 out with them
    clear = {**evidence, 20: -2.4, 21: -7.0, 22: -6.5, 23: -7.2}
    assert excluded_by_evidence(clear, 3.0, 2.25, 3) == {21, 22, 23}
    high = {**evidence, 21: 2.4, 22: 2.6, 23: 2.3}
    assert excluded_by_evidence(high, 3.0, 2.25, 3) == set()
    assert excluded_by_evidence({1: -0.5, 2: 0.5}, 3.0, 2.25, 3) == set()  # K = 2


def test_a_tight_colluding_group_below_the_one_round_cut_is_excluded_from_round_two():
    rng = np.random.default_rng(0)
    rounds = []
    for _ in range(6):  # 3 colluders the AE reconstructs better: at -2.5 sd, every round
        errors = benign_errors(rng)
        errors[21:] = 1.0 - 2.5 * 0.05 + rng.normal(0, 0.002, 3)
        rounds.append(errors)
    excluded = excluded_per_round(rounds)
    # the colluders pull the median and MAD, so they score about -2 each round: alone, each
    # is excluded from round 3; as a group of three below -2.25, from round 2
    assert excluded[0] == set() and all(e == {21, 22, 23} for e in excluded[1:]), excluded
    alone = excluded_per_round(rounds, group_size=0)
    assert alone[:2] == [set(), set()] and all(e == {21, 22, 23} for e in alone[2:]), alone
    # the one-round rule at the same cut never sees them
    assert all(not (set(np.flatnonzero(np.abs(robust_z(r)) > 3.0)) & {21, 22, 23}) for r in rounds)


def test_a_single_outlier_is_excluded_at_once_and_readmitted_once_it_behaves():
    rng = np.random.default_rng(1)
    rounds = [benign_errors(rng) for _ in range(5)]
    rounds[0][5] = 1.0 + 8 * 0.05
    excluded = excluded_per_round(rounds)
    # the 8-sd round enters clipped to 4; then typical rounds: |E| = 4, 2.5, ... (memory 0.8)
    assert excluded == [{5}, set(), set(), set(), set()], excluded
    # unclipped, one wild round keeps it out for three: |E| = 8, 5.0, 3.6, 2.7
    assert excluded_per_round(rounds, cap=np.inf) == [{5}, {5}, {5}, set(), set()]
    assert excluded_per_round(rounds, memory=0.0) == [{5}, set(), set(), set(), set()]


def test_without_attackers_at_most_one_percent_of_client_rounds_are_excluded():
    """At K = 24 one round's MAD is noisy: one round's cut at 3 puts ~1.5% of benign scores
    beyond it (t-like tails); the spread pooled over rounds brings it back to the normal's."""
    rng = np.random.default_rng(2)
    rounds = [rng.lognormal(0.0, 0.2, 24) for _ in range(100)]  # skewed, like the AE's errors
    evidence = sum(map(len, excluded_per_round(rounds)))
    one_round = sum(map(len, excluded_per_round(rounds, memory=0.0, scale_rounds=1)))
    assert evidence <= 0.01 * 24 * 100 < one_round, (evidence, one_round)


def test_the_pooled_spread_is_the_median_of_recent_relative_spreads():
    spreads = SpreadHistory(rounds=2)
    wide = np.array([8.0, 9.0, 10.0, 11.0, 12.0])  # median 10, MAD 1: relative spread 0.148
    narrow = np.array([9.5, 9.75, 10.0, 10.25, 10.5])  # relative spread 0.037
    np.testing.assert_allclose(spreads.scores(wide), robust_z(wide))
    pooled = (0.14826 + 0.037065) / 2 * 10.0
    np.testing.assert_allclose(spreads.scores(narrow), (narrow - 10.0) / pooled)
    np.testing.assert_allclose(spreads.scores(narrow), robust_z(narrow))  # the wide round left
    assert spreads.scores(np.zeros(4)).tolist() == [0.0] * 4


def test_equal_errors_and_two_clients_exclude_nobody():
    assert excluded_per_round([np.full(24, 0.3)] * 4) == [set()] * 4
    assert excluded_per_round([np.array([0.2, 0.9])] * 4) == [set()] * 4


def test_autoencoder_scores_a_planted_outlier_highest():
    generator = torch.Generator().manual_seed(0)
    base = torch.zeros(16, 16)
    base[4:12, 4:12] = 1.0
    maps = (base + 0.05 * torch.rand(20, 16, 16, generator=generator)).clamp(0, 1)
    odd = torch.zeros(16, 16)
    odd[0:4, :] = 1.0
    maps[7] = odd
    errors, _ = reconstruction_errors(maps.flatten(1), hidden=32, epochs=200, seed=0)
    assert int(errors.argmax()) == 7
    assert not upper_rule(errors.numpy()).benign[7]
    again, _ = reconstruction_errors(maps.flatten(1), hidden=32, epochs=200, seed=0)
    assert torch.equal(errors, again)  # seeded: reproducible


def test_voting_counts_outliers_of_rounds_taken_part_in():
    history = OutlierHistory(window=3)
    history.record(1, {1: True, 2: True, 3: False})
    history.record(2, {1: True, 3: False, 4: True})          # 2 skips round 2; 4 joins
    history.record(3, {1: False, 2: False, 3: True, 4: True})
    assert is_voting_round(3, 3) and not is_voting_round(4, 3)
    malicious = vote_malicious(history.flags, 3, window=3, votes=2, clients=[1, 2, 3, 4])
    # 1: outlier in rounds 1, 2 -> 2 votes; 2: one outlier of its two rounds; 3: one; 4: two
    assert malicious == {1: 2, 4: 2}
    history.record(4, {1: False})
    history.record(5, {1: False})
    history.record(6, {1: True, 5: True})
    # round 1 and 2 left the window: 1 now has one outlier round; 5 joined this round only
    assert vote_malicious(history.flags, 6, window=3, votes=2, clients=[1, 5]) == {}
    assert set(history.flags[1]) == {4, 5, 6}


def test_weighted_average_is_eq_16_with_sample_weights():
    a = ClientUpload(1, {"w": np.array([1.0, 2.0], dtype=np.float32), "n": np.array(10)}, 1.0)
    b = ClientUpload(2, {"w": np.array([3.0, 6.0], dtype=np.float32), "n": np.array(20)}, 3.0)
    out = weighted_average([a, b])
    np.testing.assert_allclose(out["w"], [2.5, 5.0])
    assert out["w"].dtype == np.float32
    assert out["n"].dtype == a.arrays["n"].dtype and int(out["n"]) == 18  # rint(17.5)
    with pytest.raises(ValueError, match="empty"):
        weighted_average([])


def test_early_stopping_stops_on_a_plateau_and_keeps_the_ranking():
    generator = torch.Generator().manual_seed(1)
    base = torch.zeros(16, 16)
    base[4:12, 4:12] = 1.0
    maps = (base + 0.05 * torch.rand(20, 16, 16, generator=generator)).clamp(0, 1)
    maps[7] = 0.0
    maps[7, 0:4, :] = 1.0
    full, ran_full = reconstruction_errors(maps.flatten(1), hidden=32, epochs=2000, seed=0)
    early, ran_early = reconstruction_errors(maps.flatten(1), hidden=32, epochs=2000, seed=0,
                                             tolerance=1e-2)
    assert ran_full == 2000 and PATIENCE <= ran_early < 2000
    assert int(early.argmax()) == int(full.argmax()) == 7
    again, ran_again = reconstruction_errors(maps.flatten(1), hidden=32, epochs=2000, seed=0,
                                             tolerance=1e-2)
    assert ran_again == ran_early and torch.equal(again, early)


@pytest.mark.parametrize("shape, hidden", [((12, 40), 16), ((30, 64), 128)])
def test_autoencoder_is_the_autograd_one(shape, hidden):
    maps = torch.rand(*shape, generator=torch.Generator().manual_seed(3))
    maps[0] = 1.0 - maps[0]
    ours, ran = reconstruction_errors(maps, hidden=hidden, epochs=40, lr=1e-2, seed=5)
    oracle, ran_oracle = autograd_reconstruction_errors(maps, hidden=hidden, epochs=40, lr=1e-2,
                                                        seed=5)
    assert ran == ran_oracle == 40
    torch.testing.assert_close(ours, oracle, rtol=1e-4, atol=1e-6)
    untrained, _ = autograd_reconstruction_errors(maps, hidden=hidden, epochs=0, seed=5)
    assert (ours - untrained).abs().max() > 1e-2  # the 40 epochs changed the errors


def test_early_stopping_stops_where_the_autograd_one_does():
    base = torch.zeros(16, 16)
    base[4:12, 4:12] = 1.0
    maps = (base + 0.05 * torch.rand(20, 16, 16, generator=torch.Generator().manual_seed(1)))
    maps = maps.clamp(0, 1).flatten(1)
    ours, ran = reconstruction_errors(maps, hidden=32, epochs=2000, seed=0, tolerance=1e-2)
    oracle, ran_oracle = autograd_reconstruction_errors(maps, hidden=32, epochs=2000, seed=0,
                                                        tolerance=1e-2)
    assert ran == ran_oracle < 2000
    torch.testing.assert_close(ours, oracle, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tolerance", [0.0, 1e-2])
def test_the_compiled_cpu_loop_takes_the_python_loops_steps_bit_for_bit(tolerance):
    """On a CPU the epochs run compiled (``_cpu_epochs``); op by op from Python (the loop the
    GPU launches, ``_Training.epoch``) they give the same errors and the same early stop."""
    import strategies.detection.autoencoder as ae

    assert ae._compiled_cpu_epochs() is not None  # this install compiles: the compiled loop runs
    maps = torch.rand(24, 400, generator=torch.Generator().manual_seed(4))
    maps[3] = 1.0 - maps[3]
    compiled, ran = reconstruction_errors(maps, epochs=300, seed=7, tolerance=tolerance)
    for _ in range(3):  # TorchScript's profiling executor re-optimises after its first runs
        assert torch.equal(reconstruction_errors(maps, epochs=300, seed=7,
                                                 tolerance=tolerance)[0], compiled)
    python, python_ran = reconstruction_errors(maps, epochs=300, seed=7, tolerance=tolerance,
                                               compiled=False)
    assert ran == python_ran and (tolerance == 0) == (ran == 300)
    assert torch.equal(compiled, python)
    untrained, _ = reconstruction_errors(maps, epochs=0, seed=7)
    assert (compiled - untrained).abs().max() > 1e-2  # the epochs ran


def test_without_torchscript_the_epochs_run_from_python_with_a_warning(monkeypatch):
    """An install TorchScript cannot compile from (no ``.py`` source): the same errors, from
    the Python loop, and a warning that says why."""
    import strategies.detection.autoencoder as ae

    def no_source(_function):
        raise OSError("could not get source code")

    maps = torch.rand(12, 64, generator=torch.Generator().manual_seed(2))
    expected = reconstruction_errors(maps, epochs=30, seed=1, compiled=False)
    ae._compiled_cpu_epochs.cache_clear()
    monkeypatch.setattr(torch.jit, "script", no_source)
    try:
        with pytest.warns(RuntimeWarning, match="could not get source code"):
            errors, ran = reconstruction_errors(maps, epochs=30, seed=1)
    finally:
        ae._compiled_cpu_epochs.cache_clear()  # later tests compile again
    assert ran == expected[1] == 30 and torch.equal(errors, expected[0])


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    with torch_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with torch_threads(0):
        assert torch.get_num_threads() == before


def test_content_key_orders_by_what_a_state_holds():
    a = {"w": np.arange(10_000, dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}
    b = {"w": np.arange(10_000, dtype=np.float32), "b": np.ones(3, dtype=np.float32)}
    assert content_key(a) == content_key({"b": a["b"].copy(), "w": a["w"].copy()})
    assert content_key(a) != content_key(b)
    strided = {"w": a["w"].copy(), "b": a["b"]}
    strided["w"][1] += 1.0  # between the sampled values of a 10,000-value array (stride 2)
    assert content_key(strided) == content_key(a)
    strided["w"][2] += 1.0
    assert content_key(strided) != content_key(a)


def test_the_default_cut_tolerates_a_persistent_benign_offset_but_not_a_persistent_outlier():
    """Benign scores persist (a client's data stays its own): a client held 1.2 sd below the
    median (z about -1.1) reaches |E| of about 3.2 over the rounds, inside the default cuts
    (3.75, and 4.2 on the low side) but beyond the previous 3 (cap 4). With the clip (3) below
    the cut, one wild round alone does not exclude; two do."""
    keys = default_keys()
    rng = np.random.default_rng(3)
    offset = [benign_errors(rng) for _ in range(20)]
    for errors in offset:
        errors[5] = 1.0 - 1.2 * 0.05
    assert all(5 not in e for e in excluded_per_round(offset, **keys))
    previous = excluded_per_round(offset, cut=3.0, cap=4.0, group_z=2.25)
    assert sum(5 in e for e in previous) == 10  # from round 11 on
    wild = [benign_errors(rng) for _ in range(4)]
    wild[0][7] = wild[1][7] = 1.0 + 8 * 0.05
    assert [7 in e for e in excluded_per_round(wild, **keys)][:2] == [False, True]


def test_a_lone_typical_client_needs_the_low_cut_a_group_below_it_does_not():
    """The default keys: one client held 1.5 sd below the median every round (reconstructed
    better than the rest, as the honest client nearest the average class mix is) reaches
    E of about -4 within 16 rounds: beyond the high side's cut (3.75), within the low side's
    (4.2). Held as far above, it is excluded; three held there together are excluded as a group
    (that the band reaches down to -low-z: the hand-computed cases below)."""
    keys = default_keys()
    assert keys["cut"] < keys["low_cut"]
    rng = np.random.default_rng(5)

    def held(clients, sd):
        rounds = [benign_errors(rng) for _ in range(16)]
        for errors in rounds:
            errors[clients] = 1.0 + sd * 0.05
        return rounds

    low = held([5], -1.5)
    assert all(5 not in e for e in excluded_per_round(low, **keys))
    symmetric = excluded_per_round(low, **{**keys, "low_cut": keys["cut"]})
    assert sum(5 in e for e in symmetric) >= 6
    assert sum(5 in e for e in excluded_per_round(held([5], 1.5), **keys)) >= 6
    group = excluded_per_round(held([5, 6, 7], -1.5), **keys)
    assert sum({5, 6, 7} <= e for e in group) >= 6
    assert all(e <= {5, 6, 7} for e in group)
    # two rounds at the clip (E = 5.4 / sqrt(1.64) = 4.22) still exclude a lone client
    wild = [benign_errors(rng) for _ in range(3)]
    wild[0][7] = wild[1][7] = 1.0 - 8 * 0.05
    assert [7 in e for e in excluded_per_round(wild, **keys)][:2] == [False, True]


def test_the_low_cut_is_its_own_and_defaults_to_the_cut():
    evidence = {n: 0.1 * (n % 5) for n in range(24)}
    lone = {**evidence, 3: -4.0, 4: 4.0}
    assert excluded_by_evidence(lone, 3.75, 2.75, 3) == {3, 4}
    assert excluded_by_evidence(lone, 3.75, 2.75, 3, low_cut=4.25) == {4}
    assert excluded_by_evidence({**lone, 3: -4.3}, 3.75, 2.75, 3, low_cut=4.25) == {3, 4}
    # the band reaches -low_cut: three at -4.0 to -3.0 are a group
    trio = {**evidence, 1: -4.0, 2: -4.1, 3: -3.0}
    assert excluded_by_evidence(trio, 3.75, 2.75, 3, low_cut=4.25) == {1, 2, 3}
    assert excluded_by_evidence(trio, 3.75, 2.75, 3) == {1, 2}


def decided(evidence, held=(), out=()) -> set[int]:
    """The default keys' rule as the strategy composes it: the cuts and the group (without the
    clients in ``out``), and the clients still held."""
    return (excluded_by_evidence(evidence, 3.75, 2.75, 3, low_cut=4.2, out=out)
            | still_held(evidence, held, 2.75))


def test_clients_the_views_exclude_make_no_low_group():
    evidence = {n: 0.1 * (n % 5) for n in range(24)}
    # three attackers the views exclude sit in the band beside a benign client near its edge
    band = {**evidence, 21: -3.4, 22: -3.1, 23: -3.2, 5: -2.9}
    assert excluded_by_evidence(band, 3.75, 2.75, 3, low_cut=4.2) == {5, 21, 22, 23}
    assert excluded_by_evidence(band, 3.75, 2.75, 3, low_cut=4.2, out={21, 22, 23}) == set()
    # one of them flagged: the other two and the benign client are still three
    assert excluded_by_evidence(band, 3.75, 2.75, 3, low_cut=4.2, out={21}) == {5, 22, 23}
    # out of a group, not out of the lone cut or the hold
    lone = {**band, 21: -4.5, 22: 4.0}
    assert decided(lone, out={21, 22, 23}, held={23}) == {21, 22, 23}


def test_a_held_client_stays_excluded_until_its_evidence_is_back_above_minus_group_z():
    evidence = {n: 0.1 * (n % 5) for n in range(24)}
    # a low group, excluded together
    first = {**evidence, 21: -3.0, 22: -3.1, 23: -3.2}
    assert excluded_by_evidence(first, 3.75, 2.75, 3, low_cut=4.2) == {21, 22, 23}
    # one crosses the lone cut: the other two are no group of three; held, they stay out
    second = {**evidence, 21: -4.5, 22: -3.3, 23: -3.0}
    assert excluded_by_evidence(second, 3.75, 2.75, 3, low_cut=4.2) == {21}
    assert decided(second, held={21, 22, 23}) == {21, 22, 23}
    # back above -group_z, a held client is readmitted; one not scored is not in the result;
    # the hold has no high side (a held client at +3.0, within the cut, is readmitted)
    third = {**evidence, 21: -4.3, 22: -2.7, 23: 3.0}
    del third[20]
    assert decided(third, held={20, 21, 22, 23}) == {21}
    # a client never excluded is not held, however long it sits in the band alone
    assert decided({**evidence, 5: -4.0}, held={21}) == set()
