"""Attacks run by malicious ClientApps, selectable by run-config name (``attack``).

Each attack is a module of this package whose class registers itself in ``ATTACKS``
(``attacks.base``); ``build_attack`` looks the configured one up.
"""

from __future__ import annotations

from torch import nn

from attacks.base import ATTACKS, Attack, AttackInput
from task.config import RunConfig


def build_attack(config: RunConfig, model: nn.Module | None = None) -> Attack:
    """The attack named by ``config.attack`` with its run-config parameters. ``model`` (the
    architecture, loaded with any weights) is needed by attacks with ``needs_local_probes``."""
    return ATTACKS.get(config.attack).from_config(config, model)


__all__ = ["ATTACKS", "Attack", "AttackInput", "build_attack"]
