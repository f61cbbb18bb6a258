"""A measured run of a BatchNorm model (the paper's ResNet-18 by default) on a CPU: the
ServerApp's harness (``server_app.app.run_experiment``: screening, LayerCAM-AE, evaluation on the
server's 2,000 test images, results folder) over real ClientApps called in-process
(``tests.local_grid``), so that a small federation of large models fits a 2-core machine: more
partitions than nodes keeps each node's data small.

    python -m benchmarks.batchnorm_run --model resnet18 --nodes 8 --partitions 80 --rounds 3

Prints each round's progress line (the harness's), then accuracy, detection and seconds a
round with their split (client training, detection, evaluation).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.cli import run_config_override


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--attackers", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--attack", default="gae")
    parser.add_argument("--set", type=run_config_override, action="append", default=[],
                        metavar="KEY=VALUE", help="any other run-config key")
    args = parser.parse_args()

    import torch

    from server_app.app import run_experiment
    from task.config import RunConfig
    from tests.local_grid import LocalGrid

    torch.set_num_threads(1)  # as a simulated client and the defense's default
    results = Path(tempfile.mkdtemp(prefix="batchnorm-run-"))
    run_config = {**RunConfig().to_run_config(), "model": args.model, "num-clients": args.nodes,
                  "num-attackers": args.attackers, "attack": args.attack,
                  "num-server-rounds": args.rounds, "local-epochs": 1,
                  "results-dir": str(results),
                  "eavesdrop-in-deployment": True,  # the in-process grid is no simulation
                  **dict(args.set)}
    grid = LocalGrid(run_config, args.nodes, args.attackers, num_partitions=args.partitions)
    start = time.perf_counter()
    summary = run_experiment(grid, RunConfig.from_run_config(run_config))
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in
            (Path(summary["results_dir"]) / "rounds.jsonl").read_text().splitlines()]
    print(f"\n{args.model}: {args.nodes} nodes ({args.attackers} {args.attack}), "
          f"{args.partitions} partitions, {args.rounds} rounds, {wall:.0f} s in all")
    for row in rows[1:]:
        record = row["defense"]
        detection = sum(record["timings"].values())
        print(f"round {row['round']}: {row['seconds']:.1f} s (detection {detection:.2f} s), "
              f"accuracy {row['accuracy']:.4f}, excluded {record['excluded']}, "
              f"rejected {sorted(record['rejected'])}, attackers {row.get('attackers')}, "
              f"F1 {row['detection']['f1']:.2f}")
    print("pooled detection:", json.dumps(summary["detection"]))


if __name__ == "__main__":
    main()
