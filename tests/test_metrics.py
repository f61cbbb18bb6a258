"""Detection metrics on hand-computed cases."""

import sys

import pytest

from server_app.metrics import detection_metrics, pooled_detection_metrics, ranking_scores


def test_hand_computed_confusion_and_rates():
    truth = {1: True, 2: True, 3: False, 4: False, 5: False}
    m = detection_metrics(truth, excluded=[1, 3], scores={1: 0.9, 2: 0.2, 3: 0.8, 4: 0.1, 5: 0.3})
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 1, 2, 1)
    assert m["recall"] == 0.5 and m["precision"] == 0.5 and m["fpr"] == pytest.approx(1 / 3)
    assert m["accuracy"] == 0.6 and m["f1"] == 0.5
    # AUC: attacker scores {0.9, 0.2} vs benign {0.8, 0.1, 0.3}: pairs won 3 + 1 of 6
    assert m["auc"] == pytest.approx(4 / 6)


def test_auc_absent_without_scores_or_without_both_classes():
    assert detection_metrics({1: True, 2: False}, [1])["auc"] is None
    m = detection_metrics({1: False, 2: False}, [], {1: 0.1, 2: 0.2})
    assert m["auc"] is None and m["fpr"] == 0.0 and m["recall"] == 0.0


def test_pooling_counts_every_client_round():
    rounds = [({1: True, 2: False}, [1], {1: 1.0, 2: 0.0}),
              ({1: True, 2: False}, [2], {1: 0.0, 2: 1.0})]
    m = pooled_detection_metrics(rounds)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 1, 1, 1) and m["auc"] == 0.5


def test_a_removed_upload_without_a_score_ranks_above_even_the_largest_float():
    """A rejected upload has no score and ranks above every scored one; the AUC is the
    hand-counted one even when a score is the largest float (one step above it is infinite)."""
    largest = sys.float_info.max
    truth = {1: True, 2: False, 3: False, 4: True}
    scores = {1: largest, 2: largest, 3: 0.5}  # 4 was rejected: no score
    m = detection_metrics(truth, excluded=[1, 2, 4], scores=scores)
    # attackers {max, top} against benign {max, 0.5}: 1 tie (1/2) + 1 + 1 + 1 of 4 pairs
    assert m["auc"] == pytest.approx(3.5 / 4)
    assert ranking_scores([1, 2, 3, 4], scores, {1, 2, 4}) == [1.0, 1.0, 0.0, 2.0]
