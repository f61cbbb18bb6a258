"""Attacks run by malicious ClientApps, selectable by run-config name (``attack``)."""

from __future__ import annotations

from attacks.base import Attack, AttackInput
from attacks.classic import GaussianNoise, LabelFlip, SignFlip, UniformNoise
from task.config import RunConfig


def build_attack(config: RunConfig) -> Attack:
    """The attack named by ``config.attack`` with its run-config parameters."""
    builders = {
        "none": Attack,
        "sign-flip": lambda: SignFlip(config.sign_flip_scale),
        "gaussian": lambda: GaussianNoise(config.gaussian_sigma),
        "uniform-noise": lambda: UniformNoise(config.uniform_noise_scale),
        "label-flip": LabelFlip,
    }
    try:
        return builders[config.attack]()
    except KeyError:
        raise ValueError(f"unknown attack {config.attack!r}; choose one of {sorted(builders)}") from None


__all__ = ["Attack", "AttackInput", "build_attack"]
