"""The sweep's pieces without Flower: the grid file, cell names, the run-config string, and
the cell timeout (a fake ``flwr`` that hangs without a word)."""

import time
from pathlib import Path

import pytest

from experiments.sweep import Sweep, SweepGrid, run_config_arg
from task.config import ConfigError


def grid_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(text)
    return path


def test_cells_are_every_combination_times_the_seeds_and_name_no_commas(tmp_path):
    grid = SweepGrid.load(grid_file(
        tmp_path, '[sweep]\nseeds = [1, 2]\n[base]\nnum-server-rounds = 3\n'
                  '[grid]\ndefense = ["fedavg", "median"]\nnum-attackers = [1, 2]\n'))
    cells = grid.cells()
    assert len(cells) == 8 and len({c.name for c in cells}) == 8
    assert cells[0].name == "defense=fedavg__num-attackers=1__seed=1"
    assert all("," not in c.name for c in cells)  # Flower's app-bundle manifest is CSV
    assert grid.run_config(cells[0]) == {"num-server-rounds": 3, "defense": "fedavg",
                                         "num-attackers": 1, "seed": 1}
    assert run_config_arg({"defense": "fedavg", "gae-adversarial": False, "seed": 1}) == (
        "defense='fedavg' gae-adversarial=false seed=1")


@pytest.mark.parametrize("text, match", [
    ('[grid]\nno-such-key = [1]\n', "no-such-key"),
    ('[grid]\nnum-attackers = [1, 40]\n', "num-attackers=40.*num-attackers"),
    ('[base]\nseed = 1\n', r"\[grid\]"),
    ('[grids]\ndefense = ["fedavg"]\n', "unknown table"),
])
def test_a_bad_grid_is_refused_naming_the_cell_and_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        SweepGrid.load(grid_file(tmp_path, text))


def test_a_cell_that_hangs_silently_is_stopped_at_its_timeout_and_recorded(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "flwr"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nsleep 60\n")  # no output, ever
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{__import__('os').environ['PATH']}")
    path = grid_file(tmp_path, '[grid]\ndefense = ["fedavg"]\n')
    grid = SweepGrid.load(path)
    sweep = Sweep(grid, path, tmp_path / "sweep", tmp_path, None, None, timeout=1.0)
    started = time.monotonic()
    record = sweep.run_cell(grid.cells()[0])
    assert record["status"] == "failed" and time.monotonic() - started < 20
    assert record["error"] == "stopped after --cell-timeout 1 s"  # the cause, as it printed nothing
    assert record["exit_code"] == -15  # the SIGTERM the timeout sent


def test_a_cell_whose_flwr_run_fails_records_its_exit_code(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "flwr"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 3\n")  # fails without a word
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{__import__('os').environ['PATH']}")
    path = grid_file(tmp_path, '[grid]\ndefense = ["fedavg"]\n')
    grid = SweepGrid.load(path)
    record = Sweep(grid, path, tmp_path / "sweep", tmp_path, None, None, timeout=60).run_cell(
        grid.cells()[0])
    assert record["status"] == "failed" and record["exit_code"] == 3
    assert record["error"] == "flwr run exited with code 3 and printed nothing"


def test_a_cells_finished_run_is_its_earliest_attempts_by_number(tmp_path):
    from experiments.sweep import finished_run, next_attempt

    for attempt in (9, 10, "\u00b2"):  # a superscript two: a digit to isdigit, not to int
        run = tmp_path / f"attempt-{attempt}" / "run"
        run.mkdir(parents=True)
        (run / "summary.json").write_text("{}")
    assert finished_run(tmp_path) == tmp_path / "attempt-9" / "run"  # not attempt-10 by name
    assert next_attempt(tmp_path) == 11
    assert finished_run(tmp_path / "attempt-1") is None
