"""Views of the round's updates beside the heat maps: one robust score per client and view.

Each view turns the (K, D) matrix of updates Delta_i = w_i - w_global into one number per client,
and ``view_scores`` makes it a signed robust score z = (x - median) / (1.4826 MAD) over the
round's clients, oriented so that a large positive z is suspicious:

- ``norm``: log ||Delta_i||. Boosted (model replacement) and noise uploads are long.
- ``direction``: 1 - cos(Delta_i, m), m the coordinate-wise median update: a robust centre
  that more than half the clients would have to move. Sign-flip and random directions point
  away from it.
- ``outside-range``: the share of ||Delta_i - m||^2 that lies in coordinates where Delta_i is
  beyond ``RANGE_WIDTH`` robust standard deviations of that coordinate's values. A benign
  client's distance is spread over many coordinates; an upload that writes large values into
  a few coordinates the benign clients leave small (the GAE's graph coordinates) has most of
  its distance there.
- ``collusion``: log(median nearest-neighbour distance / own nearest-neighbour distance).
  Clients that upload one crafted model (ALIE, IPM, Min-Max, Min-Sum) sit far closer to each
  other than independent benign clients do.

The views are pure functions of the numbers, so they are tested on crafted rounds without
Flower; ``strategies.layercam_ae`` fuses them with the heat maps' evidence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from strategies.detection.thresholds import MAD_TO_STD, robust_z
from task.params import row_norms

RANGE_WIDTH = 4.0
"""Robust standard deviations from the coordinate's median beyond which a value is outside
the round's range (``outside-range``)."""

TINY = 1e-12


def norm_view(updates: np.ndarray, norms: np.ndarray | None = None) -> np.ndarray:
    """log ||Delta_i|| (a zero update scores as the smallest float's log, never -inf);
    ``norms``: the rows' norms, when the caller has them."""
    return np.log(np.maximum(row_norms(updates) if norms is None else norms, TINY))


def direction_view(updates: np.ndarray, centre: np.ndarray,
                   norms: np.ndarray | None = None) -> np.ndarray:
    """1 - cos(Delta_i, m): 0 along the median update, 1 orthogonal to it, 2 against it."""
    norms = (row_norms(updates) if norms is None else norms) * np.linalg.norm(centre)
    return 1.0 - (updates @ centre) / np.maximum(norms, TINY)


def outside_range_view(updates: np.ndarray, centre: np.ndarray,
                       width: float = RANGE_WIDTH) -> np.ndarray:
    """Share of ||Delta_i - m||^2 in the coordinates where |Delta_ij - m_j| > width * sigma_j,
    sigma_j = 1.4826 MAD of coordinate j over the clients (ties: the mean absolute deviation).
    Computed a block of coordinates at a time: the temporaries stay small for any model."""
    outside, total = np.zeros(len(updates)), np.zeros(len(updates))
    for block in column_blocks(updates):
        deviations = updates[:, block] - centre[block]
        magnitude = np.abs(deviations)
        sigma = MAD_TO_STD * column_median(magnitude)
        sigma = np.where(sigma > 0, sigma, magnitude.mean(axis=0))
        squared = deviations ** 2
        outside += np.where(magnitude > width * sigma, squared, 0.0).sum(axis=1)
        total += squared.sum(axis=1)
    return outside / np.maximum(total, TINY)


BLOCK_VALUES = 1 << 16
"""Values (K x columns) per block of ``column_blocks``: 512 KB of float64, so that a block's
several passes (deviation, magnitude, sort, square) stay in the CPU's cache."""


def column_blocks(updates: np.ndarray) -> list[slice]:
    """Slices of the coordinates, each holding at most ``BLOCK_VALUES`` values of ``updates``."""
    width = max(1, BLOCK_VALUES // max(1, len(updates)))
    return [slice(start, start + width) for start in range(0, updates.shape[1], width)]


def column_median(values: np.ndarray) -> np.ndarray:
    """``np.median(values, axis=0)`` for finite values, through one sort along the rows: numpy
    sorts the K values of every column together, several times faster than its median's
    partition along that strided axis, with the same arithmetic (the two middle values'
    mean for an even K)."""
    ordered = np.sort(values, axis=0)
    middle = len(values) // 2
    return ordered[middle] if len(values) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


def coordinate_median(updates: np.ndarray) -> np.ndarray:
    """The coordinate-wise median update, a block at a time (the sort copies its input)."""
    centre = np.empty(updates.shape[1])
    for block in column_blocks(updates):
        centre[block] = column_median(updates[:, block])
    return centre


def nearest_distances(updates: np.ndarray) -> np.ndarray:
    """Each update's distance to its nearest other update (via the Gram matrix)."""
    gram = updates @ updates.T
    squared = np.diag(gram)[:, None] + np.diag(gram)[None, :] - 2.0 * gram
    np.fill_diagonal(squared, np.inf)
    return np.sqrt(np.maximum(squared.min(axis=1), 0.0))


def collusion_view(updates: np.ndarray) -> np.ndarray:
    """log(median_j nn_j / nn_i), nn_i the distance to the client's nearest other upload:
    identical uploads score the largest finite value the floor allows."""
    nearest = nearest_distances(updates)
    scale = float(np.median(nearest))
    floor = max(scale, TINY) * 1e-6
    return np.log(max(scale, TINY) / np.maximum(nearest, floor))


VIEWS: dict[str, Callable[..., np.ndarray]] = {
    "norm": lambda updates, centre, norms=None: norm_view(updates, norms),
    "direction": direction_view,
    "outside-range": lambda updates, centre, norms=None: outside_range_view(updates, centre),
    "collusion": lambda updates, centre, norms=None: collusion_view(updates),
}
"""Every view by its run-config name; each takes the updates, their coordinate-wise median and,
optionally, the updates' norms (``row_norms``) when the caller has them."""

VIEW_TAILS: dict[str, float] = {"norm": 1.0, "direction": 1.0, "outside-range": 2.0, "collusion": 1.0}
"""Each view's cut is ``layercam-ae-view-z`` times its factor. Under non-IID data a benign client
whose classes few others hold writes much of its update into coordinates the others leave
small, so the outside-range view's benign tail is wider than the others' (measured in
docs/defense-in-depth.md); a GAE upload's share lies far beyond either."""


def view_scores(updates: np.ndarray, views: Sequence[str],
                norms: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Each named view's signed robust score per client (rows of ``updates``; ``norms``: their
    norms, when the caller has them). Needs K >= 3: with two clients there is no majority to
    be robust with."""
    if len(updates) < 3:
        return {view: np.zeros(len(updates)) for view in views}
    centre = coordinate_median(updates)
    norms = row_norms(updates) if norms is None else norms
    return {view: robust_z(VIEWS[view](updates, centre, norms)) for view in views}


def norm_bound(norms: np.ndarray, z: float) -> float:
    """exp(median + z * 1.4826 MAD) of the log of the updates' ``norms`` (``row_norms``): the
    norm of a client ``z`` robust standard deviations above the round's median (z = 0: the
    median norm). Attackers who are a minority move neither the median nor the MAD far,
    however long their uploads."""
    logs = np.log(np.maximum(norms, TINY))
    centre = float(np.median(logs))
    return float(np.exp(centre + z * MAD_TO_STD * float(np.median(np.abs(logs - centre)))))
