"""Detection metrics against ground truth, computed with scikit-learn.

Positive class = attacker. A client counts as detected when the defense excluded its upload
(a rejected upload never entered the model either, so it counts as excluded). AUC uses the
defense's continuous scores (higher = more suspicious), never the hard decisions; a client
removed without a finite score (a rejected upload) ranks above every score. AUC is absent when
the defense has no scores, a kept client has none, or only one class took part.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score


def detection_metrics(
    truth: Mapping[int, bool], excluded: Iterable[int], scores: Mapping[int, float] | None = None
) -> dict[str, float | int | None]:
    """Recall, precision, FPR, accuracy, F1 (and AUC from ``scores``) over the clients in ``truth``."""
    nodes = sorted(truth)
    y_true = np.array([bool(truth[n]) for n in nodes], dtype=int)
    excluded = set(excluded)
    y_pred = np.array([n in excluded for n in nodes], dtype=int)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    out: dict[str, float | int | None] = {
        "tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn),
        "recall": float(recall_score(y_true, y_pred, zero_division=0.0)),
        "precision": float(precision_score(y_true, y_pred, zero_division=0.0)),
        "fpr": float(fp / (fp + tn)) if fp + tn else 0.0,
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1": float(f1_score(y_true, y_pred, zero_division=0.0)),
        "auc": None,
    }
    ranking = None if scores is None else ranking_scores(nodes, scores, excluded)
    if ranking is not None and 0 < y_true.sum() < len(y_true):
        out["auc"] = float(roc_auc_score(y_true, ranking))
    return out


def ranking_scores(nodes: list, scores: Mapping, removed: set) -> list[float] | None:
    """Each node's rank among the finite scores, for the ROC (its curve and AUC depend on the
    order alone); a removed node without a finite score ranks above all, even a score at the
    largest float (``None`` when a kept node has none: the ranking is not known)."""
    finite = {n: float(s) for n, s in scores.items()
              if isinstance(s, (int, float)) and math.isfinite(s)}
    if any(n not in finite and n not in removed for n in nodes):
        return None
    distinct = np.unique(list(finite.values()))  # sorted; ties keep one rank
    top = float(len(distinct))
    return [float(np.searchsorted(distinct, finite[n])) if n in finite else top for n in nodes]


def round_decisions(truth: Mapping[int, bool], excluded: Iterable[int], rejected: Iterable[int],
                    scores: Mapping[int, float] | None, skipped: bool
                    ) -> tuple[dict[int, bool], set[int], Mapping[int, float] | None]:
    """The client-rounds a round decided on, with their ground truth, those it removed and
    their scores: the screening's rejections always, and the defense's exclusions unless it
    made no decision (``skipped``: too few uploads, or its rule failed), when the uploads it did
    not aggregate were not detected (and the rejected ones, without scores, rank on top).
    ``truth``: the nodes whose ground truth is known (a client that failed reports none)."""
    rejected = set(rejected)
    if skipped:
        return {n: a for n, a in truth.items() if n in rejected}, rejected & set(truth), {}
    return dict(truth), (set(excluded) | rejected) & set(truth), scores


def pool_rounds(rounds: Iterable[tuple[Mapping[int, bool], Iterable[int],
                                      Mapping[int, float] | None]]
                ) -> tuple[dict[tuple[int, int], bool], set[tuple[int, int]],
                           dict[tuple[int, int], float] | None]:
    """Rounds' (truth, removed, scores) as one, each client-round keyed (round index, node);
    the scores only when every round has them."""
    truth, removed, scores, have_scores = {}, set(), {}, True
    for i, (round_truth, round_removed, round_scores) in enumerate(rounds):
        truth.update({(i, n): a for n, a in round_truth.items()})
        removed |= {(i, n) for n in round_removed if n in round_truth}
        if round_scores is None:
            have_scores = False
        else:
            scores.update({(i, n): v for n, v in round_scores.items() if n in round_truth})
    return truth, removed, scores if have_scores else None


def pooled_detection_metrics(rounds: Iterable[tuple[Mapping[int, bool], Iterable[int],
                                                     Mapping[int, float] | None]]) -> dict:
    """The same metrics over all (client, round) decisions of a run, pooled (``pool_rounds``);
    AUC pools scores only when every round has them."""
    return detection_metrics(*pool_rounds(rounds))
