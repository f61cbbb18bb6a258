"""Detection cost: batched LayerCAM heat maps vs the straightforward way, side by side.

For each model and K, in one run:
- ``grad-cam``: pytorch-grad-cam's ``LayerCAM``, one model at a time (deep copy of a template,
  ``load_state_dict``, full backward) -- how the library and the paper's code do it;
- ``loop`` and ``vmap``: this project's engines (``strategies.detection.heatmaps``) on the K states;
- ``ae``: the round's autoencoder (200 epochs) on the K maps, to give the whole detection time.
Each measurement runs in a fresh process so its peak memory (RSS on a CPU, allocated memory on a
GPU) is its own; "extra MB" is the peak over what the K input states already occupy. Times are
the best of ``--repeats`` after one warm-up (the least disturbed run).

    python benchmarks/heatmap_speed.py                       # CPU: cnn and resnet18, K = 24..200
    python benchmarks/heatmap_speed.py --device cuda --models resnet50 --image-size 224 --k 24
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {"cnn": (1, 28), "resnet18": (3, 32), "resnet50": (3, 32), "regnety-800mf": (3, 32)}


def _setup(model_name, k, image_size, device, probes, seed=0):
    import torch

    from task.models import build_model, default_cam_layer

    channels, default_size = SIZES[model_name]
    size = image_size or default_size
    torch.manual_seed(seed)
    template = build_model(model_name, channels, 10, size).eval()
    base = template.state_dict()
    states = []
    for i in range(k):  # K distinct models: the template's weights plus per-model noise
        g = torch.Generator().manual_seed(seed + i)
        states.append({n: (t + 0.01 * torch.randn(t.shape, generator=g)) if t.is_floating_point() else t.clone()
                       for n, t in base.items()})
    x = torch.randn(probes, channels, size, size, generator=torch.Generator().manual_seed(seed))
    layer = default_cam_layer(model_name)
    return template, states, x.to(device), layer, torch.zeros(probes, dtype=torch.long, device=device)


def _peak_memory_mb(device):
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _measure(job):
    """Run one (method, model, K) measurement; executed in a fresh process."""
    import torch

    method, model_name, k, image_size, device, probes, repeats, threads = job
    torch.set_num_threads(threads)
    template, states, x, layer, classes = _setup(model_name, k, image_size, device, probes)
    template = template.to(device)

    if method == "grad-cam":
        from pytorch_grad_cam import LayerCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        targets = [ClassifierOutputTarget(int(c)) for c in classes]

        def run():
            for state in states:
                model = copy.deepcopy(template)
                model.load_state_dict(state)
                with LayerCAM(model=model, target_layers=[model.get_submodule(layer)]) as cam:
                    cam(input_tensor=x, targets=targets)
    elif method in ("loop", "vmap"):
        from strategies.detection.heatmaps import layercam_heatmaps

        def run():
            layercam_heatmaps(template, states, x, layer, classes, engine=method)
            if device == "cuda":
                torch.cuda.synchronize()
    elif method == "ae":
        from strategies.detection.autoencoder import reconstruction_errors

        maps = torch.rand(k, probes * x.shape[-1] * x.shape[-2], device=device)

        def run():
            reconstruction_errors(maps)
            if device == "cuda":
                torch.cuda.synchronize()
    else:
        raise ValueError(method)

    baseline_mb = _peak_memory_mb(device)  # the K states (and on a GPU nothing else)
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"method": method, "model": model_name, "k": k, "seconds": min(times),
            "peak_mb": _peak_memory_mb(device), "setup_mb": baseline_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "resnet18"], choices=sorted(SIZES))
    parser.add_argument("--k", nargs="+", type=int, default=[24, 48, 100, 200])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--image-size", type=int, default=0, help="0: the model's usual size")
    parser.add_argument("--probes", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline-max-k", type=int, default=200,
                        help="skip the (slow) grad-cam baseline above this K")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.baseline_max_k >= min(args.k):
        try:
            import pytorch_grad_cam  # noqa: F401 -- the baseline, in the [test] extra
        except ImportError:
            sys.exit("heatmap_speed.py: the grad-cam baseline needs pytorch-grad-cam: pip "
                     "install -e '.[test]' (or --baseline-max-k 0 to time this project's "
                     "engines alone)")

    ctx = mp.get_context("spawn")
    rows = []
    header = (f"{'model':14} {'K':>4} {'method':9} {'total s':>9} {'ms/model':>9} "
              f"{'vs grad-cam':>11} {'extra MB':>9}")
    print(f"device={args.device} probes={args.probes} threads={args.threads}\n{header}", flush=True)
    for model_name in args.models:
        for k in args.k:
            methods = (["grad-cam"] if k <= args.baseline_max_k else []) + ["loop", "vmap", "ae"]
            reference = None
            for method in methods:
                job = (method, model_name, k, args.image_size, args.device, args.probes,
                       args.repeats, args.threads)
                with ctx.Pool(1) as pool:
                    row = pool.apply(_measure, (job,))
                rows.append(row)
                if method == "grad-cam":
                    reference = row["seconds"]
                ratio = f"{reference / row['seconds']:10.1f}x" if reference and method != "ae" else f"{'':>11}"
                print(f"{model_name:14} {k:4d} {method:9} {row['seconds']:9.3f} "
                      f"{1000 * row['seconds'] / k:9.2f} {ratio} {row['peak_mb'] - row['setup_mb']:9.0f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
