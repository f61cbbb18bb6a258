"""Checkpoints of a run and resuming from one (run-config key ``resume-from``).

After every round the harness saves, in the run's results folder, what the rest of the run
depends on: the global model, the defense's state carried between rounds
(``DetectingFedAvg.checkpoint_state``: LayerCAM-AE's evidence, spreads and votes, the nodes
seen), the detection log, and the server's random generators. A resumed run restores them and
goes on from the next round in the same folder, so that it ends as the uninterrupted run would.
"""

from __future__ import annotations

import json
import random
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common import log

from server_app.results import ResultsWriter, RoundLog
from strategies.base import DetectingFedAvg
from task.config import ConfigError, RunConfig

RESUMABLE_CHANGES = ("resume-from", "num-server-rounds", "round-timeout", "node-wait-timeout",
                     "results-dir")
"""Run-config keys a resumed run may set differently from the run it resumes (more rounds,
other timeouts); any other difference would make the resumed run a different experiment."""


def save_checkpoint(writer: ResultsWriter, server_round: int, arrays: ArrayRecord,
                    strategy: DetectingFedAvg, round_log: RoundLog) -> None:
    """The state after ``server_round``, atomically replacing the previous checkpoint."""
    import torch

    writer.save_checkpoint({
        "round": server_round, "arrays": {k: v.numpy() for k, v in arrays.items()},
        "strategy": strategy.checkpoint_state(), "log": round_log.checkpoint_state(),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                "torch": torch.get_rng_state()}})


def open_resumed_run(config: RunConfig) -> tuple[ResultsWriter, dict[str, Any]]:
    """The writer and checkpoint of the run ``resume-from`` names; ``ConfigError`` when the
    folder has no checkpoint or was run with a different config."""
    path = Path(config.resume_from).expanduser().resolve()
    try:
        saved = json.loads((path / "config.json").read_text())
        checkpoint = ResultsWriter(path).load_checkpoint()
    except (OSError, ValueError) as err:
        raise ConfigError(f"resume-from={config.resume_from!r}: {err}") from err
    current = config.to_run_config()
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
    if changed:
        raise ConfigError(f"resume-from={config.resume_from!r} was run with other values of "
                          f"{changed}: resume with the same run config")
    if checkpoint["round"] > config.num_server_rounds:
        raise ConfigError(f"num-server-rounds={config.num_server_rounds} but the run to resume "
                          f"has finished {checkpoint['round']} rounds")
    return ResultsWriter.reopen(path, checkpoint["round"]), checkpoint


def restore(checkpoint: dict[str, Any], strategy: DetectingFedAvg,
            connected: set[int]) -> ArrayRecord:
    """Put the strategy's state and the random generators back; return the global model.

    Per-client state is keyed by Flower node id: when none of the checkpoint's nodes is
    ``connected`` (a restarted simulation, whose nodes Flower numbers anew), it starts afresh."""
    import torch

    if checkpoint["strategy"]["participants"] & connected:
        strategy.restore_state(checkpoint["strategy"])
    else:
        log(WARNING, "None of the resumed run's node ids is connected: the defense's "
            "per-client state starts afresh")
    rng = checkpoint["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    return ArrayRecord({k: Array(v) for k, v in checkpoint["arrays"].items()})
