"""``layercam-report``: tables and plots from results folders (a sweep's, or any runs').

    layercam-report sweeps/cpu-small --out docs/example-report

Every number is recomputed from the runs' ``rounds.jsonl`` (not read from ``summary.json``):
detection metrics pool each run's (client, round) decisions against the ground truth the
harness wrote in each row (``attackers`` and ``benign``), exactly as the harness does
(``server_app.metrics.round_decisions``, ``pooled_detection_metrics``). Runs that differ only
in ``seed`` form one row of the table, as mean ± sample std over seeds (the paper's Tables 2–5 and 7: Recall,
Precision, FPR, Accuracy, F1, plus AUC, the final test accuracy and the detection time per
round: the defense's steps, screening and aggregation aside). Writes ``report.md`` (tables, plots, and the command and grid that made them),
``table.csv`` and the PNGs.

A run folder is one holding ``summary.json``. A run whose files cannot be used (a
``config.json`` or ``rounds.jsonl`` that is not JSON, a row without its round, accuracy or
timings, a NaN, fewer rounds than ``num-server-rounds``) is left out with a warning line naming
the file and the field, and ``report.md`` lists it. A run is counted once: ``<out>/runs`` (the
report's own copies) is not read unless the input is that folder, and a copy of a run already
read (identical ``config.json`` and ``rounds.jsonl``) is left out with a warning. What cannot be
decided for the user stops the report with one line (exit 2): two different runs of one
setting with one seed, runs of one setting with different rounds, ``<out>/runs`` holding runs
of another report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server_app.metrics import (pool_rounds, pooled_detection_metrics, ranking_scores,
                                round_decisions)

IGNORED_KEYS = {"seed", "results-dir", "resume-from", "round-timeout", "node-wait-timeout"}
"""Config keys that don't make runs different settings."""
METRICS = ("recall", "precision", "fpr", "accuracy", "f1", "auc", "final_accuracy",
           "detection_seconds")
HEADERS = {"recall": "Recall", "precision": "Precision", "fpr": "FPR", "accuracy": "Accuracy",
           "f1": "F1", "auc": "AUC", "final_accuracy": "Test acc.",
           "detection_seconds": "Detect ms/round"}
NOT_DETECTION = {"screening", "aggregation"}
"""Timings of a round that every defense pays alike (not part of its detection time)."""


class ReportError(ValueError):
    """An input the report cannot use; the message names the file and the field."""


@dataclass(frozen=True)
class LeftOut:
    """A run folder the report does not count, and why (the file and the field)."""

    path: Path
    reason: str


@dataclass
class Run:
    """One finished run folder, read."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    decisions: list[tuple[dict[int, bool], set[int], dict | None]] = field(default_factory=list)
    metrics: dict[str, float | None] = field(default_factory=dict)
    identity: str = ""
    """A hash of its config.json and rounds.jsonl: the same for a copy of the run."""

    @classmethod
    def read(cls, path: Path) -> Run:
        """Read and check a run folder; ``ReportError`` naming the file and the field."""
        config = read_config(path / "config.json")
        rows = read_rows(path / "rounds.jsonl")
        rounds = config.get("num-server-rounds")
        if isinstance(rounds, int) and not isinstance(rounds, bool) and rows[-1]["round"] != rounds:
            raise ReportError(f"{path / 'rounds.jsonl'}: round: the last is {rows[-1]['round']}, "
                              f"but config.json has num-server-rounds = {rounds}")
        run = cls(path, config, rows, decisions(rows), identity=run_identity(path))
        run.metrics = run_metrics(rows, run.decisions)
        return run


def run_identity(path: Path) -> str:
    """What a run and its copies share: a hash of its config.json and rounds.jsonl."""
    digest = hashlib.sha256()
    for name in ("config.json", "rounds.jsonl"):
        digest.update((path / name).read_bytes())
    return digest.hexdigest()


def read_json(path: Path) -> Any:
    """A JSON file's value; ``ReportError`` naming it when it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise ReportError(f"{path}: cannot read it: {err.strerror or err}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReportError(f"{path}: not JSON ({err})") from err


