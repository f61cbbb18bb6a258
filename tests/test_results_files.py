"""Files the product reads back are data (SPEC §8): a checkpoint loads without running code, a
damaged checkpoint or rounds.jsonl gives one line naming it, resume deletes no row silently, a
results folder that can't be written says so in one line, and run folders stay inside
``results-dir``. The resume cases run through the ServerApp's harness (``run_experiment``) on a
copy of one finished 1-round run."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from server_app.results import ResultsError, ResultsWriter, new_run_dir
from task.config import ConfigError
from tests.test_dropouts_and_resume import run


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The folder of a finished 1-round LayerCAM-AE run (config, rows 0-1, checkpoint)."""
    return run(tmp_path_factory.mktemp("finished"), **{"num-server-rounds": 1})


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    """A copy of the finished run's folder that a test may damage."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


def resume(folder: Path, rounds: int = 1) -> None:
    """Resume ``folder`` through the harness (new results go to a sibling folder)."""
    run(folder.parent / "elsewhere", **{"num-server-rounds": rounds, "resume-from": str(folder)})


def refused(folder: Path, rounds: int = 1) -> str:
    """The one-line ``ConfigError`` resuming ``folder`` gives."""
    with pytest.raises(ConfigError) as caught:
        resume(folder, rounds)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


# -- checkpoints are data -------------------------------------------------------------------------

class Payload:
    """Pickles as a call that creates ``marker``: what a hostile checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.e2e
def test_a_checkpoint_carrying_code_is_refused_without_running_it(copy, tmp_path):
    marker = tmp_path / "code-ran"
    checkpoint = copy / "checkpoint.pt"
    torch.save({"round": 1, "log": Payload(marker)}, checkpoint)
    message = refused(copy)
    assert not marker.exists()
    assert str(checkpoint) in message and "pickled objects" in message


def old_pickled_version(path: Path) -> None:
    """A checkpoint as the earlier version wrote it: numpy objects pickled."""
    torch.save({"round": 1, "arrays": {"w": np.zeros(3, np.float32)},
                "strategy": {"participants": {1}}, "log": {"elapsed": 1.0, "decisions": []},
                "rng": {"numpy": np.random.get_state()}}, path)


def edited(change):
    """A damage that loads the checkpoint, applies ``change`` to it and saves it again."""
    def damage(path: Path) -> None:
        saved = torch.load(path, weights_only=True)
        change(saved)
        torch.save(saved, path)
    return damage


def reshaped(saved: dict) -> None:
    key = next(iter(saved["arrays"]))
    saved["arrays"][key] = torch.zeros(3, 3)


def another_model(saved: dict) -> None:
    saved["arrays"] = {f"other.{k}": v for k, v in saved["arrays"].items()}


def another_helper(saved: dict) -> None:
    saved["strategy"]["evidence"]["class"] = "os.system"


def helper_missing_an_attribute(saved: dict) -> None:
    del saved["strategy"]["evidence"]["attrs"]["sums"]


def object_array(saved: dict) -> None:
    saved["rng"]["numpy"][1]["dtype"] = "|O"


def broken_rng(saved: dict) -> None:
    saved["rng"]["python"] = (3, (1, 2), None)


