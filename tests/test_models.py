"""Every model builds and runs for every dataset shape the presets use."""

import pytest
import torch

from task.models import MODELS, build_model, default_cam_layer, output_layer_names
from task.params import columns_of
from task.train import state_to_numpy

# (in_channels, image_size, num_classes) of mnist/fashion-mnist, svhn/cifar10, cifar100,
# tiny-imagenet, celeba (64 px, binary attribute)
SHAPES = [(1, 28, 10), (3, 32, 10), (3, 32, 100), (3, 64, 200), (3, 64, 2)]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels,size,classes", SHAPES)
def test_model_output_shape_and_cam_layer(name, channels, size, classes):
    torch.manual_seed(0)
    model = build_model(name, channels, classes, size).eval()
    features = []
    model.get_submodule(default_cam_layer(name)).register_forward_hook(
        lambda _m, _i, out: features.append(out)
    )
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, classes)
    assert features[0].dim() == 4 and min(features[0].shape[-2:]) >= 2  # a spatial map for CAMs


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="'vgg'"):
        build_model("vgg", 1, 10, 28)


@pytest.mark.parametrize("name, channels, size", [("cnn", 1, 28), ("resnet18", 3, 32),
                                                  ("regnety-800mf", 3, 32)])
def test_the_output_layer_is_the_classifier_head_and_its_columns_the_last(name, channels, size):
    model = build_model(name, channels, 10, size)
    names = output_layer_names(model)
    head = model.get_submodule(names[0].rsplit(".", 1)[0])
    assert isinstance(head, torch.nn.Linear) and head.out_features == 10
    assert names == tuple(f"{names[0].rsplit('.', 1)[0]}.{p}" for p in ("weight", "bias"))
    state = state_to_numpy(model)
    columns = columns_of(state, names)
    total = sum(v.size for v in state.values() if v.dtype.kind == "f")
    assert [c.stop - c.start for c in columns] == [head.weight.numel(), head.bias.numel()]
    assert columns[-1].stop == total and columns[0].stop == columns[1].start


def test_a_model_without_a_linear_layer_has_no_output_layer():
    with pytest.raises(ValueError, match="no nn.Linear"):
        output_layer_names(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)))
    with pytest.raises(ValueError, match="no float arrays"):
        columns_of(state_to_numpy(build_model("cnn", 1, 10, 28)), ("head.weight",))
