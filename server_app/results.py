"""The results folder of one run: config.json, rounds.jsonl, summary.json, the final model,
the checkpoint a run resumes from; and the per-round log that fills rounds.jsonl.

Crash safety: each round's row is appended to rounds.jsonl and flushed to disk; every whole file
(config, summary, model, checkpoint, heat-map PNG) is written under a temporary name and then
atomically renamed, so a server killed at any point leaves each file either complete or as it
was. The checkpoint is written after the round's row: a resumed run drops rows past it (and
says so). A file that cannot be written (no space left, read-only, permission denied) raises
``ResultsError``, one line naming the folder.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from flwr.common import log

from server_app.metrics import detection_metrics, pooled_detection_metrics, round_decisions
from strategies.records import RoundRecord
from task.config import ConfigError


class ResultsError(OSError):
    """A results file could not be written; the message is one line naming the folder and why."""


WRITE_FAILURES = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
                  errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                  errno.EDQUOT: "disk quota exceeded"}


def write_failure(path: Path, err: OSError) -> ResultsError:
    """The one-line error for a failed write of ``path``: its folder and the reason in words."""
    reason = WRITE_FAILURES.get(err.errno) or err.strerror or str(err)
    return ResultsError(f"cannot write the results folder {path.parent}: {reason} "
                        f"(writing {path.name})")


SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
"""What a run folder's name is built from: a registered-style name (letters, digits, '-')."""


def new_run_dir(base: str | Path, defense: str, attack: str) -> Path:
    """A fresh folder ``<base>/<UTC time>-<defense>-<attack>`` (suffixed if it exists).

    ``defense`` and ``attack`` become part of a path: anything but a plain name (a '/', '..')
    is refused with ``ConfigError``, and the folder must resolve inside ``base``."""
    for key, name in (("defense", defense), ("attack", attack)):
        if not isinstance(name, str) or not SLUG.fullmatch(name):
            raise ConfigError(f"{key}={name!r} is not a plain name (letters, digits and '-'): "
                              "the run folder is named after it")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    root = Path(base).expanduser().resolve()
    suffix = 1
    while True:
        path = root / f"{stamp}-{defense}-{attack}{'' if suffix == 1 else f'-{suffix}'}"
        if path.resolve().parent != root:
            raise ConfigError(f"results-dir: the run folder {path} would lie outside {root}")
        try:  # the creation is the test: of two runs started in one second, each gets its own
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            suffix += 1
        except OSError as err:
            raise write_failure(path, err) from err


CHECKPOINT = "checkpoint.pt"
ROWS = "rounds.jsonl"
SUMMARY = "summary.json"


def row_line(row: dict[str, Any]) -> bytes:
    """One row of rounds.jsonl as written (JSON, newline-terminated)."""
    return (json.dumps(row) + "\n").encode()


def parse_rows(path: Path, data: bytes) -> tuple[list[dict[str, Any]], bytes]:
    """The rows of a rounds.jsonl, and its unterminated last line (``b""`` if none), which is
    what a crash while appending leaves. A complete line that is not a JSON row with an integer
    ``round`` raises ``ConfigError`` naming the file and line number."""
    lines = data.split(b"\n")
    cut = lines.pop()  # after the last newline: empty unless a crash cut the last line short
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"resume-from: {path}:{number}: not a JSON row ({err}); resume "
                              "stops rather than drop it and the rows after it") from err
        if not (isinstance(row, dict) and type(row.get("round")) is int):
            raise ConfigError(f"resume-from: {path}:{number}: a row without an integer "
                              "'round'; resume stops rather than drop it")
        rows.append(row)
    return rows, cut


