"""Pure functions of the distance- and coordinate-based robust aggregation rules, on an (n, d)
matrix of flattened client updates (``task.params.flatten_updates``)."""

from __future__ import annotations

import numpy as np

from task.params import squared_distances


def krum_scores(vectors: np.ndarray, num_malicious: int) -> np.ndarray:
    """Krum score of each row (Blanchard et al., NeurIPS 2017): the sum of its squared distances
    to its n - f - 2 nearest other rows (at least one). Lower is more central."""
    distances = squared_distances(vectors)
    np.fill_diagonal(distances, np.inf)
    closest = max(1, len(vectors) - num_malicious - 2)
    return np.sort(distances, axis=1)[:, :closest].sum(axis=1)


def krum_select(vectors: np.ndarray, num_malicious: int, num_selected: int,
                scores: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``num_selected`` rows with the lowest Krum scores (Multi-Krum; Krum when
    ``num_selected`` is 1), in ascending score order; ``scores``: the rows' ``krum_scores``
    when the caller has them."""
    scores = krum_scores(vectors, num_malicious) if scores is None else scores
    return np.argsort(scores, kind="stable")[:num_selected]


def bulyan_selection_size(num_clients: int, num_malicious: int) -> tuple[int, int]:
    """Bulyan's (theta, beta) = (n - 2f, n - 4f) (El Mhamdi et al., ICML 2018), which needs
    n >= 4f + 3."""
    if num_clients < 4 * num_malicious + 3:
        raise ValueError(f"Bulyan needs n >= 4f + 3 uploads; got n={num_clients}, "
                         f"f={num_malicious}")
    return num_clients - 2 * num_malicious, num_clients - 4 * num_malicious


def geometric_median(points: np.ndarray, weights: np.ndarray | None = None,
                     max_iterations: int = 100, tolerance: float = 1e-7,
                     smoothing: float = 1e-12) -> tuple[np.ndarray, int]:
    """Weighted geometric median argmin_z sum_i a_i ||x_i - z|| by Weiszfeld's algorithm, as in
    RFA (Pillutla, Kakade, Harchaoui, IEEE TSP 2022): z <- sum_i b_i x_i / sum_i b_i with
    b_i = a_i / max(smoothing, ||x_i - z||). Stops when the objective improves by less than
    ``tolerance`` relative. Returns (median, iterations)."""
    weights = np.ones(len(points)) if weights is None else np.asarray(weights, dtype=np.float64)
    median = weights @ points / weights.sum()

    def objective(z: np.ndarray) -> float:
        return float(weights @ np.linalg.norm(points - z, axis=1))

    value = objective(median)
    for iteration in range(1, max_iterations + 1):
        coefficients = weights / np.maximum(smoothing, np.linalg.norm(points - median, axis=1))
        median = coefficients @ points / coefficients.sum()
        new_value = objective(median)
        if value - new_value <= tolerance * new_value:
            return median, iteration
        value = new_value
    return median, max_iterations
