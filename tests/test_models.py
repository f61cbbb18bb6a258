"""Every model builds and runs for every dataset shape the presets use."""

import pytest
import torch

from task.models import MODELS, build_model, default_cam_layer

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
