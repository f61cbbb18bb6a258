"""What an eavesdropping attacker can compute from the round's benign uploads, in bounded memory.

The benign models arrive as states (dicts of arrays). ``observe_round`` walks them one at a
time, so the memory it adds to the inputs is a few vectors of the model's size D, never an
I x D matrix: for 21 ResNet-18 uploads (11.2 M parameters) that is about 0.4 GB instead of 1.9 GB
for one float64 copy of all updates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from task.params import State, flat, float_names, gather


@dataclass(frozen=True)
class ObservedRound:
    """Statistics of the benign updates u_i = w_i - w_g of one round (all float64, length D or I)."""

    names: list[str]
    global_vector: np.ndarray
    mean_update: np.ndarray
    """u_bar = sum_i n_i u_i / sum_i n_i, the benign aggregate's update."""
    distances_to_mean: np.ndarray
    """d_i = ||u_i - u_bar|| = ||w_i - w_bar|| (GAE eq. 9's distances)."""
    update_norms: np.ndarray
    """||u_i|| = ||w_i - w_g||, each benign model's distance to the global model."""
    energy: np.ndarray
    """mean_i |u_i|, per coordinate: where the benign updates carry their energy."""

    @property
    def largest_benign_distance(self) -> float:
        """max_i ||w_i - w_g||: the default radius d_T of the distance constraint (eq. 8b)."""
        return float(self.update_norms.max())

    def updates_at(self, states: Sequence[State], indices: np.ndarray) -> np.ndarray:
        """(len(indices), len(states)): the states' updates at the sorted flat ``indices``,
        reading only those coordinates."""
        origin = self.global_vector[indices]
        return np.stack([gather(s, self.names, indices) - origin for s in states], axis=1)

    def update_of(self, state: State) -> np.ndarray:
        """u = w - w_g of one state, as a float64 vector."""
        return flat(state, self.names) - self.global_vector


def observe_round(global_state: State, benign_states: Sequence[State],
                  benign_weights: Sequence[float] = ()) -> ObservedRound:
    """Two streaming passes over the benign uploads: the weighted mean update, then each
    update's distance to it, its norm and the per-coordinate mean magnitude."""
    if len(benign_states) < 2:
        raise ValueError("needs at least two eavesdropped benign uploads")
    weights = np.asarray(benign_weights or [1.0] * len(benign_states), dtype=np.float64)
    if len(weights) != len(benign_states) or not np.all(weights > 0):
        raise ValueError("benign weights must be one positive data size per benign upload")
    names = float_names(global_state)
    global_vector = flat(global_state, names)
    mean_update = np.zeros_like(global_vector)
    for weight, state in zip(weights, benign_states):
        mean_update += (weight / weights.sum()) * (flat(state, names) - global_vector)
    energy = np.zeros_like(global_vector)
    distances, norms = [], []
    for state in benign_states:
        update = flat(state, names) - global_vector
        energy += np.abs(update) / len(benign_states)
        norms.append(np.linalg.norm(update))
        update -= mean_update
        distances.append(np.linalg.norm(update))
    return ObservedRound(names, global_vector, mean_update, np.array(distances),
                         np.array(norms), energy)
