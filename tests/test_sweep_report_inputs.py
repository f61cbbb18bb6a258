"""``layercam-sweep`` and ``layercam-report`` on bad inputs, without Flower: each ends in one
line on stderr naming the file and the field (exit 2), or leaves a run out with a warning line
naming it; cell folders never collide; a report counts every run once."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from experiments import report as report_cli
from experiments import sweep as sweep_cli
from experiments.sweep import Sweep, SweepGrid, cell_name, next_attempt, run_config_arg
from task.config import ConfigError

EXAMPLE_GRID = Path(__file__).resolve().parents[1] / "presets" / "cpu-small.toml"
EXAMPLE_CELLS = Path(__file__).resolve().parents[1] / "docs" / "example-report" / "runs" / "cells"


def one_line(err: str) -> str:
    """stderr holds exactly one line, no traceback: that line."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# layercam-sweep ------------------------------------------------------------------------------

def run_sweep(tmp_path: Path, text: str, capsys, *extra: str) -> tuple[int, str, Path]:
    grid = tmp_path / "grid.toml"
    grid.write_text(text)
    code = sweep_cli.main([str(grid), "--sweep-dir", str(tmp_path / "sweep"), *extra])
    return code, capsys.readouterr().err, grid


ONE = '[grid]\ndefense = ["fedavg"]\n'


@pytest.fixture
def fake_flwr(tmp_path, monkeypatch) -> Path:
    """A ``flwr`` that writes no run (every cell fails at once)."""
    fake = tmp_path / "bin" / "flwr"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'no run'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    return fake


@pytest.mark.parametrize("text, field, what", [
    ("grid = 5\n", "grid", "must be a table"),
    ('[sweep]\nseeds = 5\n' + ONE, "sweep.seeds", "must be a list of integer seeds"),
    ('[sweep]\nseeds = [1, "2"]\n' + ONE, "sweep.seeds", "must be a list of integer seeds"),
    ('[sweep]\nseeds = [1, 1]\n' + ONE, "sweep.seeds", "1 is listed twice"),
    ('[sweep]\nseed = [1]\n' + ONE, "sweep.seed", "unknown key"),
    ("sweep = 3\n" + ONE, "sweep", "must be a table"),
    ("base = 3\n" + ONE, "base", "must be a table"),
    ("[grids]\ndefense = 1\n", "grids", "unknown table"),
    ('[grid]\ndefense = ["fedavg", "fedavg"]\n', "grid.defense", "'fedavg' is listed twice"),
    ('[grid]\nnum-clients = [5, 5.0]\n', "grid.num-clients", "5 and 5.0 are the same value"),
    ('[grid]\nseed = [1, 2]\n', "grid.seed", "set the seeds in [sweep] seeds"),
    ('[base]\nresults-dir = "x"\n' + ONE, "base.results-dir", "a folder of its own"),
    ('[base]\ndefense = "median"\n' + ONE, "base.defense", "also a key of [grid]"),
    ('[grid]\ndefense = "nope"\n', "cell defense=nope__seed=42", "defense='nope' is not one of"),
    ('[grid]\nattack = ["nope"]\n', "cell attack=nope__seed=42", "attack='nope' is not one of"),
    ('[grid]\ndataset = ["nope"]\n', "cell dataset=nope__seed=42", "dataset='nope' is not one of"),
    ('[grid]\nmodel = ["nope"]\n', "cell model=nope__seed=42", "model='nope' is not one of"),
    ('[grid]\nnum-clients = ["many"]\n', "cell num-clients=many__seed=42",
     "num-clients must be an int, got 'many'"),
    ('[grid]\nlayercam-ae-target-layer = ["a\'b\\"c"]\n', "cell layercam-ae-target-layer=a_b_c__seed=42~",
     "cannot pass a string holding both ' and \""),
    ("[grid\n", "not valid TOML", ""),
])
def test_a_bad_grid_stops_in_one_line_naming_the_file_and_field_before_anything_runs(
        tmp_path, capsys, fake_flwr, text, field, what):
    code, err, grid = run_sweep(tmp_path, text, capsys)
    line = one_line(err)
    assert code == 2
    assert line.startswith(f"layercam-sweep: {grid}: {field}"), line
    assert what in line
    assert not (tmp_path / "sweep").exists()  # nothing ran, nothing was made


