"""Batched heat maps agree with pytorch-grad-cam (the independent oracle), model by model."""

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM, LayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from strategies.detection.heatmaps import gradcam_heatmaps, layercam_heatmaps, stack_states
from task.models import build_model


def _models(name, channels, size, k=4):
    torch.manual_seed(0)
    models = []
    for _ in range(k):
        model = build_model(name, channels, 10, size)
        for module in model.modules():  # distinct BatchNorm statistics per model
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 1.5)
        models.append(model.eval())
    return models


def _oracle(cam_class, models, layer, probes, classes):
    maps = []
    for model in models:
        with cam_class(model=model, target_layers=[model.get_submodule(layer)]) as cam:
            maps.append(cam(input_tensor=probes,
                            targets=[ClassifierOutputTarget(int(c)) for c in classes]))
    return np.stack(maps)


@pytest.mark.parametrize("engine", ["loop", "vmap"])
@pytest.mark.parametrize("name,channels,size,layer", [
    ("cnn", 1, 28, "conv2"), ("resnet18", 3, 32, "layer4"),
])
@pytest.mark.parametrize("ours,cam_class", [(layercam_heatmaps, LayerCAM), (gradcam_heatmaps, GradCAM)])
def test_matches_pytorch_grad_cam(engine, name, channels, size, layer, ours, cam_class):
    models = _models(name, channels, size)
    probes = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([3, 7, 0])
    template = build_model(name, channels, 10, size)
    maps = ours(template, [m.state_dict() for m in models], probes, layer, classes,
                engine=engine)
    expected = _oracle(cam_class, models, layer, probes, classes)
    assert maps.shape == (4, 3, size, size)
    np.testing.assert_allclose(maps.numpy(), expected, atol=1e-4)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0


def test_engines_agree_and_template_weights_are_ignored(monkeypatch):
    import strategies.detection.heatmaps

    monkeypatch.setattr(strategies.detection.heatmaps, "VMAP_CHUNK", 4)  # 6 models: two vmapped chunks
    models = _models("cnn", 1, 28, k=6)
    probes = torch.randn(2, 1, 28, 28)
    states = [m.state_dict() for m in models]
    classes = torch.tensor([1, 2])
    a = layercam_heatmaps(build_model("cnn", 1, 10, 28), states, probes, "conv2", classes, "loop")
    b = layercam_heatmaps(build_model("cnn", 1, 10, 28), states, probes, "conv2", classes, "vmap")
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    assert not torch.allclose(a[0], a[1])  # different models, different maps
    assert not torch.allclose(a[4], a[5])


@pytest.mark.parametrize("engine", ["loop", "vmap"])
def test_non_convolutional_layer_is_refused(engine):
    models = _models("cnn", 1, 28, k=2)
    with pytest.raises(ValueError, match=r"'fc1' gives \(1, 320\)-shaped outputs"):
        layercam_heatmaps(build_model("cnn", 1, 10, 28), [m.state_dict() for m in models],
                          torch.randn(1, 1, 28, 28), "fc1", torch.tensor([0]), engine)


@pytest.mark.parametrize("name", ["resnet50", "regnety-800mf"])
def test_deeper_models_give_agreeing_maps_with_both_engines(name):
    from task.models import default_cam_layer

    models = _models(name, 3, 32, k=2)
    probes = torch.randn(1, 3, 32, 32)
    layer, classes = default_cam_layer(name), torch.tensor([4])
    states = [m.state_dict() for m in models]
    template = build_model(name, 3, 10, 32)
    a = layercam_heatmaps(template, states, probes, layer, classes, "loop")
    b = layercam_heatmaps(template, states, probes, layer, classes, "vmap")
    assert a.shape == (2, 1, 32, 32)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)
    expected = _oracle(LayerCAM, models[:1], layer, probes, classes)
    np.testing.assert_allclose(a[:1].numpy(), expected, atol=1e-4)


@pytest.mark.parametrize("engine", ["loop", "vmap"])
def test_native_maps_are_the_probe_size_maps_before_upsampling(engine):
    from strategies.detection.heatmaps import class_activation_maps, finish_maps

    models = _models("cnn", 1, 28, k=3)
    states = [{k: v.detach() for k, v in m.state_dict().items()} for m in models]
    probes = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([3, 7])
    native = class_activation_maps(models[0], states, probes, "conv2", classes, engine=engine,
                                   upsample=False)
    full = class_activation_maps(models[0], states, probes, "conv2", classes, engine=engine)
    assert native.shape == (3, 2, 8, 8) and full.shape == (3, 2, 28, 28)
    assert native.min() >= 0 and native.max() <= 1
    # upsampling the native maps the way finish_maps does gives the probe-size maps exactly
    torch.testing.assert_close(finish_maps(native, (28, 28)), full, atol=1e-6, rtol=0)
    oracle = _oracle(LayerCAM, models, "conv2", probes, classes)
    np.testing.assert_allclose(finish_maps(native, (28, 28)).numpy(), oracle, atol=1e-5)