def read_config(path: Path) -> dict[str, Any]:
    """A run's config.json: an object of single values naming its defense and seed."""
    config = read_json(path)
    if not isinstance(config, dict):
        raise ReportError(f"{path}: not a JSON object of run-config keys")
    for key, value in config.items():
        if value is not None and not isinstance(value, (str, int, float)):
            raise ReportError(f"{path}: {key}: {value!r} is not a single value")
    if not isinstance(config.get("defense"), str):
        raise ReportError(f"{path}: defense: missing or not a name")
    if not isinstance(config.get("seed"), int) or isinstance(config["seed"], bool):
        raise ReportError(f"{path}: seed: missing or not an integer")
    return config


def read_rows(path: Path) -> list[dict[str, Any]]:
    """A run's rounds.jsonl: one row per round, 0, 1, 2, ... (blank lines aside), each as the
    report reads it (``row_problem``); ``ReportError`` naming the file, the line and the field."""
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise ReportError(f"{path}: cannot read it: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise ReportError(f"{path}: not UTF-8 text ({err})") from err
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ReportError(f"{path}: line {number}: not JSON ({err.msg}; a write cut short?)"
                              ) from err
        problem = row_problem(row)
        if problem is None and row["round"] != len(rows):
            problem = f"round: {row['round']}, expected {len(rows)} (rounds are 0, 1, 2, ...)"
        if problem is not None:
            raise ReportError(f"{path}: line {number}: {problem}")
        rows.append(row)
    if not rows:
        raise ReportError(f"{path}: no rounds")
    return rows


def _finite(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _node_ids(values: Any) -> bool:
    """A list of node ids, or an object keyed by them (``rejected``: node id -> reason)."""
    if not isinstance(values, (list, dict)):
        return False
    return all((isinstance(node, int) and not isinstance(node, bool))
               or (isinstance(node, str) and node.isascii() and node.isdigit()) for node in values)


def row_problem(row: Any) -> str | None:
    """``field: what is wrong`` with a row of rounds.jsonl for the report, or ``None``: its round,
    a finite accuracy, and when it has a defense record, the nodes, finite timings and a
    finite score for every node received (or no scores)."""
    if not isinstance(row, dict):
        return "row: not a JSON object"
    for key in ("round", "accuracy"):
        if key not in row:
            return f"{key}: missing"
    if not isinstance(row["round"], int) or isinstance(row["round"], bool):
        return f"round: {row['round']!r} is not a round number"
    if not _finite(row["accuracy"]):
        return f"accuracy: {row['accuracy']!r} is not a finite number"
    for key in ("attackers", "benign"):  # the ground truth, as the harness writes it: ints
        values = row.get(key, [])
        if not (isinstance(values, list) and all(type(v) is int for v in values)):
            return f"{key}: not a list of node ids"
    if "defense" not in row:
        return None
    record = row["defense"]
    if not isinstance(record, dict):
        return "defense: not an object"
    for key in ("received", "excluded", "rejected"):
        if not _node_ids(record.get(key)):
            return f"defense.{key}: {'missing' if key not in record else 'not node ids'}"
    timings = record.get("timings")
    if not isinstance(timings, dict):
        return "defense.timings: missing"
    for step, seconds in timings.items():
        if not _finite(seconds):
            return f"defense.timings.{step}: {seconds!r} is not a finite number"
    if not isinstance(record.get("details", {}), dict):
        return "defense.details: not an object"
    scores = record.get("scores")
    if scores is None:
        return None
    if not isinstance(scores, dict) or not _node_ids(scores):
        return "defense.scores: not an object of node ids"
    rejected = {int(n) for n in record["rejected"]}  # no score: the screening removed them
    for node in record["received"]:
        score = scores.get(str(node))
        if score is None and node not in rejected:
            return f"defense.scores.{node}: missing"
        if score is not None and not _finite(score):
            return f"defense.scores.{node}: {score!r} is not a finite number"
    return None


def decisions(rows: list[dict[str, Any]]) -> list[tuple[dict[int, bool], set[int], dict | None]]:
    """Each round's (truth, removed, scores), as the harness pooled them
    (``server_app.metrics.round_decisions``): over the nodes with ground truth (``attackers``
    and ``benign``; rows written before ``benign`` was: every node received)."""
    out = []
    for row in rows:
        record = row.get("defense")
        if record is None or "attackers" not in row:
            continue
        attackers = set(row["attackers"])
        known = set(row["benign"]) | attackers if "benign" in row else set(record["received"])
        truth = {node: node in attackers for node in record["received"] if node in known}
        scores = ({int(n): s for n, s in record["scores"].items()}
                  if record.get("scores") is not None else None)
        out.append(round_decisions(truth, record["excluded"], {int(n) for n in record["rejected"]},
                                   scores, "skipped" in record.get("details", {})))
    return out


def detection_seconds(row: dict[str, Any]) -> float:
    """The seconds a round's defense spent deciding (its steps, screening and aggregation aside)."""
    return sum(v for k, v in row["defense"]["timings"].items() if k not in NOT_DETECTION)


def run_metrics(rows: list[dict[str, Any]], pooled: list) -> dict[str, float | None]:
    """A run's pooled detection metrics (over ``decisions(rows)``), final test accuracy and
    detection seconds per round."""
    detection = pooled_detection_metrics(pooled) if pooled else {}
    seconds = [detection_seconds(row) for row in rows if "defense" in row]
    return {**{k: detection.get(k) for k in ("recall", "precision", "fpr", "accuracy", "f1", "auc")},
            "final_accuracy": rows[-1]["accuracy"],
            "detection_seconds": statistics.fmean(seconds) if seconds else None}


def run_folders(folders: list[Path]) -> list[Path]:
    """Every run folder (one holding summary.json) below ``folders``, resolved, once each."""
    return sorted({p.parent.resolve() for folder in folders for p in folder.rglob("summary.json")})


def own_copies(paths: list[Path], folders: list[Path], copies: Path) -> list[Path]:
    """Of ``paths``, those below ``copies`` (``<out>/runs``: the copies this report keeps) when
    no input folder is in it: the report would read back its own copies as more seeds."""
    if any(f.resolve().is_relative_to(copies) for f in folders):
        return []  # the report remade from its copies
    return [p for p in paths if p.is_relative_to(copies)]


def read_runs(paths: list[Path]) -> tuple[list[Run], list[LeftOut]]:
    """The runs in ``paths``; those left out: a run that cannot be read (``Run.read``'s error,
    naming the file and field), or a copy of one already read (the same identity)."""
    runs: list[Run] = []
    left_out: list[LeftOut] = []
    first: dict[str, Path] = {}
    for path in paths:
        try:
            run = Run.read(path)
        except ReportError as err:
            left_out.append(LeftOut(path, str(err)))
            continue
        if run.identity in first:
            reason = (f"{path}: the same run as {first[run.identity]} (identical config.json "
                      f"and rounds.jsonl); counted once")
            left_out.append(LeftOut(path, reason))
            continue
        first[run.identity] = path
        runs.append(run)
    return runs, left_out


def warn(message: str) -> None:
    """One warning line on stderr."""
    print(f"layercam-report: warning: {message}", file=sys.stderr, flush=True)


def find_runs(folders: list[Path]) -> list[Run]:
    """Every finished run below ``folders``, each once; one left out is warned of."""
    runs, left_out = read_runs(run_folders(folders))
    for item in left_out:
        warn(f"{item.reason}; left out")
    return runs


def check_groups(groups: dict[tuple, list[Run]]) -> None:
    """The runs of one setting are distinct seeds with the same rounds (a mean over them is
    over like things); ``ReportError`` naming both runs' files otherwise."""
    for runs in groups.values():
        by_seed: dict[Any, Run] = {}
        for run in runs:
            seed = run.config["seed"]
            if seed in by_seed:
                raise ReportError(
                    f"{by_seed[seed].path / 'config.json'} and {run.path / 'config.json'}: "
                    f"seed: two different runs of one setting with seed {seed}; pass the "
                    f"folders of one of them")
            by_seed[seed] = run
        shape = [(row["round"], "defense" in row) for row in runs[0].rows]
        for run in runs[1:]:
            if [(row["round"], "defense" in row) for row in run.rows] != shape:
                raise ReportError(
                    f"{runs[0].path / 'rounds.jsonl'} and {run.path / 'rounds.jsonl'}: round: "
                    f"one setting, but rounds 0-{runs[0].rows[-1]['round']} and "
                    f"0-{run.rows[-1]['round']}, or defense records in different rounds")


def settings(runs: list[Run]) -> tuple[list[str], dict[tuple, list[Run]]]:
    """The config keys that vary between the runs (defense and attack first), and the runs
    grouped by their values of those keys (seeds together)."""
    keys = sorted({k for run in runs for k in run.config} - IGNORED_KEYS)
    varying = [k for k in keys if len({json.dumps(r.config.get(k)) for r in runs}) > 1]
    varying = ([k for k in ("defense", "attack") if k in varying]
               + [k for k in varying if k not in ("defense", "attack")])
    if "defense" not in varying:
        varying.insert(0, "defense")
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        groups[tuple(run.config.get(k) for k in varying)].append(run)
    return varying, dict(groups)


def summarise(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std of the values present (std 0 for one value)."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else 0.0


def table(varying: list[str], groups: dict[tuple, list[Run]]) -> list[dict[str, Any]]:
    """One row per setting: its values, the number of seeds, mean and std per metric."""
    rows = []
    for key, runs in groups.items():
        row: dict[str, Any] = dict(zip(varying, key))
        row["seeds"] = len(runs)
        for metric in METRICS:
            row[metric], row[f"{metric}_std"] = summarise([r.metrics[metric] for r in runs])
        rows.append(row)
    return rows


def markdown_table(varying: list[str], rows: list[dict[str, Any]]) -> str:
    def cell(row, metric):
        mean, std = row[metric], row[f"{metric}_std"]
        if mean is None:
            return "–"
        if metric == "detection_seconds":  # shown in milliseconds
            mean, std, digits = 1000 * mean, 1000 * std, 1
        else:
            digits = 3
        return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if row["seeds"] > 1 else "")

    head = [*varying, "seeds", *(HEADERS[m] for m in METRICS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join([*(str(row[k]) for k in varying), str(row["seeds"]),
                                        *(cell(row, m) for m in METRICS)]) + " |")
    return "\n".join(lines)


def write_csv(path: Path, varying: list[str], rows: list[dict[str, Any]]) -> None:
    import csv

    columns = [*varying, "seeds", *(c for m in METRICS for c in (m, f"{m}_std"))]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: row.get(c) for c in columns} for row in rows)


def _label(varying: list[str], key: tuple, skip: tuple[str, ...]) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(varying, key) if k not in skip) or "all runs"


