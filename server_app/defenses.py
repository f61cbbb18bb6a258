"""Build the configured defense (a Flower Strategy) by its run-config name."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from strategies.base import DetectingFedAvg
from task.config import RunConfig
from task.data import ImageData


def build_defense(
    config: RunConfig, model_fn: Callable[[], nn.Module], probes: torch.Tensor, cam_layer: str,
    reference: ImageData | None = None, probe_labels: torch.Tensor | None = None,
) -> DetectingFedAvg:
    """The strategy named by ``config.defense``, sampling every connected client each round.

    ``model_fn`` builds an untrained model of the run's architecture (heat-map defenses load
    each upload into it functionally); ``probes`` are server-held images; ``cam_layer`` is the
    model's default class-activation-map layer; ``reference`` is server data of the run's
    dataset (FAA-DL reads its shape, classes and standardisation); ``probe_labels`` the probes'
    labels (used by the heat-map defenses unless ``layercam-ae-probe-labels`` is false). The heat-map defenses (LayerCAM-AE, GradCAM-AE,
    LayerCAM-Krum) share the ``layercam-ae-*`` keys; the Krum family shares ``krum-f``.
    """
    common = dict(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=config.num_clients,
        min_available_nodes=config.num_clients,
    )
    if config.defense == "fedavg":
        return DetectingFedAvg(**common)
    if config.defense in ("krum", "multi-krum", "bulyan"):
        from strategies.robust import RULES

        extra = {"num_selected": config.multi_krum_m} if config.defense == "multi-krum" else {}
        return RULES[config.defense](num_malicious=config.krum_f, **extra, **common)
    if config.defense in ("median", "geomed"):
        from strategies.robust import RULES

        return RULES[config.defense](**common)
    if config.defense == "trimmed-mean":
        from strategies.robust import TrimmedMean

        return TrimmedMean(beta=config.trimmed_mean_beta, **common)
    if config.defense == "auror":
        from strategies.auror import Auror

        return Auror(num_features=config.auror_features, separation=config.auror_separation,
                     tau=config.auror_tau, **common)
    if config.defense == "faa-dl":
        from strategies.faa_dl import FaaDl
        from strategies.faa_dl_verification import TrainingRecipe

        if reference is None:
            raise ValueError("faa-dl needs the server's reference data")
        recipe = TrainingRecipe(config.local_epochs, config.batch_size, config.learning_rate,
                                config.weight_decay)
        return FaaDl(model_fn=model_fn, reference=reference, recipe=recipe, nu=config.faa_dl_nu,
                     tolerance=config.faa_dl_tolerance, aont_lambda=config.faa_dl_aont_lambda,
                     verification_timeout=config.round_timeout, **common)
    if config.defense == "cosdefense":
        from strategies.cosdefense import CosDefense

        return CosDefense(margin=config.cosdefense_margin, **common)
    from strategies.cam_baselines import GradCamAe, LayerCamKrum
    from strategies.layercam_ae import LayerCamAe

    heatmap_defenses = {"layercam-ae": LayerCamAe, "gradcam-ae": GradCamAe,
                        "layercam-krum": partial(LayerCamKrum, num_malicious=config.krum_f)}
    if config.defense not in heatmap_defenses:
        raise ValueError(f"unknown defense {config.defense!r}")
    return heatmap_defenses[config.defense](
        model_fn=model_fn, probes=probes,
        target_layer=config.layercam_ae_target_layer or cam_layer,
        target_class=config.layercam_ae_target_class,
        probe_labels=probe_labels if config.layercam_ae_probe_labels else None,
        decision=config.layercam_ae_decision, memory=config.layercam_ae_memory,
        score_cap=config.layercam_ae_score_cap, scale_rounds=config.layercam_ae_scale_rounds,
        group_z=config.layercam_ae_group_z, group_size=config.layercam_ae_group_size,
        threshold=config.layercam_ae_threshold, beta=config.layercam_ae_beta,
        robust_z=config.layercam_ae_robust_z, window=config.layercam_ae_window,
        votes=config.layercam_ae_votes, hidden=config.layercam_ae_hidden,
        epochs=config.layercam_ae_epochs, lr=config.layercam_ae_lr,
        weight_decay=config.layercam_ae_weight_decay, tolerance=config.layercam_ae_tolerance,
        map_size=config.layercam_ae_map_size, threads=config.layercam_ae_threads,
        engine=config.layercam_ae_engine,
        keep_heatmaps=config.layercam_ae_save_heatmaps, seed=config.seed, **common,
    )
