"""Local training and evaluation loops (Adam, as in the LayerCAM-AE paper's setup)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.optim.adam import adam

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


class Adam:
    """``torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)``'s steps, the same numbers:
    its state made as its first step makes it, and each step the public functional
    ``torch.optim.adam.adam`` that its ``step`` calls, with its defaults (betas 0.9 and 0.999,
    eps 1e-8; the implementation picked for the device as it picks it). Why not the
    ``Optimizer`` object: building or stepping one imports ``torch._dynamo``, about 1.6 s of
    CPU in a fresh process, and a deployment's SuperNode starts a fresh ClientApp process for
    every message."""

    def __init__(self, params, lr: float, weight_decay: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.weight_decay = lr, weight_decay
        self.state: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        params = [p for p in self.params if p.grad is not None]
        for p in params:
            if id(p) not in self.state:  # (step, first moment, second moment)
                scalar = (torch.float64 if torch.get_default_dtype() == torch.float64
                          else torch.float32)
                self.state[id(p)] = (torch.tensor(0.0, dtype=scalar, device="cpu"),
                                     torch.zeros_like(p, memory_format=torch.preserve_format),
                                     torch.zeros_like(p, memory_format=torch.preserve_format))
        steps, exp_avgs, exp_avg_sqs = ([self.state[id(p)][i] for p in params] for i in range(3))
        adam(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], steps,
             has_complex=any(torch.is_complex(p) for p in params), amsgrad=False, beta1=0.9,
             beta2=0.999, lr=self.lr, weight_decay=self.weight_decay, eps=1e-8, maximize=False,
             capturable=False, differentiable=False)


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
    optimizer = Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
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
