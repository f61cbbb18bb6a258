"""What a deployment pays for every message: a fresh process that answers one train message
through the real ClientApp (a SuperNode starts a ``flwr-clientapp`` process per message).

Each run is a new Python process that imports the ClientApp, builds the embedded CNN's global
model, and answers a round-1 train message for client 0 of ``--clients`` (IID, two local
epochs: the default experiment's settings) through ``tests.local_grid``, which hands it to the
ClientApp in-process as a SuperNode would. A real ``flwr-clientapp`` process also starts its own
gRPC connection and loads the FAB, which this leaves out. Prints each run's CPU (user + system)
and wall seconds, and which heavy modules the process imported.

    python benchmarks/client_process.py --runs 3
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ONE_MESSAGE = """
import sys
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from task.config import RunConfig
from task.models import build_model
from tests.local_grid import LocalGrid

config = RunConfig.from_run_config({{"num-clients": {clients}, "num-attackers": 0}})
grid = LocalGrid(config.to_run_config(), {clients}, 0)
content = RecordDict({{"arrays": ArrayRecord(build_model("cnn", 1, 10, 28).state_dict()),
                      "config": ConfigRecord({{"server-round": 1}})}})
(reply,) = grid.send_and_receive([Message(content, dst_node_id=1, message_type="train",
                                          group_id="1")])
assert not reply.has_error(), reply.error
print(" ".join(m for m in {heavy} if m in sys.modules) or "-")
"""

HEAVY = ("torch._dynamo", "flwr_datasets", "datasets", "pandas", "seaborn", "sklearn")
"""Modules that a ClientApp answering a benign train message has no use for."""


def one_run(clients: int) -> tuple[float, float, str]:
    """(CPU seconds, wall seconds, heavy modules imported) of one fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", ONE_MESSAGE.format(clients=clients, heavy=HEAVY)],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return cpu, wall, done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=24)
    args = parser.parse_args()
    for run in range(1, args.runs + 1):
        cpu, wall, heavy = one_run(args.clients)
        print(f"run {run}: {cpu:.2f} s CPU, {wall:.2f} s wall; heavy modules imported: {heavy}")


if __name__ == "__main__":
    main()
