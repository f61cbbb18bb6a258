"""Build the configured defense (a Flower Strategy) by its run-config name."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from server_app.queries import GridQueries
from strategies.base import DetectingFedAvg
from strategies.registry import DEFENSES, ServerAssets
from task.config import RunConfig
from task.data import ImageData
from task.models import build_model, default_cam_layer

if TYPE_CHECKING:
    from flwr.serverapp import Grid


def server_assets(config: RunConfig, reference: ImageData, grid: Grid | None = None) -> ServerAssets:
    """What the server gives a defense: the run's architecture, ``layercam-ae-probes`` probe
    images drawn (seeded by ``seed``) from its held-out ``reference`` data, and the ``grid`` to
    ask clients through (``GridQueries``)."""
    def model_fn() -> torch.nn.Module:
        return build_model(config.model, reference.in_channels, reference.num_classes,
                           reference.image_size)

    order = torch.randperm(len(reference), generator=torch.Generator().manual_seed(config.seed))
    probes = order[: config.layercam_ae_probes]
    return ServerAssets(model_fn=model_fn, probes=reference.as_float(probes),
                        probe_labels=reference.labels[probes],
                        cam_layer=default_cam_layer(config.model), reference=reference,
                        queries=GridQueries(grid) if grid is not None else None)


def build_defense(config: RunConfig, assets: ServerAssets, **flower_kwargs: Any) -> DetectingFedAvg:
    """The strategy named by ``config.defense``, sampling ``clients-per-round`` (0: every
    connected client) each round once ``min-replies`` are connected (waiting ``round-timeout``
    at most), aggregating with at
    least ``min-replies`` valid uploads (``flower_kwargs``, e.g. ``on_record``, go to its
    constructor). Raises ``ConfigError`` naming the key for an unknown name or a value the
    defense cannot use."""
    sampling = {"fraction_train": 1.0, "fraction_evaluate": 0.0,
                "min_replies": config.min_replies, "sampling_timeout": config.round_timeout,
                "clients_per_round": config.clients_per_round, "sampling_seed": config.seed}
    return DEFENSES.get(config.defense).from_config(config, assets, **sampling, **flower_kwargs)