def test_a_bad_federation_config_template_stops_in_one_line(tmp_path, capsys):
    code, err, _ = run_sweep(tmp_path, ONE, capsys, "--federation-config", "num-supernodes={n}")
    assert code == 2
    assert one_line(err).startswith("layercam-sweep: --federation-config: 'num-supernodes={n}'")


def test_a_sweep_resumes_over_a_corrupt_cells_jsonl_warning_of_each_bad_line(
        tmp_path, capsys, fake_flwr):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    records = sweep_dir / "cells.jsonl"
    records.write_text('{"cell": "defense=fedavg__seed=42", "status": "failed", "error": "x"}\n'
                       '[1, 2]\n{"cell": "defense=fedavg__se')  # a write cut short
    code, err, _ = run_sweep(tmp_path, ONE, capsys, "--federation-config", "")
    assert code == 1  # the cell failed (no run), the sweep went through
    warnings = err.strip().splitlines()
    assert warnings == [
        f"layercam-sweep: warning: {records}: line 2: cell: missing; left out",
        f"layercam-sweep: warning: {records}: line 3: not JSON (Unterminated string starting "
        f"at); left out"], err
    lines = records.read_text().splitlines()
    assert json.loads(lines[-1])["cell"] == "defense=fedavg__seed=42"  # not glued to the cut line
    status = json.loads((sweep_dir / "status.json").read_text())
    assert status["defense=fedavg__seed=42"]["status"] == "failed"


def test_a_resumed_sweep_refuses_another_base_and_takes_new_seeds(tmp_path, capsys, fake_flwr):
    base = '[base]\nnum-server-rounds = 3\n' + ONE
    code, _, _ = run_sweep(tmp_path, base, capsys, "--federation-config", "")
    assert code == 1  # the fake flwr: the cell failed, the sweep went through
    code, err, _ = run_sweep(tmp_path, base.replace("= 3", "= 30"), capsys,
                             "--federation-config", "")
    assert code == 2 and "holds the runs of a grid whose [base] differs" in one_line(err)
    assert "num-server-rounds = 3" in (tmp_path / "sweep" / "grid.toml").read_text()
    more = '[sweep]\nseeds = [42, 1]\n' + base
    code, _, _ = run_sweep(tmp_path, more, capsys, "--federation-config", "")
    assert code == 1 and (tmp_path / "sweep" / "grid.toml").read_text() == more
    assert (tmp_path / "sweep" / "cells" / "defense=fedavg__seed=1").is_dir()
    # resumed from the folder's own copy of the grid
    code = sweep_cli.main([str(tmp_path / "sweep" / "grid.toml"), "--sweep-dir",
                           str(tmp_path / "sweep"), "--federation-config", ""])
    assert code == 1, capsys.readouterr().err
    # a cell whose first attempt folder was removed by hand gets attempt-4, not a clash
    cell = tmp_path / "sweep" / "cells" / "defense=fedavg__seed=42"
    shutil.rmtree(cell / "attempt-1")
    code, _, _ = run_sweep(tmp_path, more, capsys, "--federation-config", "")
    assert code == 1 and sorted(p.name for p in cell.iterdir()) == [
        "attempt-2", "attempt-3", "attempt-4"]


def test_an_attempt_folder_removed_by_hand_leaves_a_gap_not_a_clash(tmp_path):
    cell = tmp_path / "cell"
    assert next_attempt(cell) == 1
    (cell / "attempt-2").mkdir(parents=True)
    assert next_attempt(cell) == 3  # attempt-1 was removed: not attempt-2 again
    (cell / "attempt-x").mkdir()
    assert next_attempt(cell) == 3


def test_a_cell_is_stopped_even_when_flwr_stop_fails(tmp_path, monkeypatch, capsys):
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(ONE)
    sweep = Sweep(SweepGrid.load(grid_file), grid_file, tmp_path / "sweep", tmp_path, None, None,
                  60.0)
    sweep.process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    sweep.run_id = "123"

    def hangs(*args, **kwargs):
        raise subprocess.TimeoutExpired(args[0], 60)

    monkeypatch.setattr(subprocess, "run", hangs)
    try:
        sweep.stop_run()
        assert sweep.process.wait(timeout=10) == -signal.SIGTERM
        assert "flwr stop 123" in capsys.readouterr().err
    finally:
        if sweep.process.poll() is None:
            os.killpg(sweep.process.pid, signal.SIGKILL)
            sweep.process.wait()


