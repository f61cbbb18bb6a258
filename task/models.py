"""Image classifiers by name, adapted to a dataset's channels, image size and classes.

One registry maps a model name to a builder; ``build_model`` is the only entry point.
Each entry also names the layer whose activations class-activation maps read by default
(the last convolutional stage, the usual Grad-CAM/LayerCAM choice for that architecture).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


class FaaDlCnn(nn.Module):
    """The MNIST CNN of FAA-DL (section VI-A): two 5x5 convolutions (32 and 64 channels), each
    followed by ReLU and 2x2 max-pooling, a 320-unit fully connected layer, and the output layer.

    ``batch_norm=True`` adds batch normalisation after each convolution, as FAA-DL does for
    Fashion-MNIST.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=5)
        self.bn1 = norm(32)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5)
        self.bn2 = norm(64)
        self.pool = nn.MaxPool2d(2)
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"image_size={image_size} is too small for the CNN (needs >= 16)")
        self.fc1 = nn.Linear(64 * side * side, 320)
        self.fc2 = nn.Linear(320, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def _adapt_resnet(model: nn.Module, in_channels: int, image_size: int) -> nn.Module:
    """Small images (<= 64 px) get the CIFAR stem: a 3x3 stride-1 first conv and no max-pool,
    so that 28-32 px inputs still leave a spatial map at ``layer4``."""
    if image_size <= 64:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def _resnet18(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    from torchvision.models import resnet18

    return _adapt_resnet(resnet18(num_classes=num_classes), in_channels, image_size)


def _resnet50(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    from torchvision.models import resnet50

    return _adapt_resnet(resnet50(num_classes=num_classes), in_channels, image_size)


def _regnety_800mf(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    from torchvision.models import regnet_y_800mf

    model = regnet_y_800mf(num_classes=num_classes)
    stem_conv = model.stem[0]
    stride = 1 if image_size <= 64 else 2
    if in_channels != 3 or stride != 2:
        model.stem[0] = nn.Conv2d(
            in_channels, stem_conv.out_channels, kernel_size=3, stride=stride, padding=1,
            bias=False,
        )
    return model


def _cnn(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return FaaDlCnn(in_channels, num_classes, image_size)


@dataclass(frozen=True)
class ModelSpec:
    """A model builder and the dotted name of its default class-activation-map layer."""

    build: Callable[[int, int, int], nn.Module]
    cam_layer: str


MODELS: dict[str, ModelSpec] = {
    "cnn": ModelSpec(_cnn, "conv2"),
    "resnet18": ModelSpec(_resnet18, "layer4"),
    "resnet50": ModelSpec(_resnet50, "layer4"),
    "regnety-800mf": ModelSpec(_regnety_800mf, "trunk_output"),
}


def build_model(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Build the named model for images of ``in_channels x image_size x image_size``."""
    try:
        spec = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None
    return spec.build(in_channels, num_classes, image_size)


def output_layer_names(model: nn.Module) -> tuple[str, ...]:
    """The state-dict names of the parameters of the model's last ``nn.Linear`` (the classifier
    head: its weight and bias), the coordinates the ``head-direction`` view reads."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear output layer")
    prefix = f"{linears[-1]}." if linears[-1] else ""
    return tuple(prefix + name for name, _ in model.get_submodule(linears[-1]).named_parameters())


def default_cam_layer(name: str) -> str:
    """Dotted module name of the model's default LayerCAM target layer."""
    return MODELS[name].cam_layer


def feature_map_problem(model: nn.Module, layer: str, example: torch.Tensor) -> str:
    """Why ``layer`` of ``model`` cannot be a class-activation map's target for ``example``
    (a (1, C, H, W) input), or "": it must run once per forward pass (a module used twice,
    such as a shared pooling layer, has no single map) and give a (N, C, h, w) feature map."""
    outputs: list[tuple[int, ...]] = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda _m, _i, output: outputs.append(tuple(getattr(output, "shape", ()))))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        handle.remove()
        model.train(was_training)
    if len(outputs) != 1:
        return f"runs {len(outputs)} times in a forward pass; a class-activation map needs one"
    if len(outputs[0]) != 4 or min(outputs[0][2:]) < 1:
        return (f"gives {outputs[0]}-shaped outputs; a class-activation map needs a "
                f"convolutional (N, C, h, w) feature map")
    return ""
