"""Attacks run by malicious ClientApps, selectable by run-config name (``attack``)."""

from __future__ import annotations

from torch import nn

from attacks.adaptive_cam import AdaptiveCam
from attacks.base import Attack, AttackInput
from attacks.classic import GaussianNoise, LabelFlip, SignFlip, UniformNoise
from attacks.controls import RadiusNoise, UndoUpdate
from attacks.eavesdropping import Alie, Ipm, MinMax, MinSum
from attacks.gae import Gae, GaeSettings
from task.config import RunConfig
from task.models import default_cam_layer


def needs_local_probes(name: str) -> bool:
    """Whether the attack named ``name`` computes on the attacker's own images and model."""
    return name == AdaptiveCam.name


def poisons_data(name: str) -> bool:
    """Whether the attack named ``name`` trains on poisoned data instead of crafting its upload."""
    return name == LabelFlip.name


def build_attack(config: RunConfig, model: nn.Module | None = None) -> Attack:
    """The attack named by ``config.attack`` with its run-config parameters. ``model`` (the
    architecture, loaded with any weights) is needed by attacks with ``needs_local_probes``."""

    def adaptive_cam() -> Attack:
        if model is None:
            raise ValueError("adaptive-cam needs the model architecture")
        layer = config.layercam_ae_target_layer or default_cam_layer(config.model)
        return AdaptiveCam(model, layer)

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
        "gae": lambda: Gae(
            config.gae_graph_nodes, config.gae_candidate_nodes, config.gae_edge_threshold,
            config.gae_edge_ramp, config.gae_budget, config.gae_radius,
            GaeSettings(config.gae_epochs, config.gae_adversarial, config.gae_adversarial_epochs,
                        config.gae_perturbation, config.gae_learning_rate)),
        "radius-noise": lambda: RadiusNoise(config.gae_radius),
        "undo-update": lambda: UndoUpdate(config.gae_radius),
        "adaptive-cam": adaptive_cam,
    }
    try:
        return builders[config.attack]()
    except KeyError:
        raise ValueError(f"unknown attack {config.attack!r}; choose one of {sorted(builders)}") from None


__all__ = ["Attack", "AttackInput", "build_attack", "needs_local_probes", "poisons_data"]
