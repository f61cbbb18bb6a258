"""The defenses by run-config name (``defense``), and what the server hands each one.

Every defense is a ``DetectingFedAvg`` subclass in a module of this package, decorated with
``@DEFENSES.register``; it builds itself with ``from_config(config, assets, **flower_kwargs)``
from the run config and one ``ServerAssets`` value. Adding a defense is its module plus its
test.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from task.data import ImageData
from task.registry import Registry

if TYPE_CHECKING:
    from flwr.app import Message, RecordDict

    from strategies.base import DetectingFedAvg

DEFENSES: Registry[type[DetectingFedAvg]] = Registry("strategies", "defense")
"""Every defense by run-config name."""


class ClientQueries(Protocol):
    """How a defense asks clients something beyond training (FAA-DL's verification): the
    harness owns the messaging, the defense does no I/O."""

    def ask(self, message_type: str, server_round: int, requests: Mapping[int, RecordDict],
            timeout: float) -> dict[int, Message]:
        """Send each node its request (all in one round trip); return the first reply of each
        node that answered within ``timeout`` seconds."""


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
    queries: ClientQueries | None = None
    """The channel to ask clients beyond training (``server_app.queries.GridQueries``)."""