def split_rows(path: Path, rows: list[dict[str, Any]], last_round: int
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows of rounds 0..``last_round`` (which must all be there, in order) and the rows
    after them, which a crash wrote after the last checkpoint."""
    kept = [r for r in rows if r["round"] <= last_round]
    later = rows[len(kept):]
    if [r["round"] for r in kept] != list(range(last_round + 1)) or any(
            r["round"] <= last_round for r in later):
        raise ConfigError(f"resume-from: {path} holds rounds {[r['round'] for r in rows]}, "
                          f"not rounds 0-{last_round} of the checkpoint in order")
    return kept, later


def load_failure(err: Exception) -> str:
    """What ``torch.load(weights_only=True)``'s error says about a file, in one line: pickled
    objects (refused: loading them could run code), or damage (torch's reason)."""
    text = str(err)
    if found := re.search(r"Unsupported global: GLOBAL (\S+)", text):
        return (f"holds pickled objects ({found.group(1)}): a checkpoint of an earlier version "
                "or not a checkpoint, refused as loading it could run code")
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    detail = found.group(1) if found else (text.strip().splitlines() or [""])[0]
    detail = detail.split(". ")[0].strip()[:200]  # torch's first sentence says what failed
    return (f"is damaged or not a checkpoint ({type(err).__name__}"
            f"{': ' + detail if detail else ''})")


class ResultsWriter:
    """Writes one run's results as it goes, so a crashed run keeps the rounds it finished."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rounds: list[dict[str, Any]] = []

    @classmethod
    def reopen(cls, path: Path, last_round: int) -> ResultsWriter:
        """The writer of an earlier run's folder, its rows cut back to ``last_round``.

        Only what a crash leaves is dropped, each said in a log line: a last line cut short
        (no newline), and rows past the checkpoint's round (the resumed run writes them again).
        Anything else (a corrupt line in the middle, a missing round) raises ``ConfigError``
        naming the file and line: the rows are the run's results, never deleted silently."""
        rows_file = path / ROWS
        try:
            data = rows_file.read_bytes()
        except OSError as err:
            raise ConfigError(f"resume-from: cannot read {rows_file}: "
                              f"{err.strerror or err}") from err
        rows, cut = parse_rows(rows_file, data)
        if cut:
            log(WARNING, "%s: dropping its last line, cut short by a crash (%d bytes, no "
                "newline)", rows_file, len(cut))
        kept, later = split_rows(rows_file, rows, last_round)
        if later:
            log(WARNING, "%s: dropping the rows of round(s) %s, written after the last "
                "checkpoint (round %d): the resumed run computes them again", rows_file,
                [r["round"] for r in later], last_round)
        writer = cls(path)
        writer.rounds = kept
        if cut or later:
            _replace(rows_file, b"".join(row_line(r) for r in kept))
        summary = path / SUMMARY
        if summary.exists():  # a folder with a summary is a finished run (the sweep, the
            # report): this one is running again, and its summary comes when it ends
            log(WARNING, "%s: removed; the resumed run writes its own when it ends", summary)
            try:
                summary.unlink()
            except OSError as err:
                raise write_failure(summary, err) from err
        return writer

    def write_config(self, config: dict[str, Any]) -> None:
        write_json(self.path / "config.json", config)

    def append_round(self, row: dict[str, Any]) -> None:
        """Append the round's row and flush it to disk (``ResultsError`` if it can't be)."""
        target = self.path / ROWS
        try:
            with open(target, "ab") as f:
                f.write(row_line(row))
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            raise write_failure(target, err) from err
        self.rounds.append(row)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.path / SUMMARY, summary)

    def save_model(self, state: dict[str, np.ndarray]) -> Path:
        import torch

        target = self.path / "model.pt"
        _save_atomically(target, lambda f: torch.save(
            {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, f))
        return target

    def save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The state a resumed run starts from: tensors and plain data only
        (``server_app.checkpoint.to_plain``), so that loading it runs no code."""
        import torch

        _save_atomically(self.path / CHECKPOINT, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self) -> Any:
        """The last checkpoint of this folder as saved, loaded with ``weights_only=True``:
        tensors and plain data, never code. ``ConfigError`` naming the file when it is
        missing, damaged, or holds pickled objects (an earlier version's checkpoint)."""
        import torch

        target = self.path / CHECKPOINT
        if not target.exists():
            raise ConfigError(f"resume-from: {target} does not exist: the run finished no round")
        if target.stat().st_size == 0:
            raise ConfigError(f"resume-from: {target} is empty")
        try:
            return torch.load(target, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 -- any failure to read it is a damaged file
            raise ConfigError(f"resume-from: {target} {load_failure(err)}") from err

    def save_heatmap_grid(self, server_round: int, heatmaps: np.ndarray, node_ids: list[int],
                          flagged: set[int], attackers: set[int] = frozenset(),
                          probes: np.ndarray | None = None, defense: str = "LayerCAM") -> Path:
        """``heatmaps-roundNNN.png``: one round's heat maps (K, P, h, w), each laid over its
        probe (``probes``, P x C x H x W), one row per client, excluded (``flagged``) clients
        framed in red, the ground truth's ``attackers`` labelled (``server_app.heatmap_grid``).
        Without ``probes`` the maps are drawn over black."""
        from server_app.heatmap_grid import heatmap_figure

        heatmaps = np.asarray(heatmaps)
        if heatmaps.ndim == 3:
            heatmaps = heatmaps[:, None]
        if probes is None:
            probes = np.zeros((heatmaps.shape[1], 1, *heatmaps.shape[-2:]), dtype=np.float32)
        fig = heatmap_figure(server_round, heatmaps, probes, node_ids, flagged, attackers,
                             defense)
        target = self.path / f"heatmaps-round{server_round:03d}.png"
        _save_atomically(target, lambda f: fig.savefig(f, format="png", dpi=fig.dpi))
        return target


class RoundLog:
    """One row of ``rounds.jsonl`` per round, written when the global model is evaluated: the
    evaluation, the defense's ``RoundRecord`` of the round (handed over by the strategy's
    ``on_record``), the detection metrics against the harness's ground truth and, when the
    clients ran on Ray, ``ray_nodes``: {Ray node id: the nodes whose uploads it made}; a
    progress line on stdout. The heat maps a record carries are drawn over its probes in a
    PNG, then dropped with them. The clock of the rounds' ``seconds`` and ``elapsed`` starts
    when the log is made."""

    def __init__(self, writer: ResultsWriter, num_rounds: int, elapsed: float = 0.0,
                 decisions: list | None = None) -> None:
        self.writer, self.num_rounds = writer, num_rounds
        self._records: dict[int, tuple[RoundRecord, dict[int, bool], dict[str, list[int]]]] = {}
        self.decisions: list[tuple[dict[int, bool], set[int], dict[int, float] | None]] = (
            decisions or [])
        self._last = time.monotonic()
        self.started = self._last - elapsed  # a resumed run counts the time already spent

    def checkpoint_state(self) -> dict[str, Any]:
        """What a resumed log continues from (``RoundLog(..., **state)``)."""
        return {"elapsed": time.monotonic() - self.started, "decisions": self.decisions}

    def add_record(self, record: RoundRecord, truth: Mapping[int, bool],
                   ray_nodes: Mapping[int, str] | None = None) -> None:
        """The defense's record of a round, who really attacked in it and, on Ray, which Ray
        node made each upload."""
        by_ray_node: dict[str, list[int]] = {}
        for node in sorted(n for n in record.received if n in (ray_nodes or {})):
            by_ray_node.setdefault(ray_nodes[node], []).append(node)
        self._records[record.round] = (
            record, {n: truth[n] for n in record.received if n in truth}, by_ray_node)

    def add_evaluation(self, server_round: int, accuracy: float, loss: float) -> dict[str, Any]:
        """Write the round's row (round 0: the initial model) and print its progress line."""
        now = time.monotonic()
        # a model that outputs NaN/Inf (a defense that kept an overflowing upload) has no
        # loss: written as null, never as the NaN that strict JSON readers refuse
        row: dict[str, Any] = {"round": server_round, "accuracy": accuracy,
                               "loss": loss if math.isfinite(loss) else None,
                               "seconds": now - self._last, "elapsed": now - self.started}
        record, truth, ray_nodes = self._records.pop(server_round, (None, {}, {}))
        if record is not None:
            row["defense"] = record.to_json()
            if ray_nodes:
                row["ray_nodes"] = dict(sorted(ray_nodes.items()))
            attackers = {node for node, attacked in truth.items() if attacked}
            decided, removed, scores = round_decisions(
                truth, record.excluded, record.rejected, record.scores,
                "skipped" in record.details)
            if decided:
                row["detection"] = detection_metrics(decided, removed, scores)
                # the ground truth behind the metrics (a client that failed has none)
                row["attackers"] = sorted(attackers)
                row["benign"] = sorted(n for n, attacked in truth.items() if not attacked)
                self.decisions.append((decided, removed, scores))
            if record.heatmaps is not None:  # the maps are those of the first uploads received
                self.writer.save_heatmap_grid(
                    server_round, record.heatmaps, record.received[:len(record.heatmaps)],
                    set(record.excluded), attackers, record.probes, record.defense)
                record.heatmaps = record.probes = None
        self.writer.append_round(row)
        self._last = now
        counts = ""
        if record is not None:
            counts = f", excluded {len(record.excluded)}"
            if record.rejected:  # malformed replies, or clients that failed (reasons: rounds.jsonl)
                counts += f", rejected {len(record.rejected)}"
            if record.missing:  # dropouts: nodes that sent no reply
                counts += f", missing {len(record.missing)}"
        print(f"[round {server_round}/{self.num_rounds}] elapsed {now - self.started:6.1f} s, "
              f"accuracy {accuracy:.4f}, loss {loss:.4f}{counts}", flush=True)
        if len(ray_nodes) > 1:  # a Ray cluster: where the clients ran, in ``ray status``'s ids
            where = ", ".join(f"{ray_node} ({len(nodes)} clients)"
                              for ray_node, nodes in sorted(ray_nodes.items()))
            log(INFO, "Round %d ran on %d Ray nodes: %s", server_round, len(ray_nodes), where)
        return row

    def pooled_detection(self) -> dict[str, Any] | None:
        """Detection metrics pooled over the rounds (``None`` without ground truth)."""
        return pooled_detection_metrics(self.decisions) if self.decisions else None


def _save_atomically(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """``write(file)`` to a temporary name beside ``path``, synced, then renamed over it.

    The content is made in memory first, so that a failing disk raises the ``OSError`` of a
    plain write (``torch.save`` turns it into an opaque message), and then ``ResultsError``
    naming the folder; the temporary file is removed."""
    buffer = io.BytesIO()
    write(buffer)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as err:
        _remove_quietly(temporary)
        raise write_failure(path, err) from err


def _remove_quietly(path: Path) -> None:
    """Remove ``path`` if it is there and can be: cleaning up after a failed write must not
    hide the failure's own error."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _replace(path: Path, data: bytes) -> None:
    _save_atomically(path, lambda f: f.write(data))


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented JSON, written atomically (a crash leaves the old file or the new)."""
    _replace(path, (json.dumps(value, indent=2) + "\n").encode())
