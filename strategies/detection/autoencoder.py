"""The heat-map autoencoder and its reconstruction errors, LayerCAM-AE eq. (11)-(12).

AE = Linear(D, hidden) + ReLU, Linear(hidden, D) + Sigmoid, trained from scratch every round
on that round's K flattened heat maps only, full batch, MSE loss (eq. 11), Adam (paper: lr 1e-3,
weight decay 1e-5, 200 epochs, hidden 128). R_l = mean_ij |L_l - L'_l| (eq. 12).

The network is this small, so its gradients are written out (``_backward``) instead of
recorded by autograd: five matrix products and a few elementwise passes an epoch, into
preallocated buffers, on public tensor ops only (the sigmoid's derivative as
x' (1 - x'), the ReLU's as a ``masked_fill_`` where the hidden unit is not positive, the
same formulas and order of operations as autograd's own kernels). Recording a graph and
walking it back every epoch would cost more than these products at the sizes LayerCAM-AE
trains on. Adam is torch's fused kernel on one flat buffer that holds all four tensors,
called through the public functional ``torch.optim.adam.adam``: an ``Optimizer`` object adds
per-step bookkeeping and, once built, imports ``torch._dynamo`` on the first round. The
tests check it against ``nn.Sequential`` + ``loss.backward()`` + the unfused
``torch.optim.Adam``.

On a GPU an epoch is a CUDA graph (``captured``): its kernels are microseconds each at these
sizes, and launching them one by one from Python costs more than running them. On a CPU the
epochs run as one TorchScript function (``_cpu_epochs``, the same ops, Adam's being the fused
kernel the functional calls): no Python between the ops, and the GIL released throughout, so
the update views' threads beside it (``strategies.layercam_ae``) no longer stall it.

Two costs the paper does not fix: training may stop early, once the loss has not improved by a
relative ``tolerance`` for ``PATIENCE`` epochs (``tolerance = 0``: all epochs, the paper's); and
the problem is small and dense (K x D), so on a CPU it runs on ``threads`` threads (default 1):
more threads cost more in synchronisation than they save, and far more when other processes
share the cores.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache

import torch
from torch import nn
from torch.optim.adam import adam

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


class FlatAutoencoder:
    """The autoencoder's four tensors as views of one flat buffer, their gradients as views of
    another: one fused Adam step updates all of them at once (on a CPU one parallel region
    instead of four), and ``_backward`` writes each gradient in place."""

    def __init__(self, autoencoder: nn.Sequential) -> None:
        encoder, decoder = autoencoder[0], autoencoder[2]
        tensors = (encoder.weight, encoder.bias, decoder.weight, decoder.bias)
        self.flat = torch.cat([t.detach().flatten() for t in tensors])
        self.flat.grad = torch.empty_like(self.flat)
        views, grads, start = [], [], 0
        for t in tensors:
            views.append(self.flat[start:start + t.numel()].view(t.shape))
            grads.append(self.flat.grad[start:start + t.numel()].view(t.shape))
            start += t.numel()
        self.w1, self.b1, self.w2, self.b2 = views
        self.g_w1, self.g_b1, self.g_w2, self.g_b2 = grads


class _Buffers:
    """What one epoch's forward and backward write, allocated once for K maps and ``hidden``
    units: every epoch reuses the same memory (and a CUDA graph replays on it)."""

    def __init__(self, maps: torch.Tensor, hidden: int) -> None:
        self.hidden = maps.new_empty(len(maps), hidden)   # h, then the ReLU mask's source
        self.out = torch.empty_like(maps)                  # x'
        self.delta = torch.empty_like(maps)                # dL/dz2
        self.slope = torch.empty_like(maps)                # 1 - x'
        self.hidden_delta = torch.empty_like(self.hidden)  # dL/dz1
        self.inactive = torch.empty_like(self.hidden, dtype=torch.bool)  # h <= 0
        self.one = maps.new_ones(())


def _forward(maps: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
             b2: torch.Tensor, hidden: torch.Tensor, out: torch.Tensor) -> None:
    """h = relu(x W1^T + b1) into ``hidden``, x' = sigmoid(h W2^T + b2) into ``out``. On the
    tensors themselves, not ``FlatAutoencoder``/``_Buffers``: TorchScript compiles it into
    ``_cpu_epochs``."""
    torch.addmm(b1, maps, w1.t(), out=hidden).clamp_(min=0)
    torch.addmm(b2, hidden, w2.t(), out=out).sigmoid_()


def _backward(maps: torch.Tensor, w2: torch.Tensor, hidden: torch.Tensor, out: torch.Tensor,
              delta: torch.Tensor, slope: torch.Tensor, hidden_delta: torch.Tensor,
              inactive: torch.Tensor, one: torch.Tensor, g_w1: torch.Tensor, g_b1: torch.Tensor,
              g_w2: torch.Tensor, g_b2: torch.Tensor) -> None:
    """Gradients of the MSE loss (eq. 11) into ``g_*`` (views of ``FlatAutoencoder.flat.grad``),
    from the forward's ``hidden`` and ``out``, through the other ``_Buffers``. On the tensors
    themselves: TorchScript compiles it into ``_cpu_epochs``.

    With L = sum (x' - x)^2 / (K D): dL/dz2 = 2 (x' - x) x' (1 - x') / (K D) (sigmoid), the
    decoder's gradients dz2^T h and sum_k dz2; dL/dz1 = (dz2 W2) [h > 0] (ReLU), the encoder's
    dz1^T x and sum_k dz1. The sigmoid's factor is taken as (x' - x) (1 - x') x', in that
    order, and 1 - x' on its own (exact for x' >= 1/2), not as x' - x'^2, which loses digits
    where x' is near 1; the ReLU's zeroes where h <= 0, as autograd does.
    """
    torch.sub(out, maps, out=delta)
    torch.sub(one, out, out=slope)
    delta.mul_(slope).mul_(out).mul_(2.0 / maps.numel())
    torch.mm(delta.t(), hidden, out=g_w2)
    torch.sum(delta, [0], out=g_b2)
    torch.mm(delta, w2, out=hidden_delta)
    torch.le(hidden, 0, out=inactive)
    hidden_delta.masked_fill_(inactive, 0.0)
    torch.mm(hidden_delta.t(), maps, out=g_w1)
    torch.sum(hidden_delta, [0], out=g_b1)


def _gradients(maps: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
               b2: torch.Tensor, g_w1: torch.Tensor, g_b1: torch.Tensor, g_w2: torch.Tensor,
               g_b2: torch.Tensor, hidden: torch.Tensor, out: torch.Tensor, delta: torch.Tensor,
               slope: torch.Tensor, hidden_delta: torch.Tensor, inactive: torch.Tensor,
               one: torch.Tensor, loss: torch.Tensor, track_loss: bool) -> None:
    """An epoch up to Adam: ``_forward``, with ``track_loss`` the MSE loss of the weights the
    step starts from into ``loss`` (as autograd's), and ``_backward``. Shared by the Python
    epoch (``_Training.epoch``) and the compiled one (``_cpu_epochs``)."""
    _forward(maps, w1, b1, w2, b2, hidden, out)
    if track_loss:
        torch.mean(torch.sub(out, maps, out=delta).square_(), dim=[0, 1], out=loss)
    _backward(maps, w2, hidden, out, delta, slope, hidden_delta, inactive, one,
              g_w1, g_b1, g_w2, g_b2)


def _stalled(value: float, best: float, stale: int, tolerance: float) -> tuple[float, int]:
    """The early stop's bookkeeping after an epoch whose starting loss was ``value``: the best
    loss so far and the epochs since the loss last improved on it by a relative
    ``tolerance``."""
    return min(best, value), (0 if value < best * (1 - tolerance) else stale + 1)


def _cpu_epochs(maps: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                b2: torch.Tensor, g_w1: torch.Tensor, g_b1: torch.Tensor, g_w2: torch.Tensor,
                g_b2: torch.Tensor, params: list[torch.Tensor], grads: list[torch.Tensor],
                averages: list[torch.Tensor], squares: list[torch.Tensor],
                steps: list[torch.Tensor], hidden: torch.Tensor, out: torch.Tensor,
                delta: torch.Tensor, slope: torch.Tensor, hidden_delta: torch.Tensor,
                inactive: torch.Tensor, one: torch.Tensor, loss: torch.Tensor, epochs: int,
                lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                tolerance: float, patience: int) -> int:
    """Up to ``epochs`` of ``_Training.epoch`` (forward, the loss when ``tolerance`` > 0,
    backward, Adam) and the early stop, compiled by TorchScript (``_compiled_cpu_epochs``):
    the same kernels in the same order, so the same numbers, with neither Python's per-op
    overhead nor the GIL held between them. Adam is the op that ``torch.optim.adam.adam``
    calls for a fused CPU step (``params``: the flat buffer, ``grads`` its gradient, Adam's
    moments and step count, one tensor each), after the step count's increment, as it does;
    the lists come from the caller (TorchScript drops an in-place call on lists it built
    itself, as if nothing read them). Returns the epochs run."""
    no_max: list[torch.Tensor] = []
    best, stale, ran = float("inf"), 0, 0
    for epoch in range(epochs):
        ran = epoch + 1
        _gradients(maps, w1, b1, w2, b2, g_w1, g_b1, g_w2, g_b2, hidden, out, delta, slope,
                   hidden_delta, inactive, one, loss, tolerance > 0)
        steps[0].add_(1)
        torch._fused_adam_(params, grads, averages, squares, no_max, steps, lr=lr, beta1=beta1,
                           beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False,
                           maximize=False)
        if tolerance > 0:
            best, stale = _stalled(loss.item(), best, stale, tolerance)
            if stale >= patience:
                break
    return ran


@cache
def _compiled_cpu_epochs() -> Callable[..., int] | None:
    """``_cpu_epochs`` compiled once per process (TorchScript; its deprecation notice is for
    new models, and ``torch.compile`` would import ``torch._dynamo`` and need a C compiler).
    None where TorchScript cannot compile it (it reads the function's source file, which an
    install without ``.py`` files lacks): the epochs then run from Python, and a warning says
    so."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.script(_cpu_epochs)
    except (OSError, RuntimeError) as err:
        warnings.warn(f"the autoencoder's epochs run op by op from Python: TorchScript could "
                      f"not compile them ({err})", RuntimeWarning, stacklevel=2)
        return None


class _Training:
    """Full-batch training of one autoencoder on preallocated buffers, one ``epoch()`` at a
    time (forward, the loss when tracked, backward, Adam): every tensor it touches keeps its
    address, so on a GPU the epoch can be captured once as a CUDA graph and replayed."""

    def __init__(self, maps: torch.Tensor, hidden: int, lr: float, weight_decay: float,
                 seed: int, track_loss: bool) -> None:
        self.maps, self.track_loss = maps, track_loss
        self.ae = FlatAutoencoder(heatmap_autoencoder(maps.shape[1], hidden, seed).to(maps.device))
        # betas and eps: torch.optim.Adam's defaults, which the paper keeps
        self.adam = dict(lr=lr, weight_decay=weight_decay, beta1=0.9, beta2=0.999, eps=1e-8,
                         amsgrad=False, maximize=False, capturable=maps.is_cuda,
                         fused=maps.device.type in ("cpu", "cuda") or None)
        # Adam's state exists before the first step, so a captured step does not create it
        self.step = torch.zeros((), device=maps.device)
        self.exp_avg = torch.zeros_like(self.ae.flat)
        self.exp_avg_sq = torch.zeros_like(self.ae.flat)
        self.buffers = _Buffers(maps, hidden)
        self.loss = maps.new_zeros(())

    def state(self) -> list[torch.Tensor]:
        """What an epoch changes for good: the weights and Adam's state."""
        return [self.ae.flat, self.step, self.exp_avg, self.exp_avg_sq]

    def epoch(self) -> None:
        ae, b = self.ae, self.buffers
        _gradients(self.maps, ae.w1, ae.b1, ae.w2, ae.b2, ae.g_w1, ae.g_b1, ae.g_w2, ae.g_b2,
                   b.hidden, b.out, b.delta, b.slope, b.hidden_delta, b.inactive, b.one,
                   self.loss, self.track_loss)
        # torch.optim.Adam's update, without an Optimizer object's per-call bookkeeping
        adam([self.ae.flat], [self.ae.flat.grad], [self.exp_avg], [self.exp_avg_sq], [],
             [self.step], **self.adam)

    def compiled_epochs(self, run: Callable[..., int], epochs: int, tolerance: float) -> int:
        """Up to ``epochs`` epochs and the early stop in one call of ``run``
        (``_compiled_cpu_epochs``) on this training's tensors and Adam's settings; the epochs
        run."""
        ae, b, a = self.ae, self.buffers, self.adam
        return run(self.maps, ae.w1, ae.b1, ae.w2, ae.b2, ae.g_w1, ae.g_b1, ae.g_w2, ae.g_b2,
                   [ae.flat], [ae.flat.grad], [self.exp_avg], [self.exp_avg_sq], [self.step],
                   b.hidden, b.out, b.delta, b.slope, b.hidden_delta, b.inactive, b.one,
                   self.loss, epochs, a["lr"], a["beta1"], a["beta2"], a["eps"],
                   a["weight_decay"], tolerance, PATIENCE)

    def errors(self) -> torch.Tensor:
        """R (K,), eq. (12), of the current weights."""
        ae, b = self.ae, self.buffers
        _forward(self.maps, ae.w1, ae.b1, ae.w2, ae.b2, b.hidden, b.out)
        return (b.out - self.maps).abs().mean(dim=1)


def captured(training: _Training) -> Callable[[], None]:
    """``training.epoch`` as a CUDA graph: one launch replays its kernels, which at these
    sizes take less time than Python takes to launch them one by one. Capturing needs one
    eager run first (cuBLAS creates its workspace on first use); it runs on a side stream and
    its step is undone."""
    saved = [t.clone() for t in training.state()]
    side = torch.cuda.Stream(training.maps.device)
    side.wait_stream(torch.cuda.current_stream(training.maps.device))
    with torch.cuda.stream(side):
        training.epoch()
    torch.cuda.current_stream(training.maps.device).wait_stream(side)
    for tensor, value in zip(training.state(), saved):
        tensor.copy_(value)
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
    compiled: bool = True,
) -> tuple[torch.Tensor, int]:
    """Train a fresh autoencoder on ``maps`` (K, D); return R (K,), eq. (12), and the epochs run.

    Deterministic for a given ``seed`` (the initialisation is drawn from a private generator).
    On a GPU the epoch runs as a CUDA graph (``cuda_graph=False``: launched op by op); on a
    CPU the epochs run compiled (``_cpu_epochs``; ``compiled=False``, or where it cannot be
    compiled: op by op from Python, the same numbers).
    """
    if maps.dim() != 2:
        raise ValueError(f"maps must be (K, D), got {tuple(maps.shape)}")
    maps = maps.detach().float().contiguous()
    with torch.no_grad():
        training = _Training(maps, hidden, lr, weight_decay, seed, track_loss=tolerance > 0)
        run = _compiled_cpu_epochs() if maps.device.type == "cpu" and compiled else None
        if run is not None:
            ran = training.compiled_epochs(run, epochs, tolerance)
            return training.errors(), ran
        epoch = captured(training) if maps.is_cuda and cuda_graph else training.epoch
        best, stale, ran = float("inf"), 0, 0
        for ran in range(1, epochs + 1):
            epoch()
            if tolerance > 0:
                best, stale = _stalled(training.loss.item(), best, stale, tolerance)
                if stale >= PATIENCE:
                    break
        return training.errors(), ran
