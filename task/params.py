"""Model states as flat vectors: the form distance- and coordinate-based rules work on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

State = Mapping[str, np.ndarray]


def flatten_updates(states: Sequence[State], global_state: State) -> tuple[np.ndarray, list[str]]:
    """(n, d) float64 matrix of the updates of the float arrays, and the array names in order."""
    names = [k for k, v in global_state.items() if v.dtype.kind == "f"]
    rows = [np.concatenate([(s[k].astype(np.float64) - global_state[k]).ravel() for k in names])
            for s in states]
    return np.stack(rows), names


def unflatten(vector: np.ndarray, names: list[str], global_state: State) -> State:
    """w_g + vector, split back into the named arrays; integer buffers keep the global values."""
    out, offset = dict(global_state), 0
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
