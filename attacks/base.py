"""The one small interface every attack implements, run on a malicious ClientApp, and the
registry that selects an attack by its run-config name (``attack``).

An attacking client first trains honestly (on what ``poison`` makes of its data, for a
data-poisoning attack), then ``craft`` turns what it knows into the upload: the round's global
model, its own honest model, and -- for attacks that need them -- the benign uploads the
harness's eavesdropping channel forwarded. Attacks are pure functions of these numpy states and
a seeded generator.

Adding an attack is one module in this package: a subclass of ``Attack`` with its ``name``,
decorated with ``@ATTACKS.register``, that overrides ``from_config`` when it has run-config
keys, and declares what it needs through the three capability attributes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from task.params import State, is_batchnorm_statistic
from task.registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from task.config import RunConfig
    from task.data import ImageData

ATTACKS: Registry[type[Attack]] = Registry("attacks", "attack")
"""Every attack by run-config name."""


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
    server_round: int = 0
    """The round the upload is for (0: unknown)."""


def with_own_statistics(crafted: State, own: State) -> dict[str, np.ndarray]:
    """``crafted`` with BatchNorm's running statistics taken from the attacker's ``own``
    model: an attack meant for the weights (a flip, a boost) would turn a variance negative,
    which the screening rejects before any defense looks."""
    return {k: own[k] if is_batchnorm_statistic(k) else v for k, v in crafted.items()}


@ATTACKS.register
class Attack:
    """An honest client (``attack = "none"``) and the base of every attack: subclasses set
    ``name``, override ``craft`` (and ``poison`` for data poisoning) and set the capabilities
    they need."""

    name = "none"
    needs_benign_uploads = False
    """The harness must forward the round's benign uploads (``AttackInput.benign_states``)."""
    needs_local_probes = False
    """``craft`` needs the model architecture and a batch of the attacker's own images."""
    poisons_data = False
    """The attack works through ``poison``, on the data the client trains on."""

    @classmethod
    def from_config(cls, config: RunConfig, model: nn.Module | None = None) -> Attack:
        """The attack with its run-config parameters; ``model`` (the architecture) is needed
        by attacks with ``needs_local_probes``."""
        return cls()

    def poison(self, data: ImageData) -> ImageData:
        """The data to train on (data poisoning); honest by default."""
        return data

    def craft(self, attack_input: AttackInput) -> State:
        """The state to upload; honest by default."""
        return attack_input.own_state


def relabelled(data: ImageData, labels: np.ndarray) -> ImageData:
    """``data`` with other labels (for ``Attack.poison``)."""
    return dataclasses.replace(data, labels=torch.from_numpy(np.asarray(labels, dtype=np.int64)))