def test_cell_folders_are_injective_and_readable(tmp_path):
    values = ["a/b", "a_b", "q'uote", "quote", "A_b", "1", "", "x" * 300, "x" * 301]
    path = tmp_path / "grid.toml"
    path.write_text("[grid]\nlayercam-ae-target-layer = " + json.dumps(values) + "\n")
    grid = SweepGrid.load(path)
    names = [cell.name for cell in grid.cells()]
    assert len(set(names)) == len(values)
    assert names[1] == "layercam-ae-target-layer=a_b__seed=42"  # exact: as it was
    assert names[0].startswith("layercam-ae-target-layer=a_b__seed=42~")  # lossy: a hash
    assert names[3] == "layercam-ae-target-layer=quote__seed=42"
    assert names[2].startswith("layercam-ae-target-layer=q_uote__seed=42~")
    assert all(len(name) < 140 and "," not in name for name in names)
    # values a flat "key=value__key=value" text could not tell apart
    tricky = [(("defense", "a__attack=b"), ("attack", "c")), (("defense", "a"), ("attack", "b__attack=c")),
              (("seed", 1),), (("seed", 1.0),), (("seed", True),), (("seed", "1"),), (("seed", "true"),)]
    assert len({cell_name(v) for v in tricky}) == len(tricky)
    assert cell_name((("gae-adversarial", False),)) == "gae-adversarial=false"


def test_the_example_sweep_keeps_its_cell_folder_names():
    names = {cell.name for cell in SweepGrid.load(EXAMPLE_GRID).cells()}
    assert names == {p.name for p in EXAMPLE_CELLS.iterdir()}


