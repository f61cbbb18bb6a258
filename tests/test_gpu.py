"""Detection on a CUDA GPU computes what it computes on the CPU: the heat maps against
pytorch-grad-cam run on the CPU (the independent oracle), the autoencoder's errors, and a whole
round's decision. Skipped where no GPU is present (CI has none); ``benchmarks/`` time it."""

import numpy as np
import pytest
import torch
from pytorch_grad_cam import LayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from strategies.detection.autoencoder import reconstruction_errors
from strategies.detection.heatmaps import layercam_heatmaps
from strategies.layercam_ae import LayerCamAe, LayerCamAeSettings
from strategies.records import ClientUpload
from task.models import build_model
from tests.helpers import benign_trajectory

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = torch.device("cuda")


@pytest.fixture(autouse=True)
def full_float32():
    """Float32 products on the GPU too (TF32 rounds the operands to 10 bits of mantissa)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("name,channels,size,layer", [
    ("cnn", 1, 28, "conv2"), ("resnet18", 3, 32, "layer4"),
])
def test_gpu_heatmaps_match_pytorch_grad_cam_on_the_cpu(name, channels, size, layer):
    torch.manual_seed(0)
    models = [build_model(name, channels, 10, size).eval() for _ in range(5)]
    probes = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([3, 7, 0])
    expected = []
    for model in models:
        with LayerCAM(model=model, target_layers=[model.get_submodule(layer)]) as cam:
            expected.append(cam(input_tensor=probes,
                                targets=[ClassifierOutputTarget(int(c)) for c in classes]))
    template = build_model(name, channels, 10, size).to(GPU)
    maps = layercam_heatmaps(template, [m.state_dict() for m in models], probes.to(GPU), layer,
                             classes.to(GPU))  # auto: the vmap engine on a GPU
    assert maps.is_cuda
    np.testing.assert_allclose(maps.cpu().numpy(), np.stack(expected), atol=1e-3)


@pytest.mark.parametrize("tolerance", [0.0, 0.05])
def test_gpu_autoencoder_errors_match_the_cpu(tolerance):
    """The CUDA graph replays the epoch the eager loop runs, and both train what the CPU does
    (with early stopping too: the loss read back every epoch stops them at the same epoch)."""
    maps = torch.rand(24, 256, generator=torch.Generator().manual_seed(3))
    cpu, cpu_epochs = reconstruction_errors(maps, seed=5, tolerance=tolerance)
    graph, graph_epochs = reconstruction_errors(maps.to(GPU), seed=5, tolerance=tolerance)
    eager, eager_epochs = reconstruction_errors(maps.to(GPU), seed=5, tolerance=tolerance,
                                                cuda_graph=False)
    assert graph.is_cuda and graph_epochs == eager_epochs == cpu_epochs
    assert (cpu_epochs == 200) == (tolerance == 0)
    np.testing.assert_allclose(graph.cpu().numpy(), eager.cpu().numpy(), rtol=1e-5)
    np.testing.assert_allclose(graph.cpu().numpy(), cpu.numpy(), rtol=1e-3)


def test_rounds_on_the_gpu_decide_as_on_the_cpu():
    """Three rounds of 24 honestly trained clients, three of them replaced by an inner-product
    manipulation (-3 x the benign mean update): the same maps and the same exclusions on both
    devices, and the attackers are out by the last round.

    The errors agree only to a few percent: 200 Adam steps amplify the maps' last-digit
    differences (on an H100, up to 7% relative in round 1; a different AE seed moves them more).
    """
    globals_, states, sizes, data = benign_trajectory(3, 24)
    order = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(0))
    strategies = {device: LayerCamAe(model_fn=lambda: build_model("cnn", 1, 10, 28),
                                     probes=data.test.as_float(order[:4]), target_layer="conv2",
                                     settings=LayerCamAeSettings(seed=0),
                                     probe_labels=data.test.labels[order[:4]],
                                     device=torch.device(device))
                  for device in ("cpu", "cuda")}
    for t, (global_state, round_states) in enumerate(zip(globals_, states), start=1):
        mean = {n: np.mean([s[n] for s in round_states[:21]], axis=0) for n in global_state}
        attacker = {n: (g - 3 * (mean[n] - g)).astype(g.dtype) for n, g in global_state.items()}
        uploads = [ClientUpload(c, s, float(sizes[c])) for c, s in enumerate(round_states[:21])]
        uploads += [ClientUpload(c, attacker, float(sizes[c])) for c in (21, 22, 23)]
        detections = {}
        for device, strategy in strategies.items():
            strategy.global_state = global_state
            detections[device] = strategy.detect(t, uploads)
        np.testing.assert_allclose(strategies["cuda"].heatmaps(uploads).cpu().numpy(),
                                   strategies["cpu"].heatmaps(uploads).numpy(), atol=1e-3)
        cpu, gpu = detections["cpu"], detections["cuda"]
        assert (gpu.details["engine"], cpu.details["engine"]) == ("vmap", "loop")
        assert sorted(gpu.kept) == sorted(cpu.kept), t
        errors = [np.array([d.details["reconstruction_error"][c] for c in range(24)])
                  for d in (cpu, gpu)]
        np.testing.assert_allclose(errors[1], errors[0], rtol=0.15)
    assert not {21, 22, 23} & set(gpu.kept) and len(gpu.kept) == 21
    assert gpu.timings["heatmaps"] > 0 and gpu.timings["autoencoder"] > 0
