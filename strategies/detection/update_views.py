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
- ``head-direction``: ``direction`` over the output layer's
  coordinates alone (``task.models.output_layer_names``). Training on flipped labels turns the
  classifier head's update against the others' while the rest of the model, most of the
  coordinates, still learns the images' features.

Every view reduces to a few sums over the coordinates (``RoundSums``: the norms, the dot
products with m, the distances from m inside and outside the range, the Gram matrix), so the
server adds them up a block of coordinates at a time (``round_sums``), in the model's own dtype,
and never holds the update matrix whole. The views are pure functions of the numbers, so they
are tested on crafted rounds without Flower; ``strategies.layercam_ae`` fuses them with the heat
maps' evidence.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
from threadpoolctl import ThreadpoolController

from strategies.detection.thresholds import MAD_TO_STD, robust_z
from strategies.detection.worker_pools import worker_pool
from task.params import StateColumns, row_norms

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
    return cosine_distance(updates @ centre, row_norms(updates) if norms is None else norms,
                           float(np.linalg.norm(centre)))


def cosine_distance(dots: np.ndarray, norms: np.ndarray, centre_norm: float) -> np.ndarray:
    """1 - Delta_i . m / (||Delta_i|| ||m||) from the dot products and the norms."""
    return 1.0 - dots / np.maximum(norms * centre_norm, TINY)


def outside_range_view(updates: np.ndarray, centre: np.ndarray,
                       width: float = RANGE_WIDTH) -> np.ndarray:
    """Share of ||Delta_i - m||^2 in the coordinates where |Delta_ij - m_j| > width * sigma_j,
    sigma_j = 1.4826 MAD of coordinate j over the clients around m_j (ties: the mean absolute
    deviation). Computed a block of coordinates at a time: the temporaries stay small for any
    model."""
    outside, distance = np.zeros(len(updates)), np.zeros(len(updates))
    for block in column_blocks(updates):
        block_outside, block_distance = outside_sums(
            updates[:, block], np.sort(updates[:, block], axis=0), centre[block], width)
        outside += block_outside
        distance += block_distance
    return outside / np.maximum(distance, TINY)


def outside_sums(values: np.ndarray, ordered: np.ndarray, centre: np.ndarray,
                 width: float) -> tuple[np.ndarray, np.ndarray]:
    """Per client, over this block of ``values``, the sum of (x_ij - c_j)^2 over the coordinates
    j where |x_ij - c_j| > width * sigma_j, and over all of them (summed in the values' dtype,
    returned as float64; ``ordered``: the rows sigma is taken over, ``values`` or some of them,
    sorted along the rows, which this overwrites). Only the columns whose smallest or largest
    value is outside the range are masked: in the others no client is."""
    whole = ordered.shape == values.shape
    low, high = ((ordered[0].copy(), ordered[-1].copy()) if whole
                 else (values.min(axis=0), values.max(axis=0)))
    sigma = MAD_TO_STD * sorted_median_deviation(ordered, centre)  # ``ordered``: now |x - c|
    tied = sigma == 0
    if tied.any():
        sigma[tied] = ordered.mean(axis=0)[tied]  # every column's: cheaper than a gather
    reach = width * sigma
    # |x - c| rounds as x - c does, so these are the columns where some |x_ij - c_j| > reach_j
    columns = np.flatnonzero((high - centre > reach) | (centre - low > reach))
    # the sorted deviations are spent: their memory takes the deviations when it can
    deviations = np.subtract(values, centre, out=ordered if whole else None)
    picked = deviations[:, columns]
    outside = np.abs(picked) > reach[columns]
    squared = np.square(deviations, out=deviations)
    np.square(picked, out=picked)
    picked *= outside
    # summed along the rows: numpy's pairwise sum, accurate in float32
    return (picked.sum(axis=1).astype(np.float64), squared.sum(axis=1).astype(np.float64))


BLOCK_BYTES = 1 << 19
"""Bytes (K x columns values) per block of ``column_blocks``: 512 KB, so that a block's several
passes (sort, deviation, magnitude) stay in the CPU's cache."""


MIN_BLOCK_COLUMNS = 256
"""Coordinates per block at least, however many clients: each block adds a K x K Gram matrix."""


