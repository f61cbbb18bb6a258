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
from concurrent.futures import ThreadPoolExecutor

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
    sigma_j = 1.4826 MAD of coordinate j over the clients around m_j (ties: the mean absolute
    deviation). Computed a block of coordinates at a time: the temporaries stay small for any
    model."""
    sums = [outside_sums(updates[:, block], np.sort(updates[:, block], axis=0), centre[block],
                         width) for block in column_blocks(updates)]
    return outside_share(sums, len(updates))


def outside_sums(values: np.ndarray, ordered: np.ndarray, centre: np.ndarray,
                 width: float) -> tuple[np.ndarray, np.ndarray]:
    """Per client, the squared deviation from ``centre`` outside the range, and all of it, over
    one block of coordinates (``values``; ``ordered``: the same sorted along the rows, which
    this overwrites)."""
    deviations = values - centre
    sigma = MAD_TO_STD * sorted_median_deviation(ordered, centre)
    tied = sigma == 0
    if tied.any():
        sigma[tied] = np.abs(deviations[:, tied]).mean(axis=0)
    outside = np.abs(deviations) > width * sigma
    squared = np.multiply(deviations, deviations, out=deviations)
    total = squared.sum(axis=1)
    squared *= outside
    return squared.sum(axis=1), total


def outside_share(sums: Sequence[tuple[np.ndarray, np.ndarray]], clients: int) -> np.ndarray:
    """The blocks' ``outside_sums`` added in order, as a share of each client's distance."""
    outside, total = np.zeros(clients), np.zeros(clients)
    for block_outside, block_total in sums:
        outside += block_outside
        total += block_total
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
    return sorted_median(np.sort(values, axis=0))


def sorted_median(ordered: np.ndarray) -> np.ndarray:
    """The median of every column of ``ordered`` (sorted along the rows), a new array."""
    middle = len(ordered) // 2
    return (ordered[middle].copy() if len(ordered) % 2
            else 0.5 * (ordered[middle - 1] + ordered[middle]))


def coordinate_median(updates: np.ndarray) -> np.ndarray:
    """The coordinate-wise median update, a block at a time (the sort copies its input)."""
    centre = np.empty(updates.shape[1])
    for block in column_blocks(updates):
        centre[block] = column_median(updates[:, block])
    return centre


def kth_deviation(deviations: np.ndarray, k: int) -> np.ndarray:
    """The k-th smallest (k from 1) of every column of ``deviations`` = |x - c_j|, its rows in
    the order of the sorted x, without sorting them: the k values nearest c_j are k
    consecutive ones of the sorted column, and any k consecutive values reach at least that
    deviation at one of their two ends, so it is the least, over windows, of the larger end."""
    return np.maximum(deviations[:len(deviations) - k + 1], deviations[k - 1:]).min(axis=0)


def sorted_median_deviation(ordered: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """``column_median(np.abs(values - centre))`` from the values' sorted columns ``ordered``
    (overwritten): the same numbers, each one of the |x - c_j|, the two middle ones averaged
    alike."""
    deviations = np.abs(np.subtract(ordered, centre, out=ordered), out=ordered)
    count = len(ordered)
    if count % 2:
        return kth_deviation(deviations, count // 2 + 1)
    return 0.5 * (kth_deviation(deviations, count // 2)
                  + kth_deviation(deviations, count // 2 + 1))


def median_and_outside_range(updates: np.ndarray, width: float = RANGE_WIDTH,
                             workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``coordinate_median(updates)`` and ``outside_range_view(updates, that median, width)``
    with one sort of each block of coordinates (the median and the MAD both come from it),
    the blocks shared among ``workers`` threads (numpy's sort and arithmetic release the GIL).
    The blocks' sums add in order, so the result is the same for any ``workers`` and equal to
    the two functions' to the last bit."""
    def one_block(block: slice) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        values = updates[:, block]
        ordered = np.sort(values, axis=0)
        centre = sorted_median(ordered)
        return centre, outside_sums(values, ordered, centre, width)

    blocks = column_blocks(updates)
    if workers > 1 and len(blocks) > 1:
        with ThreadPoolExecutor(min(workers, len(blocks))) as pool:
            parts = list(pool.map(one_block, blocks))
    else:
        parts = [one_block(block) for block in blocks]
    return (np.concatenate([centre for centre, _ in parts]),
            outside_share([sums for _, sums in parts], len(updates)))


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


def view_scores(updates: np.ndarray, views: Sequence[str], norms: np.ndarray | None = None,
                workers: int = 1) -> dict[str, np.ndarray]:
    """Each named view's signed robust score per client (rows of ``updates``; ``norms``: their
    norms, when the caller has them), the coordinate pass shared among ``workers`` threads.
    Needs K >= 3: with two clients there is no majority to be robust with."""
    if len(updates) < 3:
        return {view: np.zeros(len(updates)) for view in views}
    if "outside-range" in views:
        centre, outside = median_and_outside_range(updates, workers=workers)
    else:
        centre, outside = coordinate_median(updates), None
    norms = row_norms(updates) if norms is None else norms
    return {view: robust_z(outside if view == "outside-range" else
                           VIEWS[view](updates, centre, norms)) for view in views}


def norm_bound(norms: np.ndarray, z: float) -> float:
    """exp(median + z * 1.4826 MAD) of the log of the updates' ``norms`` (``row_norms``): the
    norm of a client ``z`` robust standard deviations above the round's median (z = 0: the
    median norm). Attackers who are a minority move neither the median nor the MAD far,
    however long their uploads."""
    logs = np.log(np.maximum(norms, TINY))
    centre = float(np.median(logs))
    return float(np.exp(centre + z * MAD_TO_STD * float(np.median(np.abs(logs - centre)))))
