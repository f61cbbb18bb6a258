"""Local training and evaluation loops (Adam, as in the LayerCAM-AE paper's setup)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from task.data import ImageData


def pick_device() -> torch.device:
    """The GPU when one is present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """A copy of the model's full state (parameters and buffers) as CPU numpy arrays; a copy,
    so that training the model further leaves it unchanged."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_numpy_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Load numpy arrays (e.g. from a Flower ArrayRecord) into the model, strictly."""
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, strict=True)


def _batches(data: ImageData, batch_size: int, generator: torch.Generator | None):
    n = len(data)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield data.as_float(idx), data.labels[idx]


def train(
    model: nn.Module,
    data: ImageData,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    device: torch.device,
    seed: int,
) -> float:
    """Train ``model`` in place with Adam for ``epochs`` over ``data``; return the mean loss of
    the last epoch. Batches are shuffled by ``seed``."""
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    last_epoch_loss = float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for x, y in _batches(data, batch_size, generator):
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            count += len(y)
        last_epoch_loss = total / max(count, 1)
    return last_epoch_loss


@torch.no_grad()
def evaluate(
    model: nn.Module, data: ImageData, device: torch.device, batch_size: int = 500
) -> tuple[float, float]:
    """Return (mean cross-entropy loss, accuracy) of ``model`` on ``data``."""
    model.to(device).eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss, correct = 0.0, 0
    for x, y in _batches(data, batch_size, None):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss += criterion(logits, y).item()
        correct += (logits.argmax(1) == y).sum().item()
    n = max(len(data), 1)
    return loss / n, correct / n