def test_channels_last_pooling_changes_no_value_and_leaves_no_hook(monkeypatch):
    import contextlib

    import strategies.detection.heatmaps as heatmaps

    models = _models("cnn", 1, 28, k=3)
    states = [{k: v.detach() for k, v in m.state_dict().items()} for m in models]
    probes = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    classes = torch.tensor([1, 2, 3, 4])
    fast = heatmaps.class_activation_maps(models[0], states, probes, "conv2", classes, engine="loop")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in models[0].modules())
    seen = []
    with heatmaps.channels_last_max_pool(models[0]):
        handle = models[0].pool.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
        models[0](probes)
        handle.remove()
    assert seen and all(x.is_contiguous(memory_format=torch.channels_last) for x in seen)
    monkeypatch.setattr(heatmaps, "channels_last_max_pool", lambda _model: contextlib.nullcontext())
    plain = heatmaps.class_activation_maps(models[0], states, probes, "conv2", classes, engine="loop")
    assert torch.equal(fast, plain)


def test_worker_threads_give_the_single_loops_maps_bit_for_bit():
    """One thread per template copy, each on a contiguous share of the states: every model's
    maps are computed alone, so they equal the single loop's exactly, in the states' order,
    also with more copies than states; every copy with a share runs, and the copies get their
    modes and hooks back."""
    from strategies.detection.heatmaps import class_activation_maps

    models = _models("cnn", 1, 28, k=5)
    states = [{k: v.detach() for k, v in m.state_dict().items()} for m in models]
    probes = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    classes = torch.tensor([4, 9])
    copies = [build_model("cnn", 1, 10, 28) for _ in range(4)]  # in training mode
    single = class_activation_maps(copies[0], states, probes, "conv2", classes, engine="loop")
    ran = []
    for i, copy in enumerate(copies):
        copy.conv2.register_forward_hook(lambda *_, i=i: ran.append(i))
    for n, used in ((2, [3, 2]), (3, [2, 2, 1]), (4, [2, 2, 1])):  # models per copy
        ran.clear()
        maps = class_activation_maps(copies[:n], states, probes, "conv2", classes, engine="loop")
        assert torch.equal(maps, single)
        assert [ran.count(i) for i in range(len(used))] == used and len(ran) == len(states)
    few = class_activation_maps(copies, states[:2], probes, "conv2", classes, engine="loop")
    assert torch.equal(few, single[:2])
    broken = [{**states[0], "fc1.weight": states[0]["fc1.weight"][:, :7]}] + states[1:]
    ran.clear()
    with pytest.raises(RuntimeError):  # the first share's error, once the second has ended
        class_activation_maps(copies[:2], broken, probes, "conv2", classes, engine="loop")
    assert ran.count(0) == 1 and ran.count(1) == 2
    assert torch.equal(class_activation_maps(copies[:2], states, probes, "conv2", classes,
                                             engine="loop"), single)
    assert all(c.training and len(c.conv2._forward_hooks) == 1 and not c.pool._forward_hooks
               for c in copies)


def test_stacked_states_are_each_models_tensors_in_one_buffer_per_dtype():
    """The vmap engine's K models: every tensor (floats as float32, integers as they are) the
    models' own, each dtype a region of one buffer, so that a GPU gets them in one transfer."""
    models = _models("resnet18", 3, 32, k=3)
    states = [{k: v.double() if v.is_floating_point() else v for k, v in m.state_dict().items()}
              | {"extra.counts": torch.arange(4, dtype=torch.int32) * i}
              for i, m in enumerate(models)]
    stacked = stack_states(states)
    assert list(stacked) == list(states[0])
    for name, tensor in stacked.items():
        expected = torch.stack([s[name] for s in states])
        assert tensor.dtype == (torch.float32 if expected.is_floating_point() else expected.dtype)
        assert torch.equal(tensor, expected.to(tensor.dtype)), name
    buffers = {dtype: {t.untyped_storage().data_ptr() for t in stacked.values()
                       if t.dtype == dtype} for dtype in (torch.float32, torch.int64, torch.int32)}
    assert all(len(pointers) == 1 for pointers in buffers.values()), buffers


def test_stacking_models_of_other_shapes_or_names_is_refused():
    a, b = _models("cnn", 1, 28, k=2)
    other = b.state_dict()
    other["fc2.bias"] = other["fc2.bias"][:1]  # would broadcast in a copy
    with pytest.raises(ValueError, match="model 1's tensors differ"):
        stack_states([a.state_dict(), other])
    with pytest.raises(ValueError, match="model 1's tensors differ"):
        stack_states([a.state_dict(), {k: v for k, v in b.state_dict().items() if k != "fc2.bias"}])
