"""``layercam-sweep`` and ``layercam-report`` on real Flower runs (the session's simulation
SuperLink): a grid of two cells, the second of which fails (more clients than the federation
has); the sweep is stopped (SIGTERM) once its first cell is done and run again: the done cell
is not run again, the failure is recorded. The report's table equals the metrics
recomputed with scikit-learn from the rows, and every plot is written."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from experiments.report import find_runs
from tests.local_federation import BIN

pytestmark = pytest.mark.e2e

GRID = """
[sweep]
seeds = [42]
[base]
num-server-rounds = 1
num-attackers = 1
attack = "sign-flip"
sign-flip-scale = 4.0
local-epochs = 1
layercam-ae-epochs = 30
layercam-ae-save-heatmaps = true
[grid]
defense = ["layercam-ae"]
num-clients = [3, 4]
"""


def sweep_command(grid: Path, sweep_dir: Path, app: Path) -> list[str]:
    return [str(BIN / "layercam-sweep"), str(grid), "--sweep-dir", str(sweep_dir),
            "--project", str(app), "--federation", "sim", "--federation-config",
            "num-supernodes=3 client-resources-num-cpus=1 init-args-num-cpus=2"]


def test_a_stopped_sweep_resumes_records_failures_and_reports(simulation_link, tmp_path):
    app = simulation_link.app
    grid, sweep_dir = tmp_path / "grid.toml", tmp_path / "sweep"
    grid.write_text(GRID)
    first_cell = sweep_dir / "cells" / "defense=layercam-ae__num-clients=3__seed=42"
    with open(tmp_path / "first.log", "w") as log:
        sweep = subprocess.Popen(sweep_command(grid, sweep_dir, app), env=simulation_link.env(),
                                 stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        deadline = time.monotonic() + 300
        while not list(first_cell.glob("attempt-*/*/summary.json")):
            assert sweep.poll() is None and time.monotonic() < deadline, (
                tmp_path / "first.log").read_text()
            time.sleep(0.5)
        sweep.send_signal(signal.SIGTERM)  # mid-grid: the second cell has started
        assert sweep.wait(timeout=120) != 0
    again = subprocess.run(sweep_command(grid, sweep_dir, app), env=simulation_link.env(),
                           capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert again.returncode == 1, again.stdout + again.stderr  # some cells failed
    assert "2 cells, 1 already done" in again.stdout
    assert len(list(first_cell.glob("attempt-*"))) == 1  # not run again
    status = json.loads((sweep_dir / "status.json").read_text())
    assert {c: r["status"] for c, r in status.items()} == {
        "defense=layercam-ae__num-clients=3__seed=42": "done",
        "defense=layercam-ae__num-clients=4__seed=42": "failed"}
    assert all("num-clients=4" in r["error"] for r in status.values() if r["status"] == "failed")

    out = tmp_path / "report"
    made = subprocess.run([str(BIN / "layercam-report"), str(sweep_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    for name in ("report.md", "table.csv", "accuracy.png", "roc.png", "detection-seconds.png",
                 "scores.png", "heatmaps.png"):
        assert (out / name).stat().st_size > 0, name
    table = {row.split(",")[0]: row.split(",") for row in (out / "table.csv").read_text().splitlines()}
    header = table["defense"]
    for run in find_runs([sweep_dir]):
        rows = [json.loads(line) for line in (run.path / "rounds.jsonl").read_text().splitlines()]
        y, scores, removed = [], [], []
        for row in rows[1:]:
            record = row["defense"]
            for node in record["received"]:
                y.append(node in row["attackers"])
                scores.append(record["scores"][str(node)])
                removed.append(node in record["excluded"] or str(node) in record["rejected"])
        y, removed = np.array(y), np.array(removed)
        expected = {"recall": (y & removed).sum() / y.sum(),
                    "fpr": (~y & removed).sum() / (~y).sum(),
                    "auc": roc_auc_score(y, scores), "final_accuracy": rows[-1]["accuracy"]}
        got = table[run.config["defense"]]
        for metric, value in expected.items():
            assert float(got[header.index(metric)]) == pytest.approx(value), metric
