"""Build the configured defense (a Flower Strategy) by its run-config name."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from strategies.base import DetectingFedAvg
from task.config import RunConfig


def build_defense(
    config: RunConfig, model_fn: Callable[[], nn.Module], probes: torch.Tensor, cam_layer: str
) -> DetectingFedAvg:
    """The strategy named by ``config.defense``, sampling every connected client each round.

    ``model_fn`` builds an untrained model of the run's architecture (heat-map defenses load
    each upload into it functionally); ``probes`` are server-held images; ``cam_layer`` is the
    model's default class-activation-map layer.
    """
    common = dict(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=config.num_clients,
        min_available_nodes=config.num_clients,
    )
    if config.defense == "fedavg":
        return DetectingFedAvg(**common)
    if config.defense == "layercam-ae":
        from strategies.layercam_ae import LayerCamAe

        return LayerCamAe(
            model_fn=model_fn, probes=probes,
            target_layer=config.layercam_ae_target_layer or cam_layer,
            target_class=config.layercam_ae_target_class,
            threshold=config.layercam_ae_threshold, beta=config.layercam_ae_beta,
            robust_z=config.layercam_ae_robust_z, window=config.layercam_ae_window,
            votes=config.layercam_ae_votes, hidden=config.layercam_ae_hidden,
            epochs=config.layercam_ae_epochs, lr=config.layercam_ae_lr,
            weight_decay=config.layercam_ae_weight_decay, engine=config.layercam_ae_engine,
            keep_heatmaps=config.layercam_ae_save_heatmaps, seed=config.seed, **common,
        )
    raise ValueError(f"unknown defense {config.defense!r}")
