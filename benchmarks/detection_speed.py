"""LayerCAM-AE's detection cost per round (heat maps + autoencoder + decision), and what the
cheaper settings do to the scores.

**Speed** (``--part speed``): for each model and K, ``LayerCamAe.detect`` (every update view
included) on K uploads, in a
fresh process per measurement (its peak RSS growth is its own), under four settings:
- ``paper``: maps upsampled to the probe size (the paper's input), torch's default threads;
- ``paper-1-thread``: the same on one thread;
- ``native-1-thread``: maps at the target layer's resolution, one thread, one heat-map worker;
- ``native``: the same with two heat-map workers (the defaults).
On a GPU only ``paper`` and ``native`` run (threads and workers are CPU settings).
With ``--busy N``, N processes that keep a core busy run beside every measurement (a shared
server). With ``--boosted N``, N of the K updates are ten times longer: the update views
exclude them, far past the norm cut, so that they are not judged again
(``layercam-ae-rejudge-margin``) unless ``--rejudge-margin`` is larger than their excess (1e6:
the second judgement runs, as in a round whose excluded uploads are near their cuts). Times are
the median of ``--repeats`` rounds after one warm-up round.

**Autoencoder** (``--part autoencoder``): the AE alone, side by side on the same maps: the
straightforward one (``nn.Sequential``, ``loss.backward()``, unfused ``torch.optim.Adam``; the
tests' oracle) against ``strategies.detection.autoencoder`` (fused Adam on one flat buffer), one thread;
seconds and the largest relative difference of the reconstruction errors. ``--against REV``
adds ``strategies/detection/autoencoder.py`` as it was at git revision REV, run in turn with the others,
to show what a change to it costs.

**Scores** (``--part auc``): both map sizes score the same rounds of 24 clients (3 attackers of
each attack, crafted by ``attacks/``) on the embedded MNIST; the ROC AUC of the two-sided and
of the paper's score per round, and which clients each setting's rule flags.

    python benchmarks/detection_speed.py                         # CPU: all parts
    python benchmarks/detection_speed.py --part speed --busy 2
    python benchmarks/detection_speed.py --part speed --models cnn --settings native --k 24 50 100 1000
    python benchmarks/detection_speed.py --part autoencoder --k 24 100 --dims 256 --against HEAD~1
    python benchmarks/detection_speed.py --part speed --device cuda --models resnet50 --k-large 24 \
        --image-size 224
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"cnn": (1, 28), "resnet18": (3, 32), "resnet50": (3, 32)}
SETTINGS = {
    "paper": {"map_size": "probe", "threads": 0, "workers": 1},
    "paper-1-thread": {"map_size": "probe", "threads": 1, "workers": 1},
    "native-1-thread": {"map_size": "native", "threads": 1, "workers": 1},
    "native": {"map_size": "native", "threads": 1, "workers": 2},
}


def _strategy(model_name: str, setting: str, tolerance: float, device: str, probes, seed=0,
              overrides: dict | None = None):
    """``overrides``: ``LayerCamAeSettings`` fields set for this run (the views, the margin)."""
    import torch

    from strategies.layercam_ae import LayerCamAe, LayerCamAeSettings
    from task.models import build_model, default_cam_layer

    channels, size = SHAPES[model_name][0], probes.shape[-1]
    layer = default_cam_layer(model_name)
    settings = LayerCamAeSettings(**SETTINGS[setting], tolerance=tolerance, seed=seed,
                                  **(overrides or {}))
    return LayerCamAe(model_fn=lambda: build_model(model_name, channels, 10, size),
                      probes=probes, target_layer=layer, settings=settings,
                      device=torch.device(device))


def _burn() -> None:
    """Keep one core busy (a shared server's other work)."""
    import numpy as np

    a = np.random.default_rng(0).random((300, 300))
    while True:
        a = np.tanh(a @ a)


def measure_speed(model_name, k, setting, tolerance, device, repeats, image_size, boosted,
                  overrides, queue) -> None:
    import numpy as np
    import torch

    from strategies.records import ClientUpload
    from task.models import build_model
    from task.train import state_to_numpy

    channels, size = SHAPES[model_name]
    size = image_size or size
    torch.manual_seed(0)
    global_state = state_to_numpy(build_model(model_name, channels, 10, size))
    rng = np.random.default_rng(0)
    # the first ``boosted`` updates ten times longer: the views exclude them
    uploads = [ClientUpload(i, {n: (v + (10.0 if i < boosted else 1.0)
                                    * rng.normal(0, 0.01, v.shape)).astype(v.dtype)
                                if v.dtype.kind == "f" else v for n, v in global_state.items()},
                            100.0) for i in range(k)]
    probes = torch.rand(4, channels, size, size)
    strategy = _strategy(model_name, setting, tolerance, device, probes, overrides=overrides)
    strategy.global_state = global_state
    def peak_mb() -> float:  # host RSS on a CPU, allocated device memory on a GPU
        if device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    before = peak_mb()
    strategy.detect(1, uploads)  # warm-up
    rows = []
    for r in range(repeats):
        start = time.perf_counter()
        detection = strategy.detect(2 + r, uploads)
        rows.append({**detection.timings, "total": time.perf_counter() - start,
                     "epochs": detection.details["ae_epochs"]})
    queue.put({key: statistics.median(row[key] for row in rows) for key in rows[0]}
              | {"extra_mb": peak_mb() - before})


def speed(args) -> None:
    context = mp.get_context("spawn")
    burners = [context.Process(target=_burn, daemon=True) for _ in range(args.busy)]
    for burner in burners:
        burner.start()
    load = f"{args.busy} busy process(es) beside it" if args.busy else "quiet"
    # threads and workers are CPU settings: a GPU runs "paper" and "native" alone
    settings = [s for s in args.settings if args.device == "cpu" or s in ("paper", "native")]
    size = f", images {args.image_size}x{args.image_size}" if args.image_size else ""
    boosted = f", {args.boosted} boosted uploads of each K" if args.boosted else ""
    overrides = {}
    if args.rejudge_margin is not None:
        overrides["rejudge_margin"] = args.rejudge_margin
        boosted += f", layercam-ae-rejudge-margin {args.rejudge_margin:g}"
    if args.views is not None:
        from strategies.detection.update_views import VIEWS

        overrides["views"] = tuple(v for v in args.views.split(",") if v)
        unknown = [v for v in overrides["views"] if v not in VIEWS]
        if unknown:
            sys.exit(f"--views: unknown views {unknown}; the views are {', '.join(VIEWS)}")
        boosted += f", layercam-ae-views '{args.views}'"
    print(f"\nDetection per round ({args.device}{size}, {load}{boosted}; median of "
          f"{args.repeats}):\n")
    print("| model | K | setting | heat maps s | AE s (epochs) | decision s | update views s | "
          "total s | ms per client | extra MB |\n|---|---|---|---|---|---|---|---|---|---|")
    try:
        for model_name in args.models:
            for k in args.k if model_name == "cnn" else args.k_large:
                for setting in settings:
                    queue = context.Queue()
                    process = context.Process(target=measure_speed, args=(
                        model_name, k, setting, args.tolerance, args.device, args.repeats,
                        args.image_size, args.boosted, overrides, queue))
                    process.start()
                    row = queue.get()
                    process.join()
                    print(f"| {model_name} | {k} | {setting} | {row['heatmaps']:.3f} | "
                          f"{row['autoencoder']:.3f} ({row['epochs']:.0f}) | {row['decision']:.4f} | "
                          f"{row['views']:.4f} | "
                          f"{row['total']:.3f} | {1000 * row['total'] / k:.2f} | "
                          f"{row['extra_mb']:.0f} |", flush=True)
    finally:
        for burner in burners:
            burner.terminate()


def _autoencoder_at(revision: str):
    """``strategies/detection/autoencoder.py`` as it was at git ``revision``, imported as a module of its
    own beside the current one."""
    import importlib.util
    import subprocess
    import tempfile

    source = subprocess.run(["git", "show", f"{revision}:strategies/detection/autoencoder.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "autoencoder_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("autoencoder_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def autoencoder(args) -> None:
    import torch

    from strategies.detection.autoencoder import reconstruction_errors
    from tests.helpers import autograd_reconstruction_errors

    runs = {"autograd": lambda maps: autograd_reconstruction_errors(maps, hidden=128, epochs=200),
            "current": reconstruction_errors}
    if args.against:
        runs[args.against] = _autoencoder_at(args.against).reconstruction_errors
    torch.set_num_threads(1)
    print(f"\nThe autoencoder alone (hidden 128, 200 epochs, 1 thread, median of {args.repeats}):\n")
    against = f" | at {args.against} s | current / at {args.against}" if args.against else ""
    print(f"| K | values per client | autograd s | current s{against} | speed-up vs autograd | "
          f"max relative difference of R |\n|---|---|---|---|{'---|---|' if against else ''}---|---|")
    for dim in args.dims:
        for k in args.k:
            maps = torch.rand(k, dim, generator=torch.Generator().manual_seed(k))
            times, errors = {name: [] for name in runs}, {}
            for _ in range(args.repeats + 1):  # the first is a warm-up
                for name, run in runs.items():  # in turn, so that a busy spell hits them all
                    start = time.perf_counter()
                    errors[name], _ = run(maps)
                    times[name].append(time.perf_counter() - start)
            median = {name: statistics.median(t[1:]) for name, t in times.items()}
            reference, ours = errors["autograd"], errors["current"]
            difference = float(((ours - reference).abs() / reference).max())
            against = (f" | {median[args.against]:.4f} | "
                       f"{median['current'] / median[args.against]:.2f}x" if args.against else "")
            print(f"| {k} | {dim} | {median['autograd']:.4f} | {median['current']:.4f}{against} | "
                  f"{median['autograd'] / median['current']:.1f}x | {difference:.1e} |", flush=True)


def auc(args) -> None:
    import dataclasses

    import torch
    from sklearn.metrics import roc_auc_score

    from experiments.federation import LocalFederation, run_rounds
    from task.config import RunConfig

    clients, attackers, seed = 24, 3, 0
    base = RunConfig(dataset="mnist-embedded", num_clients=clients, num_attackers=attackers,
                     seed=seed, local_epochs=1, defense="fedavg")
    federation = LocalFederation(base)
    order = torch.randperm(len(federation.test), generator=torch.Generator().manual_seed(seed))
    probes = federation.test.as_float(order[:4])
    print(f"\nScores on the same rounds (24 clients, 3 attackers, embedded MNIST; AUC per round "
          f"{args.rounds} rounds; flagged = attackers / benign the two-sided rule flags):\n")
    print("| attack | setting | AUC two-sided | AUC paper's score | flagged attackers | "
          "flagged benign | AE s |\n|---|---|---|---|---|---|---|")
    every_round = range(1, args.rounds + 1)
    for attack_name in args.attacks:
        config = dataclasses.replace(base, attack=attack_name)
        strategies = {s: _strategy("cnn", s, args.tolerance, "cpu", probes, seed)
                      for s in ("paper-1-thread", "native")}
        results = {s: {"auc": [], "upper": [], "tp": 0, "fp": 0, "ae": []} for s in strategies}
        # the rounds of a run whose FedAvg drops the attackers (the same rounds for every
        # setting), each setting scoring the uploads of every round
        for played in run_rounds(federation, config, args.rounds, oracle_rounds=every_round):
            nodes = [u.node_id for u in played.uploads]
            truth = [played.truth[n] for n in nodes]
            for setting, strategy in strategies.items():
                strategy.global_state = played.global_state
                detection = strategy.detect(played.server_round, played.uploads)
                details, record = detection.details, results[setting]
                record["auc"].append(roc_auc_score(truth, [details["two_sided_scores"][n]
                                                           for n in nodes]))
                record["upper"].append(roc_auc_score(truth, [details["upper_scores"][n]
                                                             for n in nodes]))
                flagged = set(nodes) - set(detection.kept)
                record["tp"] += sum(played.truth[n] for n in flagged)
                record["fp"] += sum(not played.truth[n] for n in flagged)
                record["ae"].append(detection.timings["autoencoder"])
        for setting, record in results.items():
            print(f"| {attack_name} | {setting} | {' '.join(f'{a:.2f}' for a in record['auc'])} | "
                  f"{' '.join(f'{a:.2f}' for a in record['upper'])} | "
                  f"{record['tp']}/{attackers * args.rounds} | "
                  f"{record['fp']}/{(clients - attackers) * args.rounds} | "
                  f"{statistics.fmean(record['ae']):.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["speed", "autoencoder", "auc", "all"], default="all")
    parser.add_argument("--models", nargs="+", default=["cnn", "resnet18"], choices=sorted(SHAPES))
    parser.add_argument("--k", type=int, nargs="+", default=[24, 100, 300, 1000])
    parser.add_argument("--k-large", type=int, nargs="+", default=[24, 100],
                        help="K for the ResNets")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--image-size", type=int, default=0,
                        help="probe and model input size for every model (0: each model's "
                             "usual: 28 for the CNN, 32 for the ResNets; SPEC's GPU target: 224)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                        help="the settings --part speed measures (default: all four)")
    parser.add_argument("--busy", type=int, default=0)
    parser.add_argument("--boosted", type=int, default=0,
                        help="uploads (of each K) whose update is ten times longer: the update "
                             "views exclude them")
    parser.add_argument("--rejudge-margin", type=float, default=None,
                        help="layercam-ae-rejudge-margin (default: its default); 1e6 judges the "
                             "boosted uploads a second time")
    parser.add_argument("--views", default=None,
                        help="layercam-ae-views, comma-separated (default: its default; \"\": "
                             "the heat maps alone)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=0.0,
                        help="AE early-stopping tolerance for every setting (0: all epochs)")
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 3136],
                        help="--part autoencoder: map values per client (CNN, 4 probes: native "
                             "256, upsampled 3,136)")
    parser.add_argument("--against", default="",
                        help="--part autoencoder: also time strategies/detection/autoencoder.py as it was "
                             "at this git revision")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--attacks", nargs="+",
                        default=["gae", "sign-flip", "alie", "ipm", "gaussian", "adaptive-cam"])
    args = parser.parse_args()
    if args.part in ("speed", "all"):
        speed(args)
    if args.part in ("autoencoder", "all"):
        autoencoder(args)
    if args.part in ("auc", "all"):
        auc(args)


if __name__ == "__main__":
    main()