def column_blocks(updates: np.ndarray | tuple[int, int], itemsize: int = 8) -> list[slice]:
    """Slices of the coordinates, each holding at most ``BLOCK_BYTES`` of ``updates`` (or of a
    matrix of that shape whose values take ``itemsize`` bytes) and at least
    ``MIN_BLOCK_COLUMNS`` columns."""
    if isinstance(updates, np.ndarray):
        updates, itemsize = updates.shape, updates.itemsize
    clients, columns = updates
    per_block = BLOCK_BYTES // itemsize // max(1, clients)
    width = max(1, min(columns, max(per_block, MIN_BLOCK_COLUMNS)))
    return [slice(start, min(start + width, columns)) for start in range(0, columns, width)]


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


@dataclass
class RoundSums:
    """The sums over the coordinates that every view reduces to, for the round's (K, D)
    updates Delta and their coordinate-wise median m (d = Delta - m): each is a sum of the
    blocks' sums, so no view needs Delta whole."""

    squared_norms: np.ndarray
    """||Delta_i||^2."""
    median_dots: np.ndarray
    """Delta_i . m."""
    median_squared_norm: float
    """||m||^2."""
    outside: np.ndarray | None = None
    """The sum of d_ij^2 over the coordinates where |d_ij| > width * sigma_j (``outside_sums``)."""
    distance: np.ndarray | None = None
    """||d_i||^2."""
    gram: np.ndarray | None = None
    """Delta Delta^T (K x K)."""
    head_squared_norms: np.ndarray | None = None
    """||Delta_i||^2 over the head's coordinates (``head-direction``; not summed by ``add``:
    ``round_sums`` takes them once, the head being a few thousand coordinates)."""
    head_dots: np.ndarray | None = None
    """Delta_i . m over the head's coordinates."""
    head_median_squared_norm: float | None = None
    """||m||^2 over the head's coordinates."""

    def add(self, other: RoundSums) -> None:
        """Add another block's sums to these (in place)."""
        self.squared_norms += other.squared_norms
        self.median_dots += other.median_dots
        self.median_squared_norm += other.median_squared_norm
        for name in ("outside", "distance", "gram"):
            mine = getattr(self, name)
            if mine is not None:
                mine += getattr(other, name)

    @property
    def norms(self) -> np.ndarray:
        """||Delta_i||."""
        return np.sqrt(self.squared_norms)


VIEWS_POOL = "update-views"
"""The ``worker_pool`` the blocks are shared on. ``LayerCamAe`` runs the autoencoder on it too,
so that the views' blocks fill the core it leaves idle."""


@cache
def _thread_pools() -> ThreadpoolController:
    """The process's native thread pools, found once (finding them scans every loaded
    library; limiting them through a found controller does not)."""
    return ThreadpoolController()


BLOCKS_PER_GATHER = 8
"""Consecutive blocks a thread reads from ``weights`` at once: gathering a ``StateColumns``
block takes one Python-level copy per upload and array, under the GIL, so reading eight
blocks' columns together makes eight times fewer of them, and the threads' numpy work
overlaps instead of queueing for the GIL. The threads hold one gather's block sums each
before they are added (each block's sums may hold a K x K Gram matrix)."""


