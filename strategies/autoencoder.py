"""The heat-map autoencoder and its reconstruction errors, LayerCAM-AE eq. (11)-(12).

AE = Linear(HW, hidden) + ReLU, Linear(hidden, HW) + Sigmoid, trained from scratch every round
on that round's K flattened heat maps only, full batch, MSE loss (eq. 11), Adam (paper: lr 1e-3,
weight decay 1e-5, 200 epochs, hidden 128). R_l = mean_ij |L_l - L'_l| (eq. 12).

Two costs the paper does not fix: training may stop early, once the loss has not improved by a
relative ``tolerance`` for ``PATIENCE`` epochs (``tolerance = 0``: all epochs, the paper's); and
the problem is small and dense (K x HW), so on a CPU it runs on ``threads`` threads (default 1):
more threads cost more in synchronisation than they save, and far more when other processes
share the cores.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

PATIENCE = 10
"""Epochs without a relative improvement of ``tolerance`` before training stops."""


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` intra-op CPU threads (0: leave torch's setting)."""
    previous = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def heatmap_autoencoder(dim: int, hidden: int) -> nn.Sequential:
    """The paper's one-hidden-layer autoencoder for flattened heat maps of length ``dim``."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim), nn.Sigmoid())


def reconstruction_errors(
    maps: torch.Tensor,
    *,
    hidden: int = 128,
    epochs: int = 200,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    seed: int = 0,
    tolerance: float = 0.0,
) -> tuple[torch.Tensor, int]:
    """Train a fresh autoencoder on ``maps`` (K, D); return R (K,), eq. (12), and the epochs run.

    Deterministic for a given ``seed`` (the initialisation is drawn from a private generator).
    """
    if maps.dim() != 2:
        raise ValueError(f"maps must be (K, D), got {tuple(maps.shape)}")
    maps = maps.detach().float()
    generator = torch.Generator().manual_seed(seed)
    autoencoder = heatmap_autoencoder(maps.shape[1], hidden)
    with torch.no_grad():  # seeded re-initialisation, same law as nn.Linear's default
        for layer in autoencoder:
            if isinstance(layer, nn.Linear):
                bound = 1.0 / layer.in_features ** 0.5
                layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) * 2 * bound - bound)
                layer.bias.copy_(torch.rand(layer.bias.shape, generator=generator) * 2 * bound - bound)
    autoencoder.to(maps.device)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=lr, weight_decay=weight_decay)
    best, stale, ran = float("inf"), 0, 0
    with torch.enable_grad():
        for ran in range(1, epochs + 1):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(autoencoder(maps), maps)  # eq. (11)
            loss.backward()
            optimizer.step()
            if tolerance > 0:
                value = loss.item()
                stale = 0 if value < best * (1 - tolerance) else stale + 1
                best = min(best, value)
                if stale >= PATIENCE:
                    break
    with torch.no_grad():
        return (autoencoder(maps) - maps).abs().mean(dim=1), ran  # eq. (12)
