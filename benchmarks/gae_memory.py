"""Memory and time of one GAE craft (and its controls) on large models.

An attacker receives I benign models; the craft must not hold an I x D float64 matrix (the first
implementation did, plus a temporary of the same size: about 4 GB for 21 ResNet-50 uploads).
Each measurement runs in a fresh process: it builds I uploads of the model (the initial weights
plus N(0, 0.01^2) updates, float32), records its peak RSS, crafts once, and prints the peak RSS
growth during the craft next to the size of the uploads and of one I x D float64 copy.

    python benchmarks/gae_memory.py                          # 21 ResNet-18 uploads (CIFAR shape)
    python benchmarks/gae_memory.py --model resnet50 --benign 21
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"cnn": (1, 10, 28), "resnet18": (3, 10, 32), "resnet50": (3, 10, 32),
          "regnety-800mf": (3, 10, 32)}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(model_name: str, attack_name: str, benign: int, queue) -> None:
    import numpy as np
    import torch

    from attacks import AttackInput, build_attack
    from task.config import RunConfig
    from task.models import build_model
    from task.train import state_to_numpy

    torch.set_num_threads(1)
    torch.manual_seed(0)
    global_state = state_to_numpy(build_model(model_name, *SHAPES[model_name]))
    rng = np.random.default_rng(0)
    states = tuple({k: (v + rng.normal(0, 0.01, v.shape)).astype(v.dtype) if v.dtype.kind == "f"
                    else v for k, v in global_state.items()} for _ in range(benign))
    parameters = sum(v.size for v in global_state.values())
    attack = build_attack(RunConfig(attack=attack_name))
    before = _peak_mb()
    start = time.perf_counter()
    attack.craft(AttackInput(global_state, global_state, np.random.default_rng(1), states,
                             tuple([300.0] * benign)))
    seconds = time.perf_counter() - start
    queue.put({"model": model_name, "attack": attack_name, "parameters": parameters,
               "inputs_mb": benign * 4 * parameters / 2**20,
               "dense_mb": benign * 8 * parameters / 2**20,
               "extra_mb": _peak_mb() - before, "seconds": seconds,
               "split": getattr(getattr(attack, "last_report", None), "seconds", None)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", choices=sorted(SHAPES))
    parser.add_argument("--benign", type=int, default=21)
    parser.add_argument("--attacks", nargs="+", default=["gae", "radius-noise", "undo-update"])
    args = parser.parse_args()
    context = mp.get_context("spawn")
    print(f"| attack | model | parameters D | {args.benign} uploads (float32) | one I x D float64 "
          f"| peak RSS growth during the craft | seconds |\n|---|---|---|---|---|---|---|")
    for attack in args.attacks:
        queue = context.Queue()
        process = context.Process(target=measure, args=(args.model, attack, args.benign, queue))
        process.start()
        row = queue.get()
        process.join()
        print(f"| {row['attack']} | {row['model']} | {row['parameters']:,} | {row['inputs_mb']:.0f} MB "
              f"| {row['dense_mb']:.0f} MB | {row['extra_mb']:.0f} MB | {row['seconds']:.1f} |")
        if row["split"]:
            print("  split: " + ", ".join(f"{k} {v:.2f} s" for k, v in row["split"].items()))


if __name__ == "__main__":
    main()
