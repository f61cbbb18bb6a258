"""Attacks run by malicious ClientApps, selectable by run-config name (``attack``)."""

from __future__ import annotations

from attacks.base import Attack, AttackInput
from attacks.classic import GaussianNoise, LabelFlip, SignFlip, UniformNoise
from attacks.eavesdropping import Alie, Ipm, MinMax, MinSum
from task.config import RunConfig


def build_attack(config: RunConfig) -> Attack:
    """The attack named by ``config.attack`` with its run-config parameters."""
    builders = {
        "none": Attack,
        "sign-flip": lambda: SignFlip(config.sign_flip_scale),
        "gaussian": lambda: GaussianNoise(config.gaussian_sigma),
        "uniform-noise": lambda: UniformNoise(config.uniform_noise_scale),
        "label-flip": LabelFlip,
        "alie": lambda: Alie(config.alie_z, config.num_clients, config.num_attackers),
        "ipm": lambda: Ipm(config.ipm_epsilon),
        "min-max": MinMax,
        "min-sum": MinSum,
    }
    try:
        return builders[config.attack]()
    except KeyError:
        raise ValueError(f"unknown attack {config.attack!r}; choose one of {sorted(builders)}") from None


__all__ = ["Attack", "AttackInput", "build_attack"]
