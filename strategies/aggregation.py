"""Sample-size-weighted averaging (FedAvg) of the kept models, LayerCAM-AE eq. (16)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from strategies.records import ClientUpload
from task.params import State, flatten_updates, median_integer_arrays, unflatten, update_norms


def weighted_average(uploads: Sequence[ClientUpload]) -> dict[str, np.ndarray]:
    """Average the uploads' arrays weighted by ``num_examples`` (D_l / S in eq. 16).

    Float arrays keep their dtype (accumulated in float64); integer buffers such as BatchNorm's
    ``num_batches_tracked`` are averaged and rounded back to their dtype (a round's model takes
    them from ``counted_buffers`` instead: ``DetectingFedAvg.round_end_state``). Never called
    with an empty set: the caller keeps the previous global model instead.
    """
    if not uploads:
        raise ValueError("cannot aggregate an empty set of models")
    weights = np.array([u.num_examples for u in uploads], dtype=np.float64)
    weights /= weights.sum()
    out: dict[str, np.ndarray] = {}
    for name, first in uploads[0].arrays.items():
        total = np.zeros(first.shape, dtype=np.float64)
        for weight, upload in zip(weights, uploads):
            total += weight * upload.arrays[name]
        out[name] = (total.astype(first.dtype) if first.dtype.kind == "f"
                     else np.asarray(np.rint(total)).astype(first.dtype))  # 0-d stays an array
    return out


def counted_buffers(uploads: Sequence[ClientUpload], global_state: State) -> dict[str, np.ndarray]:
    """The integer arrays of the next global model (BatchNorm's ``num_batches_tracked``): each
    the coordinate-wise median of the round's screened uploads, rounded. They count batches and
    are no update, so no view or distance sees them, and a rule's kept set (Krum keeps one
    upload) may be an attacker's: a mean or a single upload let one client drive the count to
    the screening's cap of 2^53, past which every honest upload (the count plus its own
    batches) is rejected. The median moves only with most of the round's clients."""
    return median_integer_arrays([u.arrays for u in uploads], global_state)


def clipped_to(uploads: Sequence[ClientUpload], global_state: State, bound: float,
               norms: Mapping[int, float] | None = None) -> list[ClientUpload]:
    """The uploads with every update w - w_global longer than ``bound`` scaled down to it
    (float arrays; integer buffers as uploaded). Scaling towards w_global keeps BatchNorm
    variances positive: each clipped value lies between the global's and the upload's.
    ``norms``: each node's ||w - w_global||, when the caller has them. Only the uploads to clip
    are flattened."""
    if norms is None:
        norms = dict(zip((u.node_id for u in uploads),
                         update_norms([u.arrays for u in uploads], global_state).tolist()))
    out = []
    for upload in uploads:
        norm = norms[upload.node_id]
        if norm > bound:
            update, names = flatten_updates([upload.arrays], global_state)
            arrays = unflatten(update[0] * (bound / norm), names, global_state,
                               buffers=upload.arrays)
            upload = dataclasses.replace(upload, arrays=arrays)
        out.append(upload)
    return out