def round_sums(weights: np.ndarray | StateColumns, *, outside: bool = True, gram: bool = True,
               width: float = RANGE_WIDTH, workers: int = 1,
               reference: np.ndarray | None = None, head: Sequence[slice] = ()) -> RoundSums:
    """``RoundSums`` of the (K, D) updates, a block of coordinates at a time: ``weights`` is
    either the updates or a ``StateColumns`` of the uploads, whose updates are their arrays minus
    its ``origin`` (each block gathered from the uploads' arrays, no (K, D) copy made). Each
    block's differences are taken in ``weights``' dtype, at least float32 (float32 for float32
    models: half the bytes to sort and pass over), one sort gives the median and the MAD, and the
    block's sums are added in float64.
    ``outside``/``gram``: the outside-range view's and the collusion view's sums.
    ``head``: the output layer's columns (``task.params.columns_of``), whose sums the
    head-direction view takes (none when empty). ``reference``: the rows the median and each
    coordinate's range are taken over (default: all); the sums are every row's. The blocks,
    ``BLOCKS_PER_GATHER`` consecutive ones a task, are shared among the ``workers`` threads of
    ``worker_pool(VIEWS_POOL)`` (numpy's sort, arithmetic and BLAS release the GIL) and their
    sums added in the blocks' order, so the result is the same for any ``workers``.
    Each block's BLAS calls run on one thread: numpy's BLAS threads on top of the workers would
    oversubscribe the cores (measured in docs/benchmarks.md, "Block sums")."""
    dtype = np.promote_types(weights.dtype, np.float32)  # float16 sums would overflow

    if isinstance(weights, StateColumns):
        read, origin = weights.columns, weights.origin
    else:
        read, origin = (lambda block: weights[:, block]), None

    def blocks_sums(group: list[slice]) -> list[RoundSums]:
        start = group[0].start
        columns = read(slice(start, group[-1].stop))
        return [one_block(columns[:, b.start - start:b.stop - start], b) for b in group]

    def one_block(part: np.ndarray, block: slice) -> RoundSums:
        values = (part.astype(dtype, copy=False) if origin is None
                  else np.subtract(part, origin[block], dtype=dtype))
        ordered = np.sort(values if reference is None else values[reference], axis=0)
        centre = sorted_median(ordered)
        products = values @ values.T if gram else None
        squares = (np.diag(products) if gram  # the Gram's diagonal: no second pass
                   else np.einsum("ij,ij->i", values, values))
        sums = RoundSums(squares.astype(np.float64), (values @ centre).astype(np.float64),
                         float(np.dot(centre, centre)),
                         gram=None if products is None else products.astype(np.float64))
        if outside:  # last: overwrites ``ordered``
            sums.outside, sums.distance = outside_sums(values, ordered, centre, width)
        return sums

    clients = weights.shape[0]
    blocks = column_blocks(weights.shape, dtype.itemsize)
    total = RoundSums(np.zeros(clients), np.zeros(clients), 0.0,
                      np.zeros(clients) if outside else None,
                      np.zeros(clients) if outside else None,
                      np.zeros((clients, clients)) if gram else None)
    groups = [blocks[i:i + BLOCKS_PER_GATHER] for i in range(0, len(blocks), BLOCKS_PER_GATHER)]
    with _thread_pools().limit(limits=1, user_api="blas"):
        if workers > 1 and len(groups) > 1:
            pool = worker_pool(VIEWS_POOL, workers)
            summed = itertools.chain.from_iterable(
                pool.map(blocks_sums, groups[start:start + workers])
                for start in range(0, len(groups), workers))
        else:
            summed = map(blocks_sums, groups)
        for parts in summed:  # in the blocks' order
            for part in parts:
                total.add(part)
    if head:
        values = np.concatenate([read(columns) if origin is None
                                 else np.subtract(read(columns), origin[columns], dtype=dtype)
                                 for columns in head], axis=1).astype(dtype, copy=False)
        centre = column_median(values if reference is None else values[reference])
        total.head_squared_norms = np.einsum("ij,ij->i", values, values).astype(np.float64)
        total.head_dots = (values @ centre).astype(np.float64)
        total.head_median_squared_norm = float(np.dot(centre, centre))
    return total


