"""Class-activation heat maps of K models at once: LayerCAM (eq. 9-10) and Grad-CAM.

One pipeline, as in pytorch-grad-cam: activations A and gradients dy^c/dA of the target layer
-> per-method combination -> ReLU -> min-max scale -> bilinear upsample to the probe size ->
min-max scale. LayerCAM and Grad-CAM differ only in the combination:

- LayerCAM (Jiang et al. 2021; LayerCAM-AE eq. 9-10): L = ReLU(sum_k ReLU(dy^c/dA_k) * A_k)
- Grad-CAM (Selvaraju et al. 2017): L = ReLU(sum_k mean_ij(dy^c/dA_k) * A_k)

The K models are one template module plus K state dicts (parameters and buffers, e.g. the
uploads' numpy arrays): ``torch.func.functional_call`` runs the template with model k's tensors,
so no model is deep-copied and every model is in eval mode with its own BatchNorm statistics.

Gradients start at the target layer: a forward hook swaps the layer's output for a detached leaf
(or adds a zero tensor whose gradient we take, under ``vmap``), and as no parameter requires
grad, autograd records only the head after the target layer. Two engines compute the same maps:

- ``loop``: a Python loop over models with ``torch.autograd.grad``; it reads each state in place
  (zero-copy views of numpy arrays on a CPU) and combines each model's activations and
  gradients while they are in cache, so it needs no memory beyond one model's activations
  (fastest on a CPU). Given several copies of the template, it runs one thread per copy (the
  caller's own thread takes the first), each on a contiguous share of the models: coarse
  parallelism, one join per call, so a thread that the OS pauses delays only its own share
  (torch's intra-op threads synchronise after every operation, and stall on every pause when
  other processes share the cores);
- ``vmap``: ``torch.func.vmap(torch.func.grad(...))`` over the states stacked along a leading K
  axis, one batched pass (convolutions become grouped ones; faster for small models and the
  natural way to fill a GPU), at the cost of one stacked copy of the K models.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import wait
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from strategies.detection.worker_pools import worker_pool

CamCombine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def layercam_combine(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """LayerCAM, eq. (9)-(10) before the final ReLU: sum_k ReLU(grad_k) * A_k (channel dim -3)."""
    return (torch.relu(gradients) * activations).sum(dim=-3)


def gradcam_combine(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM before the final ReLU: sum_k mean_ij(grad_k) * A_k."""
    weights = gradients.mean(dim=(-2, -1), keepdim=True)
    return (weights * activations).sum(dim=-3)