def test_a_string_with_a_quote_reaches_flwr_run_intact(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text("[grid]\nlayercam-ae-target-layer = [\"q'uote\", 'back\\slash']\n")
    grid = SweepGrid.load(path)
    sweep = Sweep(grid, path, tmp_path / "sweep", tmp_path, None, None, timeout=1.0)
    for cell, value in zip(grid.cells(), ["q'uote", "back\\slash"]):
        command = sweep.command(cell, tmp_path / "r")
        arg = command[command.index("--run-config") + 1]
        assert parse_config_args([arg])["layercam-ae-target-layer"] == value
    assert run_config_arg({"layercam-ae-target-layer": "a\nb"}) == (
        'layercam-ae-target-layer="a\\nb"')
    with pytest.raises(ConfigError, match="both ' and"):
        run_config_arg({"layercam-ae-target-layer": "a'b\"c"})


# layercam-report -----------------------------------------------------------------------------

def write_run(folder: Path, seed: int, defense: str = "layercam-ae", rounds: int = 3,
              score: float = 2.0, rounds_key: bool = True) -> Path:
    """A finished run folder as the harness writes it: 4 clients, node 1 attacks and is
    excluded every round."""
    folder.mkdir(parents=True)
    config = {"defense": defense, "attack": "gae", "seed": seed, "results-dir": str(folder)}
    if rounds_key:
        config["num-server-rounds"] = rounds
    (folder / "config.json").write_text(json.dumps(config))
    rows = [{"round": 0, "accuracy": 0.1}]
    for r in range(1, rounds + 1):
        rows.append({"round": r, "accuracy": 0.5 + r / 10 + seed / 1000, "attackers": [1],
                     "defense": {"received": [1, 2, 3, 4], "excluded": [1], "rejected": {},
                                 "scores": {"1": score + seed / 100, "2": 0.1, "3": 0.2, "4": 0.3},
                                 "details": {"threshold": 1.0},
                                 "timings": {"detection": 0.01, "aggregation": 0.001}}})
    (folder / "rounds.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "summary.json").write_text("{}")
    return folder


def run_report(capsys, *args: str) -> tuple[int, str]:
    code = report_cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def seeds(out: Path) -> list[int]:
    with open(out / "table.csv", newline="") as f:
        return [int(row["seeds"]) for row in csv.DictReader(f)]


def edit_rows(run: Path, edit) -> None:
    rows = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    edit(rows)
    (run / "rounds.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def cut_rounds(run: Path) -> None:
    text = (run / "rounds.jsonl").read_text()
    (run / "rounds.jsonl").write_text(text[: len(text) - 40])  # a write cut short


BAD_RUNS = {
    "truncated rounds.jsonl": (cut_rounds, "rounds.jsonl: line 4: not JSON"),
    "corrupt config.json": (lambda run: (run / "config.json").write_text('{"defense": '),
                            "config.json: not JSON"),
    "config.json not an object": (lambda run: (run / "config.json").write_text("[1]"),
                                  "config.json: not a JSON object"),
    "empty rounds.jsonl": (lambda run: (run / "rounds.jsonl").write_text(""),
                           "rounds.jsonl: no rounds"),
    "an empty row": (lambda run: edit_rows(run, lambda rows: rows.__setitem__(1, {})),
                     "rounds.jsonl: line 2: round: missing"),
    "NaN accuracy": (lambda run: edit_rows(run, lambda rows: rows[-1].update(accuracy=float("nan"))),
                     "rounds.jsonl: line 4: accuracy: nan is not a finite number"),
    "NaN score": (lambda run: edit_rows(run, lambda rows: rows[2]["defense"]["scores"].update(
        {"3": float("nan")})), "rounds.jsonl: line 3: defense.scores.3: nan is not a finite number"),
    "a score missing": (lambda run: edit_rows(run, lambda rows: rows[2]["defense"]["scores"].pop("3")),
                        "rounds.jsonl: line 3: defense.scores.3: missing"),
    "benign not node ids": (lambda run: edit_rows(run, lambda rows: rows[2].update(benign=["x"])),
                            "rounds.jsonl: line 3: benign: not a list of node ids"),
    "attackers as strings": (lambda run: edit_rows(run, lambda rows: rows[2].update(
        attackers=["1"])), "rounds.jsonl: line 3: attackers: not a list of node ids"),
    "missing timings": (lambda run: edit_rows(run, lambda rows: rows[1]["defense"].pop("timings")),
                        "rounds.jsonl: line 2: defense.timings: missing"),
    "fewer rounds than configured": (lambda run: edit_rows(run, lambda rows: rows.pop()),
                                     "rounds.jsonl: round: the last is 2, but config.json has "
                                     "num-server-rounds = 3"),
}


@pytest.mark.parametrize("damage, message", BAD_RUNS.values(), ids=BAD_RUNS.keys())
def test_a_run_that_cannot_be_used_is_left_out_with_a_line_naming_the_file_and_field(
        tmp_path, capsys, damage, message):
    runs = tmp_path / "runs"
    write_run(runs / "a", seed=1)
    write_run(runs / "b", seed=2)
    bad = write_run(runs / "c", seed=3)
    damage(bad)
    code, err = run_report(capsys, runs, "--out", tmp_path / "out")
    assert code == 0, err
    file, what = message.split(":", 1)
    line = one_line(err)
    assert line.startswith(f"layercam-report: warning: {bad.resolve() / file}:{what}"), line
    assert line.endswith("; left out")
    assert seeds(tmp_path / "out") == [2]  # the two good seeds, not three
    assert f"Left out (1):\n\n- {bad.resolve() / file}:" in (tmp_path / "out" / "report.md").read_text()


def test_nothing_usable_stops_in_one_line(tmp_path, capsys):
    bad = write_run(tmp_path / "runs" / "a", seed=1)
    (bad / "rounds.jsonl").write_text("")
    code, err = run_report(capsys, tmp_path / "runs", "--out", tmp_path / "out")
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"layercam-report: {(tmp_path / 'runs').resolve()}: no finished run (summary.json) to "
        f"report; 1 left out")
    code, err = run_report(capsys, tmp_path / "nowhere", "--out", tmp_path / "out")
    assert code == 2
    assert one_line(err) == f"layercam-report: {(tmp_path / 'nowhere').resolve()}: no such folder"


def test_seeds_of_one_setting_with_different_rounds_stop_in_one_line(tmp_path, capsys):
    a = write_run(tmp_path / "runs" / "a", seed=1, rounds=3, rounds_key=False)
    b = write_run(tmp_path / "runs" / "b", seed=2, rounds=2, rounds_key=False)
    code, err = run_report(capsys, tmp_path / "runs", "--out", tmp_path / "out")
    assert code == 2
    assert one_line(err) == (
        f"layercam-report: {a.resolve() / 'rounds.jsonl'} and {b.resolve() / 'rounds.jsonl'}: "
        f"round: one setting, but rounds 0-3 and 0-2, or defense records in different rounds")
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_two_different_runs_of_one_seed_stop_in_one_line(tmp_path, capsys):
    a = write_run(tmp_path / "runs" / "a", seed=1)
    b = write_run(tmp_path / "runs" / "b", seed=1, score=3.0)  # a rerun: not a copy
    code, err = run_report(capsys, tmp_path / "runs", "--out", tmp_path / "out")
    assert code == 2
    assert one_line(err) == (
        f"layercam-report: {a.resolve() / 'config.json'} and {b.resolve() / 'config.json'}: "
        f"seed: two different runs of one setting with seed 1; pass the folders of one of them")


def test_out_inside_the_input_with_copy_runs_counts_each_run_once_every_time(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    write_run(sweep / "cells" / "x" / "run", seed=1)
    write_run(sweep / "cells" / "y" / "run", seed=2)
    out = sweep / "report"
    assert run_report(capsys, sweep, "--out", out, "--copy-runs") == (0, "")
    code, err = run_report(capsys, sweep, "--out", out, "--copy-runs")
    assert code == 0 and seeds(out) == [2]
    assert one_line(err) == (f"layercam-report: warning: {(out / 'runs').resolve()}: this "
                             f"report's own copies of 2 run(s), not read as input")
    assert "2 runs, 1 settings" in (out / "report.md").read_text()
    remade = tmp_path / "remade"
    assert run_report(capsys, out / "runs", "--out", remade) == (0, "")
    assert seeds(remade) == [2]


def test_a_copy_of_a_run_passed_again_is_counted_once(tmp_path, capsys):
    write_run(tmp_path / "sweep" / "a", seed=1)
    write_run(tmp_path / "sweep" / "b", seed=2)
    first = tmp_path / "first"
    assert run_report(capsys, tmp_path / "sweep", "--out", first, "--copy-runs")[0] == 0
    code, err = run_report(capsys, tmp_path / "sweep", first / "runs", "--out", tmp_path / "both")
    assert code == 0 and seeds(tmp_path / "both") == [2]
    warnings = err.strip().splitlines()
    assert len(warnings) == 2 and all("(identical config.json and rounds.jsonl); counted once; "
                                      "left out" in w for w in warnings), err


def test_copy_runs_into_a_folder_holding_another_reports_runs_stops(tmp_path, capsys):
    write_run(tmp_path / "one" / "a", seed=1)
    write_run(tmp_path / "two" / "a", seed=2, defense="fedavg")
    out = tmp_path / "out"
    assert run_report(capsys, tmp_path / "one", "--out", out, "--copy-runs")[0] == 0
    code, err = run_report(capsys, tmp_path / "two", "--out", out, "--copy-runs")
    assert code == 2
    assert one_line(err) == (
        f"layercam-report: {(out / 'runs').resolve()}: holds {(out / 'runs' / 'a').resolve()}, "
        f"which is not one of this report's runs (an earlier report's?); remove it or choose "
        f"another --out")


def test_runs_without_attackers_make_a_report_without_a_matplotlib_warning(tmp_path, capsys):
    """No ROC curve can be drawn without attackers: the panel says so instead of an empty
    legend (matplotlib warned "No artists with labels found")."""
    import warnings

    run = write_run(tmp_path / "runs" / "a", seed=1)
    edit_rows(run, lambda rows: [row.update(attackers=[]) for row in rows[1:]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, err = run_report(capsys, tmp_path / "runs", "--out", tmp_path / "out")
    assert code == 0, err
    assert (tmp_path / "out" / "roc.png").stat().st_size > 0