DAMAGES = {
    "empty": (lambda p: p.write_bytes(b""), "checkpoint.pt is empty"),
    "garbage": (lambda p: p.write_bytes(b"\x80\x04garbage" * 50), "damaged or not a checkpoint"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
                  "damaged or not a checkpoint (RuntimeError: PytorchStreamReader failed"),
    "incomplete": (edited(lambda s: s.pop("rng")), "incomplete: no ['rng']"),
    "old pickled version": (old_pickled_version, "pickled objects"),
    "no format": (edited(lambda s: s.pop("format")), "not a checkpoint of this product"),
    "other version": (edited(lambda s: s.update(version=7)), "checkpoint version 7"),
    "reshaped array": (edited(reshaped), "the model's"),
    "another model": (edited(another_model), "do not fit the model"),
    "another helper class": (edited(another_helper), "holds a os.system"),
    "helper missing an attribute": (edited(helper_missing_an_attribute), "attributes"),
    "object dtype": (edited(object_array), "only numbers"),
    "broken rng": (edited(broken_rng), "rng"),
    "round not a number": (edited(lambda s: s.update(round="1")), "not a round number"),
    "state the defense does not keep": (
        edited(lambda s: s["strategy"].update(min_replies=0)),
        "strategy: state ['evidence', 'held', 'history', 'min_replies'"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_checkpoint_gives_one_line_naming_it(copy, damage):
    change, expected = DAMAGES[damage]
    checkpoint = copy / "checkpoint.pt"
    change(checkpoint)
    rows = (copy / "rounds.jsonl").read_bytes()
    message = refused(copy)
    assert str(checkpoint) in message and expected in message, message
    assert (copy / "rounds.jsonl").read_bytes() == rows  # nothing touched


@pytest.mark.e2e
def test_a_resume_with_more_rounds_records_its_config_and_keeps_every_row(copy):
    before = [json.loads(line) for line in (copy / "rounds.jsonl").read_text().splitlines()]
    resume(copy, rounds=2)
    config = json.loads((copy / "config.json").read_text())
    assert config["num-server-rounds"] == 2 and config["resume-from"] == str(copy)
    after = [json.loads(line) for line in (copy / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in after] == [0, 1, 2] and after[:2] == before
    assert json.loads((copy / "summary.json").read_text())["rounds"] == 2


# -- rounds.jsonl: resume deletes no row silently -----------------------------------------------

def rows(rounds: list[int]) -> bytes:
    """rounds.jsonl's lines for ``rounds``, as the writer writes them."""
    return b"".join(json.dumps({"round": r, "accuracy": r / 10}).encode() + b"\n" for r in rounds)


def rows_file(folder: Path, rounds: list[int], tail: bytes = b"") -> Path:
    """A rounds.jsonl with one row per round in ``rounds``, then ``tail``."""
    target = folder / "rounds.jsonl"
    target.write_bytes(rows(rounds) + tail)
    return target


def test_a_corrupt_line_in_the_middle_stops_resume_naming_file_and_line(tmp_path):
    target = rows_file(tmp_path, [0, 1, 2])
    lines = target.read_bytes().split(b"\n")
    lines[1] = b'{"round": 1, "accur'
    target.write_bytes(b"\n".join(lines))
    before = target.read_bytes()
    with pytest.raises(ConfigError, match=rf"{target}:2: not a JSON row") as caught:
        ResultsWriter.reopen(tmp_path, 2)
    assert "\n" not in str(caught.value)
    assert target.read_bytes() == before  # not a row lost


def test_a_row_without_a_round_stops_resume(tmp_path):
    target = rows_file(tmp_path, [0], tail=b'["not", "a", "row"]\n')
    with pytest.raises(ConfigError, match=rf"{target}:2: a row without an integer 'round'"):
        ResultsWriter.reopen(tmp_path, 1)


def test_resume_removes_the_summary_of_the_run_it_extends(tmp_path):
    rows_file(tmp_path, [0, 1, 2])
    (tmp_path / "summary.json").write_text('{"rounds": 2}')
    ResultsWriter.reopen(tmp_path, 2)  # the sweep and the report take a summary as finished
    assert not (tmp_path / "summary.json").exists()
    assert (tmp_path / "rounds.jsonl").read_bytes() == rows([0, 1, 2])


def test_missing_rows_stop_resume(tmp_path):
    target = rows_file(tmp_path, [0, 2])
    with pytest.raises(ConfigError, match=rf"{target} holds rounds \[0, 2\], not rounds 0-2"):
        ResultsWriter.reopen(tmp_path, 2)
    with pytest.raises(ConfigError, match="resume-from: cannot read"):
        ResultsWriter.reopen(tmp_path / "nowhere", 2)


def test_only_a_last_line_cut_short_and_rows_past_the_checkpoint_are_dropped_and_said(
        tmp_path, caplog):
    target = rows_file(tmp_path, [0, 1, 2, 3], tail=b'{"round": 4, "acc')
    with caplog.at_level(logging.WARNING, logger="flwr"):
        writer = ResultsWriter.reopen(tmp_path, 2)
    assert [r["round"] for r in writer.rounds] == [0, 1, 2]
    assert target.read_bytes() == rows([0, 1, 2])
    said = caplog.text
    assert "cut short by a crash" in said and "round(s) [3]" in said and str(target) in said


def test_a_complete_file_is_left_as_it_is(tmp_path):
    target = rows_file(tmp_path, [0, 1])
    inode = target.stat().st_ino
    assert [r["round"] for r in ResultsWriter.reopen(tmp_path, 1).rounds] == [0, 1]
    assert target.stat().st_ino == inode  # not replaced


# -- a results folder that can't be written ---------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs (``mount`` needs root, or a namespace allowing it; else skipped)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def read_only(mount: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)


def test_a_full_disk_names_the_folder(small_tmpfs):
    folder = small_tmpfs / "run"
    folder.mkdir()
    writer = ResultsWriter(folder)
    with pytest.raises(ResultsError) as caught:
        writer.save_checkpoint({"arrays": {"w": torch.zeros(100_000)}})
    assert str(caught.value) == (f"cannot write the results folder {folder}: no space left on "
                                 "the device (writing checkpoint.pt)")
    assert list(folder.iterdir()) == []  # no temporary file left behind
    writer.append_round({"round": 0})  # a small write still fits


def test_a_read_only_folder_names_the_folder(small_tmpfs):
    folder = small_tmpfs / "run"
    folder.mkdir()
    read_only(small_tmpfs)
    with pytest.raises(ResultsError, match=f"folder {folder}: read-only file system"):
        ResultsWriter(folder).append_round({"round": 0})
    with pytest.raises(ResultsError, match=f"folder {folder}: read-only file system"):
        ResultsWriter(folder).write_config({"seed": 1})
    with pytest.raises(ResultsError, match=f"folder {small_tmpfs}: read-only file system"):
        new_run_dir(small_tmpfs, "fedavg", "none")


@pytest.mark.parametrize("code, reason", [(errno.EACCES, "permission denied"),
                                          (errno.ENOSPC, "no space left on the device"),
                                          (errno.EROFS, "read-only file system")])
def test_each_write_failure_is_said_in_words(tmp_path, monkeypatch, code, reason):
    def failing(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(ResultsError) as caught:
        ResultsWriter(tmp_path).write_summary({"rounds": 1})
    assert str(caught.value) == (f"cannot write the results folder {tmp_path}: {reason} "
                                 "(writing summary.json)")
    assert list(tmp_path.iterdir()) == []


# -- run folders stay inside results-dir ------------------------------------------------------

@pytest.mark.parametrize("attack", ["x/../../../outside", "..", "", "a b", ".hidden", "-x",
                                    "sign_flip", "a\x00b"])
def test_a_run_folder_is_named_from_plain_names_only(tmp_path, attack):
    base = tmp_path / "results" / "deep"
    with pytest.raises(ConfigError, match=r"attack=.* is not a plain name"):
        new_run_dir(base, "fedavg", attack)
    with pytest.raises(ConfigError, match=r"defense=.* is not a plain name"):
        new_run_dir(base, attack, "none")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_run_folder_of_registered_names_lies_inside_the_base(tmp_path):
    first = new_run_dir(tmp_path, "layercam-ae", "sign-flip")
    second = new_run_dir(tmp_path, "layercam-ae", "sign-flip")
    assert first.parent == second.parent == tmp_path.resolve() and first != second
    assert first.name.endswith("-layercam-ae-sign-flip")


def test_two_runs_started_in_one_second_get_a_folder_each(tmp_path, monkeypatch):
    """Another run may create the folder between a check for it and its creation: the creation
    itself decides, and the later run takes the next suffix instead of failing."""
    import server_app.results as results
    monkeypatch.setattr(results.time, "strftime", lambda *_: "20261207-120000")
    monkeypatch.setattr(results.Path, "exists", lambda self: False)  # every check loses the race
    (tmp_path / "20261207-120000-layercam-ae-gae").mkdir()
    (tmp_path / "20261207-120000-layercam-ae-gae-2").mkdir()
    assert new_run_dir(tmp_path, "layercam-ae", "gae").name == "20261207-120000-layercam-ae-gae-3"


@pytest.mark.parametrize("loss", [float("nan"), float("inf")])
def test_a_loss_that_is_not_finite_is_written_as_null(tmp_path, loss):
    """A global model whose outputs overflow has no loss: the row says null, strict JSON."""
    from server_app.results import ResultsWriter, RoundLog

    log = RoundLog(ResultsWriter(tmp_path), num_rounds=1)
    log.add_evaluation(1, 0.1, loss)
    line = (tmp_path / "rounds.jsonl").read_text().strip()

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    row = json.loads(line, parse_constant=refuse)
    assert row["loss"] is None and row["accuracy"] == 0.1


def test_plain_data_keeps_the_shape_of_0_d_arrays():
    from server_app.checkpoint import from_plain, to_plain

    for value in (np.array(5.0), np.array(3, dtype=np.int64), np.zeros((2, 0)), np.ones((2, 3))):
        back = from_plain(to_plain(value))
        assert back.shape == value.shape and back.dtype == value.dtype
        np.testing.assert_array_equal(back, value)


def test_a_row_groups_the_uploads_by_the_ray_node_that_made_them(tmp_path, caplog):
    """Replies that named their Ray node (``EavesdroppingGrid.ray_nodes``) are grouped by it;
    a node that named none is left out; a run on more than one Ray node says so in the log."""
    from server_app.results import RoundLog
    from strategies.records import RoundRecord

    record = RoundRecord(round=1, defense="fedavg", received=[11, 12, 13, 14], rejected={14: "x"},
                         kept=[11, 12, 13], excluded=[], scores=None, details={}, timings={},
                         aggregated=True)
    head, worker = "a" * 56, "b" * 56
    log = RoundLog(ResultsWriter(tmp_path), num_rounds=1)
    log.add_record(record, {}, {13: worker, 11: head, 14: worker, 99: head})
    with caplog.at_level(logging.INFO, logger="flwr"):
        row = log.add_evaluation(1, 0.9, 0.3)
    assert row["ray_nodes"] == {head: [11], worker: [13, 14]}
    assert json.loads((tmp_path / "rounds.jsonl").read_text())["ray_nodes"] == row["ray_nodes"]
    assert f"Round 1 ran on 2 Ray nodes: {head} (1 clients), {worker} (2 clients)" in caplog.text
    log.add_record(dataclasses.replace(record, round=2), {}, {})
    assert "ray_nodes" not in log.add_evaluation(2, 0.9, 0.3)
