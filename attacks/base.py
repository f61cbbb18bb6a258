"""The one small interface every attack implements, run on a malicious ClientApp.

An attacking client first trains honestly (on poisoned labels if the attack poisons data), then
``craft`` turns what it knows into the upload: the round's global model, its own honest model,
and -- for attacks that need them -- the benign uploads the harness's eavesdropping channel
forwarded. Attacks are pure functions of these numpy states and a seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class AttackInput:
    """What an attacker knows this round."""

    global_state: State
    own_state: State
    rng: np.random.Generator
    benign_states: tuple[State, ...] = ()
    benign_weights: tuple[float, ...] = ()
    """Claimed data sizes of ``benign_states`` (empty: equal weights)."""
    probes: torch.Tensor | None = None
    """A batch of the attacker's own images (N, C, H, W), for attacks that need them."""


class Attack:
    """Base class: subclasses set ``name`` and override ``craft`` (and ``flip_labels`` for
    data poisoning)."""

    name = "none"
    needs_benign_uploads = False
    poisons_data = False

    def flip_labels(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """Labels to train on (data poisoning); honest by default."""
        return labels

    def craft(self, attack_input: AttackInput) -> State:
        """The state to upload; honest by default."""
        return attack_input.own_state


def update(state: State, global_state: State) -> State:
    """w - w_global for floating-point arrays (integer buffers are not updates)."""
    return {k: state[k] - global_state[k] for k in state if state[k].dtype.kind == "f"}


def apply_update(global_state: State, delta: State, fallback: State) -> State:
    """w_global + delta, keeping ``fallback``'s values for arrays without an update; dtypes kept."""
    return {k: (global_state[k] + delta[k]).astype(global_state[k].dtype) if k in delta else fallback[k]
            for k in global_state}
