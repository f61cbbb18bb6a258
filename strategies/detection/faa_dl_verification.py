"""The math of FAA-DL's anomaly detection and verification, free of Flower.

- ``ocsvm_suspects``: section IV-B, a One-Class SVM (RBF kernel, nu = 0.5, equations 9-17)
  over the updates g_i = w_i - w; its outliers are the suspects G'_m.
- ``recompute_update`` and ``relative_mismatch``: Algorithm 1, lines 12-16: the server trains
  the global model on the suspect's (decrypted) data exactly as the client claims to have
  trained, and compares g'_i with g_i.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.svm import OneClassSVM
from torch import nn

from task.data import ImageData
from task.params import State, flatten_updates
from task.train import load_numpy_state, state_to_numpy, train


SOLVER_TOLERANCE = 1e-10
"""libsvm's stopping tolerance: at its default (1e-3) the scores move with the order of the
rows, enough to move clients across the boundary (docs/defenses.md)."""


def canonical_order(rows: np.ndarray) -> np.ndarray:
    """A permutation that sorts the rows by their content (norm, then the values): the same
    set of rows in any order gives the same sorted matrix."""
    return np.lexsort((*rows.T[::-1], np.linalg.norm(rows, axis=1)))


def ocsvm_suspects(updates: np.ndarray, nu: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(suspect mask, anomaly scores) of the rows of ``updates`` (n x d); scores are the
    negated OC-SVM decision function, > 0 outside the learned boundary (equation 14).

    libsvm's approximate solution depends on the order of the rows, so that which clients it
    flags can change with it, and replies arrive in any order: the rows are fitted in a
    canonical order, to a tight tolerance. Rows on the boundary (support vectors at the
    margin, score 0 up to the solver's precision) are not outside it: a suspect's score must
    exceed 1e-6 of the largest |score|. On few clients the exact solution often puts most of
    them on the boundary, and flags few or none."""
    if updates.shape[0] < 2:
        return np.zeros(updates.shape[0], dtype=bool), np.zeros(updates.shape[0])
    order = canonical_order(updates)
    svm = OneClassSVM(kernel="rbf", nu=nu, gamma="scale", tol=SOLVER_TOLERANCE).fit(updates[order])
    scores = -svm.decision_function(updates)
    return scores > 1e-6 * np.abs(scores).max(), scores


@dataclass(frozen=True)
class TrainingRecipe:
    """What a client's local training is a deterministic function of, besides its data."""

    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float


def recompute_update(
    model_fn: Callable[[], nn.Module], global_state: State, data: ImageData,
    recipe: TrainingRecipe, seed: int,
) -> dict[str, np.ndarray]:
    """The model the client should have uploaded: ``task.train.train`` from ``global_state``
    on ``data`` with the client's recipe and shuffling seed, on one CPU thread like a client,
    so that an honest client's upload is reproduced to the last bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = model_fn()
        load_numpy_state(model, global_state)
        train(model, data, epochs=recipe.epochs, batch_size=recipe.batch_size,
              learning_rate=recipe.learning_rate, weight_decay=recipe.weight_decay,
              device=torch.device("cpu"), seed=seed)
        return state_to_numpy(model)
    finally:
        torch.set_num_threads(threads)


def relative_mismatch(recomputed: State, uploaded: State, global_state: State) -> float:
    """||g'_i - g_i|| / ||g'_i|| over the float arrays: 0 for a faithful upload."""
    updates, _ = flatten_updates([recomputed, uploaded], global_state)
    honest, claimed = updates
    return float(np.linalg.norm(claimed - honest) / max(np.linalg.norm(honest), 1e-12))