def _panels(varying, groups):
    """Runs by panel (the setting without the defense), then by defense."""
    panels: dict[str, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for key, runs in groups.items():
        defense = dict(zip(varying, key))["defense"]
        panels[_label(varying, key, ("defense",))][defense].extend(runs)
    return panels


def _figure(count: int, plt):
    cols = min(3, count)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    return fig, list(axes.flat)


def plot_accuracy(panels, out: Path, plt) -> Path:
    fig, axes = _figure(len(panels), plt)
    for ax, (title, by_defense) in zip(axes, panels.items()):
        for defense, runs in sorted(by_defense.items()):
            rounds = [r["round"] for r in runs[0].rows]
            mean = [statistics.fmean(run.rows[i]["accuracy"] for run in runs)
                    for i in range(len(rounds))]
            ax.plot(rounds, mean, marker="o", markersize=3, label=defense)
        ax.set(title=title, xlabel="round", ylabel="test accuracy (mean over seeds)")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out / "accuracy.png", plt)


def plot_roc(panels, out: Path, plt) -> Path:
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, axes = _figure(len(panels), plt)
    for ax, (title, by_defense) in zip(axes, panels.items()):
        for defense, runs in sorted(by_defense.items()):
            y, s = [], []
            truth, removed, scores = pool_rounds(  # the runs whose every round has scores
                d for run in runs if all(d[2] is not None for d in run.decisions)
                for d in run.decisions)
            keys = sorted(truth)
            # as the harness's AUC: a removed client without a score ranks above all
            ranking = ranking_scores(keys, scores, removed) if keys else None
            if ranking is not None:
                y, s = [int(truth[k]) for k in keys], ranking
            if 0 < sum(y) < len(y):
                fpr, tpr, _ = roc_curve(y, s)
                ax.plot(fpr, tpr, label=f"{defense} (AUC {roc_auc_score(y, s):.3f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set(title=title, xlabel="false positive rate", ylabel="true positive rate")
        ax.title.set_fontsize(9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
        else:  # no defense scored rounds that had both attackers and benign clients
            ax.text(0.5, 0.5, "no scored rounds with both\nattackers and benign clients",
                    ha="center", va="center", fontsize=8, transform=ax.transAxes)
    return _save(fig, out / "roc.png", plt)


def plot_detection_seconds(panels, out: Path, plt) -> Path:
    fig, axes = _figure(len(panels), plt)
    for ax, (title, by_defense) in zip(axes, panels.items()):
        for defense, runs in sorted(by_defense.items()):
            rows = [row for row in runs[0].rows if "defense" in row]
            ax.plot([row["round"] for row in rows],
                    [1000 * statistics.fmean(detection_seconds(run.rows[row["round"]]) for run in runs)
                     for row in rows], marker="o", markersize=3, label=defense)
        ax.set(title=title, xlabel="round", ylabel="detection ms per round (mean over seeds)")
        ax.set_yscale("log")  # the rules differ by orders of magnitude
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out / "detection-seconds.png", plt)


def plot_scores(panels, out: Path, plt) -> Path | None:
    """Per-client scores per round of one run (the first seed) per defense that scores, the
    attackers in red, with the rule's cut where its record names one (``threshold``)."""
    title, by_defense = next(iter(panels.items()))
    scoring = {d: runs[0] for d, runs in sorted(by_defense.items())
               if all(row["defense"].get("scores") for row in runs[0].rows if "defense" in row)}
    if not scoring:
        return None
    fig, axes = _figure(len(scoring), plt)
    for ax, (defense, run) in zip(axes, scoring.items()):
        cut = None
        for row in (r for r in run.rows if "defense" in r):
            attackers = set(row.get("attackers", []))
            for node, score in row["defense"]["scores"].items():
                bad = int(node) in attackers
                ax.scatter(row["round"] + (0.12 if bad else -0.12), score, s=10,
                           color="red" if bad else "tab:blue", alpha=0.7)
            threshold = row["defense"].get("details", {}).get("threshold")
            cut = threshold if isinstance(threshold, (int, float)) else cut
        if cut is not None:
            two_sided = any(s < 0 for r in run.rows if "defense" in r
                            for s in r["defense"]["scores"].values())
            ax.axhline(cut, color="black", linestyle="--", linewidth=1,
                       label=f"cut {'±' if two_sided else ''}{cut:g}")
            if two_sided:
                ax.axhline(-cut, color="black", linestyle="--", linewidth=1)
        ax.scatter([], [], color="red", s=10, label="attacker")
        ax.scatter([], [], color="tab:blue", s=10, label="benign")
        ax.set(title=f"{defense}\n{title}", xlabel="round", ylabel="score (higher = more suspicious)")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8)
    return _save(fig, out / "scores.png", plt)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap_grid(run: Run) -> Path | None:
    """The heat-map grid a run saved for its middle round (of those saved), if any."""
    pngs = sorted(run.path.glob("heatmaps-round*.png"))
    return pngs[len(pngs) // 2] if pngs else None


def heatmap_example(runs: list[Run], out: Path) -> Path | None:
    """A copy of one round's heat-map grid (attackers titled, excluded framed) if a run saved it."""
    grid = next((png for run in runs if (png := heatmap_grid(run)) is not None), None)
    if grid is None:
        return None
    target = out / "heatmaps.png"
    shutil.copyfile(grid, target)
    return target


RUN_FILES = ("config.json", "rounds.jsonl", "summary.json")
"""What ``--copy-runs`` keeps of each run, with its ``heatmap_grid``: enough to make the report
again."""


def copy_runs(runs: list[Run], folders: list[Path], target: Path) -> None:
    """The runs' ``RUN_FILES`` (and a sweep's grid.toml) under ``target``, paths kept; runs
    already below ``target`` stay as they are."""
    for run in runs:  # folders are resolved, as run_folders's paths
        if run.path.is_relative_to(target):
            continue
        base = next(f for f in folders if run.path.is_relative_to(f))
        destination = target / run.path.relative_to(base)
        destination.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:
            shutil.copyfile(run.path / name, destination / name)
        if (grid := heatmap_grid(run)) is not None:
            shutil.copyfile(grid, destination / grid.name)
    for folder in folders:
        if (folder / "grid.toml").exists() and not folder.is_relative_to(target):
            shutil.copyfile(folder / "grid.toml", target / "grid.toml")


def check_copies(runs: list[Run], folders: list[Path], target: Path, inputs: set[Path]) -> None:
    """``copy_runs`` can keep these runs under ``target`` so that a report made from it is this
    one: no two runs go to one folder, and ``target`` holds no run of another report (it would be
    counted there), ``inputs`` (the run folders this report read) aside. ``ReportError`` naming
    the folder otherwise."""
    destinations: dict[Path, Path] = {}
    for run in runs:
        if run.path.is_relative_to(target):
            continue
        base = next(f for f in folders if run.path.is_relative_to(f))
        destination = target / run.path.relative_to(base)
        if destination in destinations:
            raise ReportError(f"{destination}: runs {destinations[destination]} and {run.path} "
                              f"would both be copied there; report their folders separately")
        destinations[destination] = run.path
    ours = {run.identity for run in runs}
    for path in run_folders([target]) if target.exists() else []:
        try:
            identity = run_identity(path)
        except OSError:
            identity = ""
        if identity not in ours and path not in inputs:
            raise ReportError(f"{target}: holds {path}, which is not one of this report's runs "
                              f"(an earlier report's?); remove it or choose another --out")


def report(folders: list[Path], out: Path, command: str, keep_runs: bool = False) -> Path:
    """Write the report of the runs below ``folders`` into ``out`` (with ``keep_runs``, also
    the runs' files under ``out/runs``, from which the same command remakes it); the path of
    report.md. Everything is checked before anything is written: ``ReportError`` naming the
    file and the field."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folders = [f.resolve() for f in folders]
    for folder in folders:
        if not folder.is_dir():
            raise ReportError(f"{folder}: no such folder")
    copies = (out / "runs").resolve()
    paths = run_folders(folders)
    skipped = own_copies(paths, folders, copies)
    if skipped:
        warn(f"{copies}: this report's own copies of {len(skipped)} run(s), not read as input")
    inputs = [p for p in paths if p not in skipped]
    runs, left_out = read_runs(inputs)
    for item in left_out:
        warn(f"{item.reason}; left out")
    if not runs:
        raise ReportError(f"{', '.join(map(str, folders))}: no finished run (summary.json) to "
                          f"report" + (f"; {len(left_out)} left out" if left_out else ""))
    varying, groups = settings(runs)
    check_groups(groups)
    if keep_runs:
        check_copies(runs, folders, copies, set(inputs))
    out.mkdir(parents=True, exist_ok=True)
    if keep_runs:
        copy_runs(runs, folders, copies)
    rows = table(varying, groups)
    write_csv(out / "table.csv", varying, rows)
    panels = _panels(varying, groups)
    figures = [("Test accuracy per round", plot_accuracy(panels, out, plt)),
               ("ROC of each defense's scores, pooled over rounds and seeds", plot_roc(panels, out, plt)),
               ("Detection seconds per round", plot_detection_seconds(panels, out, plt)),
               ("Per-client scores per round (one seed)", plot_scores(panels, out, plt)),
               ("Heat maps of one round", heatmap_example(runs, out))]
    text = ["# Detection report", "",
            f"{len(runs)} runs, {len(groups)} settings. Made by:", "", "```bash", command, "```", ""]
    if left_out:
        text += [f"Left out ({len(left_out)}):", "", *(f"- {item.reason}" for item in left_out), ""]
    grids = sorted({f / "grid.toml" for f in folders if (f / "grid.toml").exists()})
    for grid in grids:
        text += ["Grid:", "", "```toml", grid.read_text().strip(), "```", ""]
    text += ["Mean ± sample std over seeds. Detection metrics pool every (client, round) "
             "decision of a run: a client counts as detected in a round when its upload was "
             "excluded or rejected; AUC ranks the defense's scores.", "",
             markdown_table(varying, rows), "", "(Also as `table.csv`.)", ""]
    for caption, path in figures:
        if path is not None:
            text += [f"## {caption}", "", f"![{caption}]({path.name})", ""]
    target = out / "report.md"
    target.write_text("\n".join(text))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="layercam-report", description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", help="sweep or results folders")
    parser.add_argument("--out", type=Path, required=True, help="where the report goes")
    parser.add_argument("--copy-runs", action="store_true",
                        help="also copy each run's config, rounds and summary to <out>/runs, so "
                             "that 'layercam-report <out>/runs --out <out>' remakes the report")
    args = parser.parse_args(argv)
    command = "layercam-report " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        target = report(args.folders, args.out, command, args.copy_runs)
    except ReportError as err:
        print(f"layercam-report: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the output folder cannot be written
        print(f"layercam-report: {err.filename or args.out}: {err.strerror or err}",
              file=sys.stderr)
        return 2
    print(f"Report: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
