"""Model states as flat vectors: the form distance- and coordinate-based rules work on."""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections.abc import Mapping, Sequence

import numpy as np

State = Mapping[str, np.ndarray]


def float_names(global_state: State) -> list[str]:
    """Names of the floating-point arrays: the coordinates an update moves (integer buffers such
    as BatchNorm's ``num_batches_tracked`` are not updates)."""
    return [k for k, v in global_state.items() if v.dtype.kind == "f"]


BATCHNORM_STATISTICS = ("running_mean", "running_var")
"""The float buffers of torch's BatchNorm (the last part of an array's name): statistics of the
data the model has seen, not weights. Noise or a boost meant for the weights would make a
variance negative (the screening rejects it; ``strategies.validation``)."""


def is_batchnorm_statistic(name: str) -> bool:
    """Whether the array ``name`` is one of BatchNorm's running statistics."""
    return name.rpartition(".")[2] in BATCHNORM_STATISTICS


def integer_arrays(state: State) -> dict[str, np.ndarray]:
    """The state's integer arrays (BatchNorm's ``num_batches_tracked``): no update moves them;
    each client counts its own batches into them."""
    return {k: v for k, v in state.items() if v.dtype.kind in "iu"}


def median_integer_arrays(states: Sequence[State], template: State) -> dict[str, np.ndarray]:
    """Each integer array of ``template``, as the coordinate-wise median of the ``states``',
    rounded, in its dtype."""
    return {name: np.asarray(np.rint(np.median(np.stack([s[name] for s in states]), axis=0)))
            .astype(value.dtype) for name, value in integer_arrays(template).items()}


def columns_of(global_state: State, names: Sequence[str]) -> tuple[slice, ...]:
    """The columns the named float arrays take in the update matrix (``float_names`` order:
    ``flatten_updates``, ``StateColumns``), in that order."""
    names_in_order = float_names(global_state)
    starts = dict(zip(names_in_order,
                      itertools.accumulate((global_state[k].size for k in names_in_order),
                                           initial=0)))
    missing = [k for k in names if k not in starts]
    if missing:
        raise ValueError(f"no float arrays named {missing} in the state")
    return tuple(slice(starts[k], starts[k] + global_state[k].size)
                 for k in sorted(names, key=starts.__getitem__))


def flat(state: State, names: Sequence[str]) -> np.ndarray:
    """The named arrays of ``state`` as one float64 vector."""
    return np.concatenate([np.asarray(state[k], dtype=np.float64).ravel() for k in names])


def gather(state: State, names: Sequence[str], indices: np.ndarray) -> np.ndarray:
    """``flat(state, names)[indices]`` (float64) without flattening the whole state: only the
    arrays the sorted ``indices`` fall in are read."""
    sizes = [state[k].size for k in names]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    where = np.searchsorted(offsets, indices, side="right") - 1
    out = np.empty(len(indices))
    for array in np.unique(where):
        mask = where == array
        out[mask] = np.asarray(state[names[array]]).ravel()[indices[mask] - offsets[array]]
    return out


def row_norms(vectors: np.ndarray) -> np.ndarray:
    """||v_i|| of every row, without the squared copy ``np.linalg.norm`` makes."""
    return np.sqrt(np.einsum("ij,ij->i", vectors, vectors))


def update_norms(states: Sequence[State], global_state: State) -> np.ndarray:
    """||w_i - w_global|| of each state's float arrays, in float64 (the norms of
    ``flatten_updates``' rows), an array at a time: no (n, d) matrix of the updates is made."""
    names = float_names(global_state)
    squares = np.zeros(len(states))
    for row, state in enumerate(states):
        for name in names:
            difference = np.subtract(np.asarray(state[name]).ravel(),
                                     np.asarray(global_state[name]).ravel(), dtype=np.float64)
            squares[row] += np.dot(difference, difference)
    return np.sqrt(squares)


