"""FLAME (Nguyen et al., "FLAME: Taming Backdoors in Federated Learning", USENIX Security 2022,
section 5, Algorithm 1): cluster, clip, add noise.

1. Cosine distances c_ij = 1 - cos(Delta_i, Delta_j) of the uploads' updates, clustered by
   HDBSCAN with min_cluster_size = n/2 + 1 (min_samples 1, a single cluster allowed): the
   largest cluster is admitted, the rest excluded. The paper writes the distances over the
   local models W_i; over the updates they do not drown in the shared global model (as its
   public re-implementations do).
2. Every admitted update is clipped to S_t, the median of all n update norms e_i = ||W_i - G||.
3. The clipped models are averaged (plainly, as in the paper) and Gaussian noise of standard
   deviation sigma = lambda * S_t is added to every weight (lambda = 0.001 for image
   classification, the paper's setting); not to BatchNorm's running statistics, which are no
   weights (noise on a small running variance makes it negative, and the model's outputs NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.cluster import HDBSCAN

from strategies.base import DetectingFedAvg
from strategies.records import ClientUpload, Detection
from strategies.registry import DEFENSES
from task.params import (columns_of, flatten_updates, float_names, is_batchnorm_statistic,
                          unflatten)


def cosine_distances(updates: np.ndarray) -> np.ndarray:
    """(n, n) matrix of 1 - cos(Delta_i, Delta_j), clipped to [0, 2] (zero updates: 1)."""
    norms = np.linalg.norm(updates, axis=1)
    unit = updates / np.where(norms > 0, norms, 1.0)[:, None]
    distances = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
    np.fill_diagonal(distances, 0.0)
    return distances


def flame_admitted(updates: np.ndarray, distances: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the uploads in HDBSCAN's largest cluster (step 1), over ``distances``
    (default: ``cosine_distances(updates)``). When HDBSCAN finds no cluster (every point
    noise), all are admitted, as without the filter."""
    n = len(updates)
    distances = cosine_distances(updates) if distances is None else distances
    labels = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed", copy=True,
                     allow_single_cluster=True).fit(distances).labels_
    clustered = labels[labels >= 0]
    if clustered.size == 0:
        return np.ones(n, dtype=bool)
    return labels == np.bincount(clustered).argmax()


def flame_update(updates: np.ndarray, admitted: np.ndarray, noise: float,
                 rng: np.random.Generator, quiet: Sequence[slice] = ()
                 ) -> tuple[np.ndarray, float]:
    """Steps 2-3 on the update vectors: the mean of the admitted updates clipped to the median
    norm S_t of all, plus N(0, (noise * S_t)^2) per coordinate but those in ``quiet`` (the
    same draws for the others with or without it); and S_t."""
    norms = np.linalg.norm(updates, axis=1)
    bound = float(np.median(norms))
    scale = np.minimum(1.0, bound / np.maximum(norms[admitted], 1e-12))
    mean = (updates[admitted] * scale[:, None]).mean(axis=0)
    drawn = rng.normal(0.0, noise * bound, mean.shape)
    for columns in quiet:
        drawn[columns] = 0.0
    return mean + drawn, bound


@DEFENSES.register
class Flame(DetectingFedAvg):
    """FLAME: HDBSCAN over cosine distances, median-norm clipping and adaptive noise.

    Parameters
    ----------
    noise : float (default: 0.001)
        lambda: the noise's standard deviation is lambda times the median update norm.
    seed : int
        Seeds the noise (plus the round number).
    """

    name = "flame"
    min_uploads = 2

    def __init__(self, *, noise: float = 0.001, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not noise >= 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.noise, self.seed = noise, seed

    @classmethod
    def from_config(cls, config, assets, **flower_kwargs):
        return cls(noise=config.flame_noise, seed=config.seed, **flower_kwargs)

    def detect(self, server_round: int, uploads: list[ClientUpload]) -> Detection:
        updates, names = flatten_updates([u.arrays for u in uploads], self.global_state)
        distances = cosine_distances(updates)
        admitted = flame_admitted(updates, distances)
        rng = np.random.default_rng([self.seed, server_round])
        statistics = columns_of(self.global_state, [k for k in names if is_batchnorm_statistic(k)])
        vector, bound = flame_update(updates, admitted, self.noise, rng, quiet=statistics)
        kept = [u for u, ok in zip(uploads, admitted) if ok]
        scores = {u.node_id: float(np.median(row)) for u, row in zip(uploads, distances)}
        # integer buffers: the base's counted_buffers
        aggregate = unflatten(vector, float_names(self.global_state), self.global_state)
        return Detection(kept=[u.node_id for u in kept], scores=scores, aggregate=aggregate,
                         details={"clip_bound": bound, "noise_std": self.noise * bound})
