"""AUROR (Shen, Tople, Saxena, "Auror: defending against poisoning attacks in collaborative
deep learning systems", ACSAC 2016), on model updates.

Per round: the ``num_features`` update coordinates with the largest variance across clients are
the indicative features. Each is split into two clusters by exact one-dimensional 2-means; a
feature is *separated* when the split explains at least ``separation`` of its variance (over
many clients a Gaussian sample's best split explains about 64%, a sample with an outlying group
far more). In each separated feature the smaller cluster is marked when it is a minority, at
most ``minority`` of the uploads (at least one): benign updates split near evenly in many
high-variance coordinates, and marking such halves excludes benign clients in rounds without
attackers (docs/defenses.md, "AUROR's minority"). A client's score is the fraction of separated
features that mark it; clients marked in at least ``tau`` of them are excluded (AUROR's tau).
Assumes attackers are a minority that moves the same features the same way.
"""

from __future__ import annotations

import numpy as np

from strategies.base import DetectingFedAvg
from strategies.records import ClientUpload, Detection
from strategies.registry import DEFENSES
from task.params import flatten_updates


def two_means_1d(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact 2-means of each column of ``values`` (n, D): the split of the sorted column that
    maximises the between-cluster variance. Returns (explained variance fraction (D,),
    boolean membership of the upper cluster (n, D))."""
    n = len(values)
    order = np.argsort(values, axis=0, kind="stable")
    ordered = np.take_along_axis(values, order, axis=0)
    prefix = np.cumsum(ordered, axis=0)[:-1]  # sums of the k smallest, k = 1..n-1
    k = np.arange(1, n)[:, None]
    total = prefix[-1] + ordered[-1]
    # between-cluster sum of squares for a split after the k smallest values
    between = (prefix / k - (total - prefix) / (n - k)) ** 2 * k * (n - k) / n
    best = between.argmax(axis=0)
    total_ss = ((values - values.mean(axis=0)) ** 2).sum(axis=0)
    explained = np.where(total_ss > 0, between[best, np.arange(values.shape[1])] /
                         np.maximum(total_ss, 1e-300), 0.0)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(n)[:, None].repeat(values.shape[1], 1), axis=0)
    return explained, rank > best[None, :]


@DEFENSES.register
class Auror(DetectingFedAvg):
    """AUROR on the round's updates (module docstring)."""

    name = "auror"
    min_uploads = 3
    """Two uploads always split 100% of a feature's variance: no minority to mark."""

    def __init__(self, *, num_features: int = 100, separation: float = 0.8, tau: float = 0.5,
                 minority: float = 0.25, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_features, self.separation, self.tau = num_features, separation, tau
        self.minority = minority

    @classmethod
    def from_config(cls, config, assets, **flower_kwargs):
        return cls(num_features=config.auror_features, separation=config.auror_separation,
                   tau=config.auror_tau, minority=config.auror_minority, **flower_kwargs)

    def detect(self, server_round: int, uploads: list[ClientUpload]) -> Detection:
        vectors = flatten_updates([u.arrays for u in uploads], self.global_state)[0]
        features = np.argsort(vectors.var(axis=0), kind="stable")[::-1][: self.num_features]
        explained, upper = two_means_1d(vectors[:, features])
        separated = explained >= self.separation
        minority_is_upper = upper.sum(axis=0) * 2 < len(uploads)
        smaller = np.where(minority_is_upper, upper, ~upper)
        # a minority of at least one upload (with 3, a quarter would be none)
        largest = max(1, int(self.minority * len(uploads)))
        marking = separated & (smaller.sum(axis=0) <= largest)
        # over every separated feature: a few near-even ones marking no one leave no score
        scores = (smaller[:, marking].sum(axis=1) / separated.sum() if separated.any()
                  else np.zeros(len(uploads)))
        return Detection(
            kept=[u.node_id for u, s in zip(uploads, scores) if s < self.tau],
            scores={u.node_id: float(s) for u, s in zip(uploads, scores)},
            details={"separated_features": int(separated.sum()),
                     "marking_features": int(marking.sum()), "tau": self.tau},
        )