def stack_states(
    states: Sequence[Mapping[str, np.ndarray | torch.Tensor]], device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Stack K state dicts into one dict of tensors with a leading K axis (float32 for floats).

    The K models are packed on the host into one buffer per dtype, each tensor name a (K, ...)
    region of it, and each buffer goes to the device in one transfer, from page-locked memory
    when the device is a GPU: one large copy instead of one per tensor and model (a ResNet-50
    has 320 tensors), at the bandwidth only pinned memory reaches. The stacked tensors are views
    of the device's buffers."""
    if not states:
        raise ValueError("no models to stack")
    device = torch.device(device)
    tensors = [as_tensors(state) for state in states]  # zero-copy views of numpy arrays
    first = tensors[0]
    for k, model in enumerate(tensors[1:], start=1):
        if model.keys() != first.keys() or any(model[n].shape != first[n].shape for n in first):
            raise ValueError(f"model {k}'s tensors differ from model 0's in names or shapes")
    dtypes = {name: torch.float32 if t.is_floating_point() else t.dtype
              for name, t in first.items()}
    out = {}
    for dtype in dict.fromkeys(dtypes.values()):  # each dtype once, in the names' order
        places, size = {}, 0  # name -> (start, shape) in this dtype's buffer
        for name in (n for n, d in dtypes.items() if d == dtype):
            places[name] = size, (len(tensors), *first[name].shape)
            size += math.prod(places[name][1])
        host = torch.empty(size, dtype=dtype, pin_memory=device.type == "cuda")
        for name, place in places.items():
            region = _region(host, *place)
            for k, model in enumerate(tensors):
                region[k].copy_(model[name])
        moved = host.to(device)  # the one transfer
        out.update({name: _region(moved, *place) for name, place in places.items()})
    return {name: out[name] for name in first}


def _region(buffer: torch.Tensor, start: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The view of flat ``buffer`` from ``start`` with ``shape``."""
    return buffer[start:start + math.prod(shape)].view(shape)


def as_tensors(state: Mapping[str, np.ndarray | torch.Tensor],
               device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """One model's state as tensors on ``device``, sharing memory with numpy arrays on a CPU."""
    with warnings.catch_warnings():  # read-only buffers (Flower's arrays) are only read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {n: (torch.from_numpy(v) if isinstance(v, np.ndarray) else torch.as_tensor(v))
                .to(device) for n, v in state.items()}


def min_max_scale(maps: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale each map (last two dims) to [0, 1] as pytorch-grad-cam does: (x - min) / (eps + max)."""
    flat = maps.flatten(-2)
    flat = flat - flat.min(dim=-1, keepdim=True).values
    flat = flat / (eps + flat.max(dim=-1, keepdim=True).values)
    return flat.view_as(maps)


def finish_maps(cams: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """ReLU, scale, upsample (bilinear) to ``size`` and scale again: (..., h, w) -> (..., H, W).
    ``size=None`` keeps the target layer's resolution (ReLU and scale only)."""
    if size is None:
        return min_max_scale(torch.relu(cams))
    lead = cams.shape[:-2]
    cams = min_max_scale(torch.relu(cams)).reshape(-1, 1, *cams.shape[-2:])
    up = nn.functional.interpolate(cams, size=size, mode="bilinear", align_corners=False)
    return min_max_scale(up.reshape(*lead, *size))


@contextmanager
def channels_last_max_pool(model: nn.Module) -> Iterator[None]:
    """Run the model's ``nn.MaxPool2d`` layers on channels-last copies of their inputs and hand
    their outputs on in the usual layout: the same values, but on a CPU this torch's NCHW max
    pooling is much slower than its channels-last one (docs/benchmarks.md)."""
    handles = []
    for module in model.modules():
        if isinstance(module, nn.MaxPool2d):
            handles.append(module.register_forward_pre_hook(
                lambda _m, inputs: (inputs[0].contiguous(memory_format=torch.channels_last),
                                    *inputs[1:])))
            handles.append(module.register_forward_hook(lambda _m, _i, output: output.contiguous()))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_feature_map(layer: str, shape: torch.Size) -> None:
    """A class-activation map needs the target layer to give a (P, C, h, w) feature map."""
    if len(shape) != 4:
        raise ValueError(
            f"target layer {layer!r} gives {tuple(shape)}-shaped outputs; a "
            f"class-activation map needs a convolutional (P, C, h, w) feature map"
        )


def _cams_loop(
    model: nn.Module, states: Sequence[Mapping[str, np.ndarray | torch.Tensor]],
    probes: torch.Tensor, layer: str, classes: torch.Tensor, combine: CamCombine,
) -> torch.Tensor:
    """(K, P, h, w) combined maps, one model at a time: each model's activations and gradients
    are combined while they are in cache, rather than stacking all of them first."""
    module = model.get_submodule(layer)
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf.clone()  # later in-place ops must not touch the captured activations

    handle = module.register_forward_hook(hook)
    cams = []
    pooling = (channels_last_max_pool(model) if probes.device.type == "cpu" and probes.dim() == 4
               else nullcontext())
    try:
        with torch.enable_grad(), pooling:
            for state in states:
                captured.clear()
                # every state holds every name, tied ones included: no tying to work out
                logits = functional_call(model, as_tensors(state, probes.device), (probes,),
                                         tie_weights=False)
                score = logits.gather(1, classes[:, None]).sum()  # probes are independent in eval
                (gradient,) = torch.autograd.grad(score, captured[0])
                _check_feature_map(layer, gradient.shape)
                cams.append(combine(captured[0].detach(), gradient))
    finally:
        handle.remove()
    return torch.stack(cams)


def _cams_threads(
    models: Sequence[nn.Module], states: Sequence[Mapping[str, np.ndarray | torch.Tensor]],
    probes: torch.Tensor, layer: str, classes: torch.Tensor, combine: CamCombine,
) -> torch.Tensor:
    """The loop on one thread per template copy in ``models`` (a copy each: a forward hook and
    ``functional_call`` modify the module they run on), each on a contiguous share of the
    states; every model's maps are computed alone, so they equal the single loop's."""
    share = -(-len(states) // len(models))
    jobs = [(model, states[i * share:(i + 1) * share]) for i, model in enumerate(models)]
    jobs = [(model, part) for model, part in jobs if part]
    threads = torch.get_num_threads()

    def run(job):  # a new thread starts with the OpenMP/MKL defaults, not the caller's count
        torch.set_num_threads(threads)
        return _cams_loop(job[0], job[1], probes, layer, classes, combine)

    # the calling thread takes the first share: its core is awake, a pool thread's may not be
    # (with one share no pool is made)
    futures = [worker_pool("heatmaps", len(jobs) - 1).submit(run, job) for job in jobs[1:]]
    try:
        first = _cams_loop(jobs[0][0], jobs[0][1], probes, layer, classes, combine)
    finally:
        wait(futures)  # all shares end before an error propagates: no copy serves two calls
    return torch.cat([first, *(future.result() for future in futures)])


def _target_shape(model: nn.Module, state: Mapping[str, torch.Tensor], probes: torch.Tensor,
                  layer: str) -> torch.Size:
    shape: list[torch.Size] = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda _m, _i, out: shape.append(out.shape)
    )
    try:
        with torch.no_grad():
            functional_call(model, dict(state), (probes,))
    finally:
        handle.remove()
    return shape[0]


VMAP_CHUNK = 24
"""Models per vmapped pass: bounds the stacked copy, and larger batches of grouped
convolutions were slower per model on a CPU (benchmarks/heatmap_speed.py)."""


def _cams_vmap(
    model: nn.Module, states: Sequence[Mapping[str, np.ndarray | torch.Tensor]],
    probes: torch.Tensor, layer: str, classes: torch.Tensor, combine: CamCombine,
) -> torch.Tensor:
    """(K, P, h, w) combined maps, ``VMAP_CHUNK`` models per vmapped pass."""
    # The target layer's output shape is the same for every model: one probing forward.
    shape = _target_shape(model, as_tensors(states[0], probes.device), probes, layer)
    _check_feature_map(layer, shape)
    zero = torch.zeros(shape, device=probes.device)
    return torch.cat([
        combine(*_activations_and_gradients_vmap_chunk(
            model, states[i : i + VMAP_CHUNK], probes, layer, classes, zero))
        for i in range(0, len(states), VMAP_CHUNK)
    ])


def _activations_and_gradients_vmap_chunk(
    model: nn.Module, states: Sequence[Mapping[str, np.ndarray | torch.Tensor]],
    probes: torch.Tensor, layer: str, classes: torch.Tensor, zero: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    module = model.get_submodule(layer)
    stacked = stack_states(states, probes.device)

    def score(state: dict[str, torch.Tensor], zero: torch.Tensor):
        captured: list[torch.Tensor] = []

        def hook(_module, _inputs, output):
            captured.append(output)
            return output + zero  # d score / d zero = d score / d A

        handle = module.register_forward_hook(hook)
        try:
            logits = functional_call(model, state, (probes,))
        finally:
            handle.remove()
        return logits.gather(1, classes[:, None]).sum(), captured[0]

    gradients, activations = vmap(grad(score, argnums=1, has_aux=True), in_dims=(0, None))(
        dict(stacked), zero
    )
    return activations, gradients


def engine_for(device: torch.device) -> str:
    """What ``auto`` means: vmap on a GPU, the loop on a CPU (by device, never by timing)."""
    return "vmap" if device.type == "cuda" else "loop"


def class_activation_maps(
    model: nn.Module | Sequence[nn.Module],
    states: Sequence[Mapping[str, np.ndarray | torch.Tensor]],
    probes: torch.Tensor,
    layer: str,
    classes: torch.Tensor,
    combine: CamCombine = layercam_combine,
    engine: str = "auto",
    upsample: bool = True,
) -> torch.Tensor:
    """Heat maps of K models for P probes: (K, P, H, W) in [0, 1] (``upsample=False``: at the
    target layer's resolution h x w).

    ``model`` is the architecture template (its own weights are ignored), on the probes'
    device, or several copies of it: the loop engine then runs one thread per copy; ``states``
    holds the K models' parameters and buffers (numpy arrays or tensors);
    ``probes`` is (P, C, H, W); ``classes`` (P,) the class c scored for each probe; ``layer`` the
    dotted name of the target module. ``engine`` is ``loop``, ``vmap`` or ``auto`` (vmap on a
    GPU, loop on a CPU).
    """
    if engine == "auto":
        engine = engine_for(probes.device)
    if engine not in ("loop", "vmap"):
        raise ValueError(f"unknown heat-map engine {engine!r}; choose loop, vmap or auto")
    models = [model] if isinstance(model, nn.Module) else list(model)
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        cams = (_cams_vmap(models[0], states, probes, layer, classes.long(), combine)
                if engine == "vmap" else
                _cams_threads(models, states, probes, layer, classes.long(), combine))
    finally:
        for m, training in zip(models, was_training):
            m.train(training)
    return finish_maps(cams, tuple(probes.shape[-2:]) if upsample else None)


States = Sequence[Mapping[str, np.ndarray | torch.Tensor]]


def layercam_heatmaps(model: nn.Module, states: States, probes: torch.Tensor, layer: str,
                      classes: torch.Tensor, engine: str = "auto") -> torch.Tensor:
    """LayerCAM heat maps (eq. 9-10) of K models: (K, P, H, W). See ``class_activation_maps``."""
    return class_activation_maps(model, states, probes, layer, classes, layercam_combine, engine)


def gradcam_heatmaps(model: nn.Module, states: States, probes: torch.Tensor, layer: str,
                     classes: torch.Tensor, engine: str = "auto") -> torch.Tensor:
    """Grad-CAM heat maps of K models: (K, P, H, W). See ``class_activation_maps``."""
    return class_activation_maps(model, states, probes, layer, classes, gradcam_combine, engine)
