"""Controls for the GAE attack: the same eavesdropped round and the same distance bound d_T,
without the graph, the autoencoder or the spectral generation.

- ``radius-noise``: w' = w_g + d_T * xi / ||xi||, xi ~ N(0, I) (seeded): what any upload at the
  allowed distance does by chance.
- ``undo-update``: w' = w_g - d_T * u_bar / ||u_bar||: the benign mean update reversed at the
  allowed distance, the most damaging upload for GAE's own first-order surrogate
  D(v) = -<v, u_bar> / ||u_bar|| (it attains D = d_T, the maximum within the bound).

If GAE does no more damage than ``radius-noise``, its machinery adds nothing; ``undo-update``
says how much damage the bound allows at all. d_T is ``gae-radius`` (default: the largest
benign distance ||w_i - w_g|| this round), exactly as for GAE.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from attacks.base import ATTACKS, Attack, AttackInput
from attacks.observed import ObservedRound, observe_round
from task.params import State, unflatten


class _AtRadius(Attack, ABC):
    """An update direction from the observed round, scaled to the radius d_T."""

    needs_benign_uploads = True

    def __init__(self, radius: float = 0.0) -> None:
        self.radius = radius

    @classmethod
    def from_config(cls, config, model=None):
        return cls(config.gae_radius)  # the radius GAE is bound by

    @abstractmethod
    def direction(self, observed: ObservedRound, rng: np.random.Generator) -> np.ndarray:
        """The unscaled update direction."""

    def craft(self, attack_input: AttackInput) -> State:
        observed = observe_round(attack_input.global_state, attack_input.benign_states,
                                 attack_input.benign_weights)
        radius = self.radius if self.radius > 0 else observed.largest_benign_distance
        direction = self.direction(observed, attack_input.rng)
        norm = np.linalg.norm(direction)
        if norm == 0:
            raise ValueError(f"{self.name}: the direction is zero")
        return unflatten(direction * (radius / norm), observed.names, attack_input.global_state)


@ATTACKS.register
class RadiusNoise(_AtRadius):
    """A Gaussian random direction at distance d_T from the global model."""

    name = "radius-noise"

    def direction(self, observed: ObservedRound, rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal(len(observed.global_vector))


@ATTACKS.register
class UndoUpdate(_AtRadius):
    """The benign mean update reversed, at distance d_T from the global model."""

    name = "undo-update"

    def direction(self, observed: ObservedRound, rng: np.random.Generator) -> np.ndarray:
        return -observed.mean_update