def flatten_updates(states: Sequence[State], global_state: State) -> tuple[np.ndarray, list[str]]:
    """(n, d) float64 matrix of the updates of the float arrays, and the array names in order.
    Each difference is written straight into its row (float64 before subtracting, as
    ``flat(s) - flat(global_state)`` would), with no per-client temporaries."""
    names = float_names(global_state)
    sizes = [global_state[k].size for k in names]
    updates = np.empty((len(states), sum(sizes)))
    for row, state in zip(updates, states):
        offset = 0
        for name, size in zip(names, sizes):
            np.subtract(np.asarray(state[name]).ravel(), np.asarray(global_state[name]).ravel(),
                        out=row[offset:offset + size], dtype=np.float64)
            offset += size
    return updates, names


class StateColumns:
    """The states' float arrays as the rows of an (n, d) matrix, in name order and in the
    arrays' common dtype (float32 for float32 models), read a block of columns at a time
    (``columns``): nothing ever holds the matrix whole, so no round allocates (and
    page-faults in) a copy of every upload. ``origin``: the global state's arrays as one
    vector in that dtype. ``strategies.detection.update_views.round_sums`` takes the update
    matrix's blocks from it."""

    def __init__(self, states: Sequence[State], global_state: State) -> None:
        names = float_names(global_state)
        self.dtype = (np.result_type(*(global_state[k].dtype for k in names)) if names
                      else np.dtype(np.float64))
        self.starts = [0, *itertools.accumulate(global_state[k].size for k in names)]
        self.shape = (len(states), self.starts[-1])
        self.rows = [[np.asarray(state[k]).reshape(-1) for k in names] for state in states]
        self.origin = (np.concatenate([np.asarray(global_state[k]).ravel() for k in names])
                       .astype(self.dtype) if names else np.zeros(0, self.dtype))

    def columns(self, block: slice) -> np.ndarray:
        """A new (n, width) array: the matrix's columns ``block`` (a slice with a start and a
        stop, step 1)."""
        start, stop = block.start, block.stop
        out = np.empty((self.shape[0], max(0, stop - start)), self.dtype)
        first = bisect.bisect_right(self.starts, start) - 1  # the array holding column ``start``
        for array in range(first, len(self.starts) - 1):
            begin, end = self.starts[array], self.starts[array + 1]
            if begin >= stop:
                break
            low, high = max(start, begin), min(stop, end)
            if low >= high:
                continue
            target, source = slice(low - start, high - start), slice(low - begin, high - begin)
            for row, arrays in zip(out, self.rows):
                row[target] = arrays[array][source]
        return out


def unflatten(vector: np.ndarray, names: Sequence[str], global_state: State,
              buffers: State | None = None) -> dict[str, np.ndarray]:
    """w_g + vector, split back into the named arrays (in their dtypes): the one way an update
    becomes a state. Arrays without an update (integer buffers) come from ``buffers`` (default:
    the global state)."""
    out, offset = dict(buffers if buffers is not None else global_state), 0
    for k in names:
        size = global_state[k].size
        out[k] = (global_state[k] + vector[offset : offset + size].reshape(global_state[k].shape)
                  ).astype(global_state[k].dtype)
        offset += size
    return out


def squared_distances(updates: np.ndarray) -> np.ndarray:
    """(n, n) matrix of ||Delta_i - Delta_j||^2 via the Gram matrix (no n x n x d tensor)."""
    norms = np.einsum("ij,ij->i", updates, updates)
    return np.maximum(norms[:, None] + norms[None, :] - 2.0 * updates @ updates.T, 0.0)


SAMPLED_VALUES = 4096
"""Values per array that ``content_key`` reads (evenly strided)."""


def content_key(state: State) -> bytes:
    """A digest of what a state holds, independent of who sent it or when: the order in which
    a round's uploads are summed (aggregate, autoencoder) follows it, so that the same uploads
    give the same bits whatever Flower's (random) node ids and the arrival order. It reads up
    to ``SAMPLED_VALUES`` evenly strided values per array, so its cost does not grow with the
    model; identical uploads tie, and their order cannot change a sum."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        values = np.ascontiguousarray(np.asarray(state[name]).ravel())
        step = max(1, values.size // SAMPLED_VALUES)
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(values[::step]).tobytes())
    return digest.digest()
