"""The defenses by run-config name (``defense``), and what the server hands each one.

Every defense is a ``DetectingFedAvg`` subclass in a module of this package, decorated with
``@DEFENSES.register``; it builds itself with ``from_config(config, assets, **flower_kwargs)``
from the run config and one ``ServerAssets`` value. Adding a defense is its module plus its
test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from task.data import ImageData
from task.registry import Registry

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from strategies.base import DetectingFedAvg

DEFENSES: Registry[type[DetectingFedAvg]] = Registry("strategies", "defense")
"""Every defense by run-config name."""


@dataclass(frozen=True)
class ServerAssets:
    """What the server holds that a defense may use, besides the uploads."""

    model_fn: Callable[[], nn.Module]
    """Builds an untrained model of the run's architecture (uploads are loaded into it)."""
    probes: torch.Tensor
    """(P, C, H, W) server-held images (heat-map defenses)."""
    probe_labels: torch.Tensor
    """(P,) their labels."""
    cam_layer: str
    """The architecture's default class-activation-map layer."""
    reference: ImageData
    """Server data of the run's dataset: its shape, classes and standardisation."""
    grid: Grid | None = None
    """The Grid, for defenses that talk to clients beyond training (FAA-DL's verification)."""
