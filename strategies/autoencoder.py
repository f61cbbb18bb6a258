"""The heat-map autoencoder and its reconstruction errors, LayerCAM-AE eq. (11)-(12).

AE = Linear(D, hidden) + ReLU, Linear(hidden, D) + Sigmoid, trained from scratch every round
on that round's K flattened heat maps only, full batch, MSE loss (eq. 11), Adam (paper: lr 1e-3,
weight decay 1e-5, 200 epochs, hidden 128). R_l = mean_ij |L_l - L'_l| (eq. 12).

It is trained on public PyTorch API only: the forward on the module's parameters, autograd
(``torch.autograd.grad``) and ``torch.optim.Adam`` with its fused kernel (CPU and CUDA
float32) on one flat buffer that holds all four tensors. The tests compare it with
``nn.Sequential``, ``loss.backward()`` and the unfused ``torch.optim.Adam``. An earlier version
wrote the backward pass out on private ``torch.ops.aten`` overloads and called the functional
Adam to skip ``Optimizer.step``'s bookkeeping: faster at small K (docs/benchmarks.md), but
private ops may change or go with any torch release.

On a GPU an epoch is a CUDA graph (``captured``): its kernels are microseconds each at these
sizes, and launching them one by one from Python costs more than running them.

Two costs the paper does not fix: training may stop early, once the loss has not improved by a
relative ``tolerance`` for ``PATIENCE`` epochs (``tolerance = 0``: all epochs, the paper's); and
the problem is small and dense (K x D), so on a CPU it runs on ``threads`` threads (default 1):
more threads cost more in synchronisation than they save, and far more when other processes
share the cores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
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


def heatmap_autoencoder(dim: int, hidden: int, seed: int) -> nn.Sequential:
    """The paper's one-hidden-layer autoencoder for flattened heat maps of length ``dim``,
    initialised by ``nn.Linear``'s law, U(+-1/sqrt(fan_in)), from a private generator."""
    autoencoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim),
                                nn.Sigmoid())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (autoencoder[0], autoencoder[2]):
            bound = 1.0 / layer.in_features ** 0.5
            layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) * 2 * bound - bound)
            layer.bias.copy_(torch.rand(layer.bias.shape, generator=generator) * 2 * bound - bound)
    return autoencoder


def _reconstruct(parameters: list[torch.Tensor], maps: torch.Tensor) -> torch.Tensor:
    """x' = sigmoid(relu(x W1^T + b1) W2^T + b2): ``heatmap_autoencoder``'s forward, on its
    parameters (encoder weight, bias, decoder weight, bias) without the modules' calls."""
    w1, b1, w2, b2 = parameters
    return torch.sigmoid(F.linear(torch.relu(F.linear(maps, w1, b1)), w2, b2))


class _Training:
    """Full-batch training of one autoencoder, one ``epoch()`` at a time: forward, MSE loss
    (eq. 11), its gradients by ``torch.autograd.grad``, one fused Adam step.

    The four tensors are views of one flat buffer, and the gradients are copied into one flat
    gradient: one Adam call then updates one tensor, which on a CPU is one parallel region
    instead of four (with two intra-op threads on busy cores, each region can wait a whole
    time slice for the other thread). Every tensor an epoch reads or writes for good keeps its
    address, so on a GPU the epoch can be captured as a CUDA graph and replayed."""

    def __init__(self, maps: torch.Tensor, hidden: int, lr: float, weight_decay: float,
                 seed: int) -> None:
        self.maps = maps
        tensors = [t.detach() for t in heatmap_autoencoder(maps.shape[1], hidden, seed)
                   .to(maps.device).parameters()]  # encoder weight, bias, decoder weight, bias
        self.flat = torch.cat([t.flatten() for t in tensors])
        self.flat.grad = torch.zeros_like(self.flat)
        self.parameters, start = [], 0
        for t in tensors:  # leaves sharing the flat buffer's memory
            self.parameters.append(
                self.flat[start:start + t.numel()].view(t.shape).requires_grad_())
            start += t.numel()
        # betas and eps: torch.optim.Adam's defaults, which the paper keeps
        self.optimizer = torch.optim.Adam([self.flat], lr=lr, weight_decay=weight_decay,
                                          fused=maps.device.type in ("cpu", "cuda") or None,
                                          capturable=maps.is_cuda)
        self.loss = maps.new_zeros(())

    def adam_state(self) -> list[torch.Tensor]:
        """Adam's step count and moments (they exist once it has stepped)."""
        return list(self.optimizer.state[self.flat].values())

    def epoch(self) -> None:
        loss = F.mse_loss(_reconstruct(self.parameters, self.maps), self.maps)
        gradients = torch.autograd.grad(loss, self.parameters)
        torch.cat([g.flatten() for g in gradients], out=self.flat.grad)
        self.optimizer.step()
        # the loss of the weights this step started from, where a CUDA graph's replay leaves it
        self.loss.copy_(loss.detach())

    def errors(self) -> torch.Tensor:
        """R (K,), eq. (12), of the current weights."""
        with torch.no_grad():
            return (_reconstruct(self.parameters, self.maps) - self.maps).abs().mean(dim=1)


def captured(training: _Training) -> Callable[[], None]:
    """``training.epoch`` as a CUDA graph: one launch replays its kernels, which at these
    sizes take less time than Python takes to launch them one by one. Capturing needs one
    eager run first (cuBLAS creates its workspace, Adam its state); it runs on a side stream
    and its step is undone."""
    device = training.maps.device
    saved = training.flat.clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        training.epoch()
    torch.cuda.current_stream(device).wait_stream(side)
    with torch.no_grad():
        training.flat.copy_(saved)
        for value in training.adam_state():
            value.zero_()  # Adam starts from step 0 and zero moments
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        training.epoch()
    return graph.replay


def reconstruction_errors(
    maps: torch.Tensor,
    *,
    hidden: int = 128,
    epochs: int = 200,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    seed: int = 0,
    tolerance: float = 0.0,
    cuda_graph: bool = True,
) -> tuple[torch.Tensor, int]:
    """Train a fresh autoencoder on ``maps`` (K, D); return R (K,), eq. (12), and the epochs run.

    Deterministic for a given ``seed`` (the initialisation is drawn from a private generator).
    On a GPU the epoch runs as a CUDA graph (``cuda_graph=False``: launched op by op).
    """
    if maps.dim() != 2:
        raise ValueError(f"maps must be (K, D), got {tuple(maps.shape)}")
    maps = maps.detach().float().contiguous()
    with torch.enable_grad():  # autograd trains it, whatever the caller's grad mode
        training = _Training(maps, hidden, lr, weight_decay, seed)
        epoch = captured(training) if maps.is_cuda and cuda_graph else training.epoch
        best, stale, ran = float("inf"), 0, 0
        for ran in range(1, epochs + 1):
            epoch()
            if tolerance > 0:
                value = training.loss.item()
                stale = 0 if value < best * (1 - tolerance) else stale + 1
                best = min(best, value)
                if stale >= PATIENCE:
                    break
    return training.errors(), ran