def scores_from_sums(sums: RoundSums, views: Sequence[str],
                     reference: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Each named view's signed robust score per client, from the round's ``RoundSums``;
    ``reference``: the clients each view's median and spread are taken over (default: all,
    and the sums' centre should be theirs). Needs K >= 3: with two clients there is no
    majority to be robust with."""
    norms = sums.norms
    if len(norms) < 3:
        return {view: np.zeros(len(norms)) for view in views}
    values = {
        "norm": lambda: np.log(np.maximum(norms, TINY)),
        "direction": lambda: cosine_distance(sums.median_dots, norms,
                                             float(np.sqrt(sums.median_squared_norm))),
        "outside-range": lambda: sums.outside / np.maximum(sums.distance, TINY),
        "collusion": lambda: collusion_from_nearest(nearest_from_gram(sums.gram), reference),
        "head-direction": lambda: cosine_distance(
            sums.head_dots, np.sqrt(sums.head_squared_norms),
            float(np.sqrt(sums.head_median_squared_norm))),
    }
    if "head-direction" in views and sums.head_dots is None:
        raise ValueError("the head-direction view needs the sums over the output layer's "
                         "columns (round_sums' head)")
    return {view: robust_z(values[view](), reference) for view in views}


def nearest_distances(updates: np.ndarray) -> np.ndarray:
    """Each update's distance to its nearest other update (via the Gram matrix)."""
    return nearest_from_gram(updates @ updates.T)


def nearest_from_gram(gram: np.ndarray) -> np.ndarray:
    """Each row's distance to its nearest other row, from their Gram matrix."""
    squared = np.diag(gram)[:, None] + np.diag(gram)[None, :] - 2.0 * gram
    np.fill_diagonal(squared, np.inf)
    return np.sqrt(np.maximum(squared.min(axis=1), 0.0))


def collusion_view(updates: np.ndarray) -> np.ndarray:
    """log(median_j nn_j / nn_i), nn_i the distance to the client's nearest other upload:
    identical uploads score the largest finite value the floor allows."""
    return collusion_from_nearest(nearest_distances(updates))


def collusion_from_nearest(nearest: np.ndarray, reference: np.ndarray | None = None
                           ) -> np.ndarray:
    """``collusion_view`` from the nearest-neighbour distances (the median over ``reference``
    when given)."""
    scale = float(np.median(nearest if reference is None else nearest[reference]))
    floor = max(scale, TINY) * 1e-6
    return np.log(max(scale, TINY) / np.maximum(nearest, floor))


def head_direction_view(updates: np.ndarray, centre: np.ndarray, head: Sequence[slice]
                        ) -> np.ndarray:
    """``direction_view`` over the ``head`` columns alone (the median's restriction to them is
    their own coordinate-wise median)."""
    if not head:
        raise ValueError("the head-direction view needs the output layer's columns")
    columns = np.r_[tuple(head)]
    return direction_view(updates[:, columns], centre[columns])


VIEWS: dict[str, Callable[..., np.ndarray]] = {
    "norm": lambda updates, centre, norms=None, head=(): norm_view(updates, norms),
    "direction": lambda updates, centre, norms=None, head=(): direction_view(updates, centre,
                                                                              norms),
    "outside-range": lambda updates, centre, norms=None, head=(): outside_range_view(updates,
                                                                                     centre),
    "collusion": lambda updates, centre, norms=None, head=(): collusion_view(updates),
    "head-direction": lambda updates, centre, norms=None, head=(): head_direction_view(
        updates, centre, head),
}
"""Every view by its run-config name; each takes the updates, their coordinate-wise median and,
optionally, the updates' norms (``row_norms``) when the caller has them and the output layer's
columns (``head``, which head-direction needs)."""

VIEW_TAILS: dict[str, float] = {"norm": 1.0, "direction": 1.0, "outside-range": 2.0, "collusion": 1.0,
                                "head-direction": 1.0}
"""Each view's cut is ``layercam-ae-view-z`` times its factor. Under non-IID data a benign client
whose classes few others hold writes much of its update into coordinates the others leave
small, so the outside-range view's benign tail is wider than the others' (measured in
docs/defense-in-depth.md); a GAE upload's share lies far beyond either."""


def view_excess(relative: np.ndarray, pair: float) -> np.ndarray:
    """How far past the cuts each client's views are, from ``relative`` (views x clients: each
    view's score over its cut): the largest, or the second largest over ``pair``, whichever is
    more. Above 1 the upload is excluded: one view past its cut, or two sides agreeing, each
    past ``pair`` of its cut (``pair`` = 1: the largest alone)."""
    ordered = np.sort(relative, axis=0)
    if len(ordered) < 2:
        return ordered[-1] if len(ordered) else np.zeros(relative.shape[1])
    return np.maximum(ordered[-1], ordered[-2] / pair)


VIEW_SIDES: dict[str, str] = {"head-direction": "direction"}
"""Views that measure part of another view's quantity, by the side they count as in the pair
rule. The head's direction is part of the whole update's direction: a benign client whose
update points away from the median does so in its head too, so the two agreeing is one side
seen twice, not two sides (docs/defense-in-depth.md, "The head's direction")."""


def views_excess(scores: dict[str, np.ndarray], view_z: float, pair: float) -> np.ndarray:
    """``view_excess`` of the views' ``scores``, each over its cut ``view_z`` x ``VIEW_TAILS``;
    the views of one side (``VIEW_SIDES``) count once, by the larger."""
    sides: dict[str, np.ndarray] = {}
    for view, z in scores.items():
        relative = z / (view_z * VIEW_TAILS[view])
        side = VIEW_SIDES.get(view, view)
        sides[side] = np.maximum(sides[side], relative) if side in sides else relative
    return view_excess(np.stack(list(sides.values())), pair)


def judge_views(first: RoundSums, views: Sequence[str], view_z: float, pair: float,
                again: Callable[[np.ndarray], RoundSums] | None = None,
                margin: float = float("inf")
                ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Each client's view scores and excess (``views_excess``; above 1: excluded), from the
    round's ``first`` sums. With ``again``, the clients this first judgement excludes are
    judged a second time, against the clients it keeps (the reference): ``again(reference)``
    returns every row's sums with the centre and each coordinate's range taken over the
    reference rows (the Gram matrix is ``first``'s), and each view's median and spread are the
    reference's. Excluded uploads then no longer shape the scale they are judged on: identical
    crafted uploads (Min-Max, Min-Sum) sit at one value in every coordinate and shrink it,
    pushing an honest client with a rare class mix past the outside-range cut; judged again,
    it is readmitted. The second judgement only readmits: a client the first keeps stays kept
    (against the narrower scale of the kept alone, the benign tail would cross the cuts more
    often). Only the excluded clients whose first excess is at most ``margin`` are judged
    again: the excluded uploads move the scale by a factor that grows with their share
    (measured in docs/defense-in-depth.md), and a client far past its cuts is not one they
    pushed over (nor one a narrower reference should let back in); when no excluded client is
    within the margin, the second pass over the uploads is not made. Not when the first judgement excludes more than half the clients (the
    rest is no majority) or leaves fewer than three. Returns the scores and the excess (those
    of the clients judged again from the second judgement), the clients judged again and the
    first judgement's excess."""
    scores = scores_from_sums(first, views)
    excess = views_excess(scores, view_z, pair)
    judged_once = excess.copy()
    excluded = excess > 1.0
    aside = excluded & (excess <= margin)
    reference = np.flatnonzero(~excluded)
    if again is None or not aside.any() or len(reference) < max(3, len(excess) / 2):
        return scores, excess, np.zeros(len(excess), dtype=bool), judged_once
    sums = again(reference)
    sums.gram = first.gram
    second = scores_from_sums(sums, views, reference)
    for view, values in second.items():
        scores[view][aside] = values[aside]
    excess[aside] = views_excess(second, view_z, pair)[aside]
    return scores, excess, aside, judged_once


def view_scores(updates: np.ndarray, views: Sequence[str], workers: int = 1,
                head: Sequence[slice] = ()) -> dict[str, np.ndarray]:
    """Each named view's signed robust score per client (rows of ``updates``), through
    ``round_sums`` (zero with fewer than three clients); ``head``: the output layer's
    columns (head-direction)."""
    if len(updates) < 3:  # no majority to be robust with (and no median of no rows)
        return {view: np.zeros(len(updates)) for view in views}
    sums = round_sums(updates, outside="outside-range" in views, gram="collusion" in views,
                      workers=workers, head=head if "head-direction" in views else ())
    return scores_from_sums(sums, views)


def norm_bound(norms: np.ndarray, z: float) -> float:
    """exp(median + z * 1.4826 MAD) of the log of the updates' ``norms`` (``row_norms``): the
    norm of a client ``z`` robust standard deviations above the round's median (z = 0: the
    median norm). Attackers who are a minority move neither the median nor the MAD far,
    however long their uploads."""
    logs = np.log(np.maximum(norms, TINY))
    centre = float(np.median(logs))
    return float(np.exp(centre + z * MAD_TO_STD * float(np.median(np.abs(logs - centre)))))
