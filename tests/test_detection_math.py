"""Hand-made cases for the pure parts of LayerCAM-AE: AE scores, thresholds, voting, aggregation."""

import numpy as np
import pytest
import torch

from strategies.aggregation import weighted_average
from strategies.autoencoder import PATIENCE, reconstruction_errors, torch_threads
from strategies.records import ClientUpload
from strategies.thresholds import two_sided_rule, upper_rule
from strategies.voting import OutlierHistory, is_voting_round, vote_malicious


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


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(0):
        assert torch.get_num_threads() == before
