"""``layercam-sweep``: run a grid of experiments, each cell a real ``flwr run``.

    layercam-sweep presets/cpu-small.toml --sweep-dir sweeps/cpu-small

The grid file (TOML) has three tables, all optional but ``[grid]``:

    [sweep]
    seeds = [42, 1]                 # every cell runs once per seed
    [base]                          # run-config keys every cell shares
    num-server-rounds = 6
    [grid]                          # every combination of these run-config values is a cell
    defense = ["layercam-ae", "multi-krum", "fedavg"]
    attack = ["gae", "radius-noise"]

Each cell runs ``flwr run <project> [<federation>] --stream`` with its run config, a
``results-dir`` of its own under ``<sweep-dir>/cells/<cell>/attempt-<k>``, and, for a
simulation, ``--federation-config`` sized to its ``num-clients``. ``flwr run --stream`` exits 0
even when a run fails, so a cell is done when its folder holds a ``summary.json``. A failed
cell is recorded (``<sweep-dir>/cells.jsonl``: the cell, ``failed``, the error's last lines)
and the sweep goes on; ``<sweep-dir>/status.json`` says where every cell stands. Run the same command again to resume: done cells are skipped, the
others run again in a fresh attempt folder. Stopped with Ctrl-C (or SIGTERM), the sweep stops
the run in flight on the SuperLink (``flwr stop``) before it exits.

Nothing runs until the whole grid is checked: the tables and their types, every cell's run config
(``RunConfig.from_run_config``, the defense and attack registries) and that ``flwr run`` receives
every value exactly; a bad grid stops with one line naming the file and the field (exit 2). A
cell's folder name is its ``key=value`` pairs, plus ``~`` and a short hash of the exact values
when that text would not read back as them (so two cells never share a folder).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server_app.results import write_json
from task.config import ConfigError, RunConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package (a Flower dependency)
    import tomli as tomllib

SIMULATION_RESOURCES = "client-resources-num-cpus=1 init-args-num-cpus=2"
"""The simulation's resources per run (2 cores: Ray runs more clients than cores)."""


NAME_LIMIT = 120
"""Characters of a cell name's readable part (a path component must stay under 255 bytes)."""
UNSAFE_IN_NAME = re.compile(r"[^a-z0-9.+-]")
"""What a cell name replaces by ``_`` in a value: a path and Flower's app-bundle manifest (which is
comma-separated) take the rest, and a case-insensitive file system cannot confuse them."""
SET_BY_SWEEP = {"seed": "set the seeds in [sweep] seeds",
                "results-dir": "the sweep gives every cell a folder of its own"}
"""Run-config keys the sweep sets for every cell: a grid file may not set them."""


def value_text(value: Any) -> str:
    """A value as a cell name shows it (booleans as TOML writes them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def read_value(text: str) -> Any:
    """A cell name's value text read back: a TOML boolean or number, else the text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def typed(values: Iterable[tuple[str, Any]]) -> list[tuple[str, str, str]]:
    """Values compared exactly: ``1``, ``1.0``, ``True`` and ``"1"`` all differ."""
    return [(key, type(value).__name__, repr(value)) for key, value in values]


def read_slug(slug: str) -> list[tuple[str, Any]] | None:
    """The ``(key, value)`` pairs a readable cell name says, or ``None`` if it is not one."""
    pairs = []
    for part in slug.split("__"):
        key, equals, text = part.partition("=")
        if not equals:
            return None
        pairs.append((key, read_value(text)))
    return pairs


def cell_name(values: tuple[tuple[str, Any], ...]) -> str:
    """``defense=fedavg__attack=gae__seed=42``; when that text would not read back as exactly
    these values (a character replaced, a string that reads as a number, too long), ``~`` and 8
    hex digits of their hash follow, so distinct values never share a name."""
    slug = "__".join(f"{key}={UNSAFE_IN_NAME.sub('_', value_text(value))}" for key, value in values)
    if len(slug) <= NAME_LIMIT and (read := read_slug(slug)) is not None \
            and typed(read) == typed(values):
        return slug
    digest = hashlib.sha256(json.dumps(typed(values)).encode()).hexdigest()[:8]
    return f"{slug[:NAME_LIMIT]}~{digest}"


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its run-config values (grid values plus the seed)."""

    values: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        """Its folder name (``cell_name``): one per distinct cell, safe for a path and for
        Flower's app bundle."""
        return cell_name(self.values)


def read_grid_file(path: Path) -> dict[str, Any]:
    """The grid file's TOML; ``ConfigError`` naming the file when it cannot be read or parsed."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text: {err}") from err
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err


def check_tables(path: Path, spec: dict[str, Any]) -> None:
    """The grid file's shape: only the tables sweep, base and grid, each a table; ``[sweep]``
    holds only ``seeds``; ``[grid]`` has a key with a value; no key set twice or set by the
    sweep itself."""
    for name in spec:
        if name not in ("sweep", "base", "grid"):
            raise ConfigError(f"{path}: {name}: unknown table; use sweep, base, grid")
        if not isinstance(spec[name], dict):
            raise ConfigError(f"{path}: {name}: must be a table ([{name}] and its keys), "
                              f"got {spec[name]!r}")
    for key in spec.get("sweep", {}):
        if key != "seeds":
            raise ConfigError(f"{path}: sweep.{key}: unknown key; [sweep] has only seeds")
    grid = spec.get("grid", {})
    if not grid or any(value == [] for value in grid.values()):
        raise ConfigError(f"{path}: grid: [grid] needs at least one key with at least one value")
    for table in ("base", "grid"):
        for key in spec.get(table, {}):
            if key in SET_BY_SWEEP:
                raise ConfigError(f"{path}: {table}.{key}: {SET_BY_SWEEP[key]}")
    for key in set(spec.get("base", {})) & set(grid):
        raise ConfigError(f"{path}: base.{key}: also a key of [grid]; set it in one of them")


def grid_seeds(path: Path, sweep: dict[str, Any]) -> list[int]:
    """``[sweep] seeds``: a non-empty list of distinct integers (the run config's default seed
    when absent)."""
    seeds = sweep.get("seeds", [RunConfig.seed])
    if (not isinstance(seeds, list) or not seeds
            or any(not isinstance(s, int) or isinstance(s, bool) for s in seeds)):
        raise ConfigError(f"{path}: sweep.seeds: must be a list of integer seeds, e.g. [42, 1], "
                          f"got {seeds!r}")
    check_distinct(path, "sweep.seeds", seeds)
    return seeds


def check_distinct(path: Path, field_name: str, values: list[Any]) -> None:
    """No value listed twice (it would be one cell run twice, in one folder)."""
    seen: list[list[tuple[str, str, str]]] = []
    for value in values:
        exact = typed([("", value)])
        if exact in seen:
            raise ConfigError(f"{path}: {field_name}: {value!r} is listed twice")
        seen.append(exact)


def check_names(config: RunConfig) -> None:
    """The defense and attack exist in their registries (``ConfigError`` naming the key and
    the choices): what the ServerApp and ClientApps look up when they build them."""
    from attacks import ATTACKS
    from strategies.registry import DEFENSES

    DEFENSES.get(config.defense)
    ATTACKS.get(config.attack)


def check_passes_through(values: dict[str, Any]) -> None:
    """``flwr run --run-config`` gets exactly these values (its own parser reads them back);
    ``ConfigError`` naming the first key that would change."""
    from flwr.common.config import parse_config_args

    arg = run_config_arg(values)
    read = parse_config_args([arg])
    for key, value in values.items():
        if key not in read or typed([(key, read[key])]) != typed([(key, value)]):
            raise ConfigError(f"{key}={value!r} does not pass through flwr run's --run-config "
                              f"intact")


@dataclass(frozen=True)
class SweepGrid:
    """A parsed grid file: the run-config values every cell shares, the axes and the seeds."""

    base: dict[str, Any]
    axes: dict[str, list[Any]]
    seeds: list[int]

    @classmethod
    def load(cls, path: Path) -> SweepGrid:
        """Read and check a grid file, every cell included, before anything runs: its shape,
        every cell a valid run config naming a registered defense and attack, passed intact to
        ``flwr run``, and no two cells the same run. ``ConfigError`` names the file and the
        field (a cell's error, the cell and the key)."""
        spec = read_grid_file(path)
        check_tables(path, spec)
        axes = {k: v if isinstance(v, list) else [v] for k, v in spec["grid"].items()}
        for key, values in axes.items():
            check_distinct(path, f"grid.{key}", values)
        seeds = grid_seeds(path, spec.get("sweep", {}))
        grid = cls(base=dict(spec.get("base", {})), axes=axes, seeds=seeds)
        configs: dict[RunConfig, Cell] = {}
        for cell in grid.cells():
            try:
                config = RunConfig.from_run_config(grid.run_config(cell))
                check_names(config)
                check_passes_through(grid.run_config(cell))
            except ConfigError as err:
                raise ConfigError(f"{path}: cell {cell.name}: {err}") from err
            if config in configs:
                raise same_run(path, configs[config], cell)
            configs[config] = cell
        return grid

    def cells(self) -> list[Cell]:
        keys = list(self.axes)
        return [Cell(tuple(zip(keys, combo)) + (("seed", seed),))
                for combo in itertools.product(*(self.axes[k] for k in keys))
                for seed in self.seeds]

    def run_config(self, cell: Cell) -> dict[str, Any]:
        return {**self.base, **dict(cell.values)}


def same_run(path: Path, first: Cell, second: Cell) -> ConfigError:
    """Two cells whose values differ only in how they are written (``3`` and ``3.0``)."""
    keys = [k for (k, a), (_, b) in zip(first.values, second.values)
            if typed([(k, a)]) != typed([(k, b)])]
    values = " and ".join(repr(dict(cell.values)[keys[0]]) for cell in (first, second))
    return ConfigError(f"{path}: grid.{keys[0]}: {values} are the same value "
                       f"(cells {first.name} and {second.name} would be one run)")


def run_config_arg(values: dict[str, Any]) -> str:
    """Flower's ``--run-config`` string (TOML values: booleans lower-case, strings quoted:
    between ``'`` as they are, or between ``"`` and escaped when they hold a ``'`` or a control
    character; ``flwr run`` cannot take one holding both quotes: ``ConfigError``)."""
    def literal(key: str, value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            plain = "'" not in value and not re.search(r"[\x00-\x08\x0a-\x1f\x7f]", value)
            if plain:
                return f"'{value}'"
            if '"' in value:
                raise ConfigError(f"{key}={value!r}: flwr run's --run-config cannot pass a "
                                  f"string holding both ' and \"")
            return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
        return repr(value)

    return " ".join(f"{key}={literal(key, value)}" for key, value in values.items())


def attempt_number(attempt: Path) -> int | None:
    """N of a cell's ``attempt-N`` folder; None for a folder named otherwise."""
    number = attempt.name.removeprefix("attempt-")
    return int(number) if number.isdecimal() else None


def finished_run(folder: Path) -> Path | None:
    """The run folder with a ``summary.json`` under a cell's folder, if any: the earliest
    attempt's (by number: ``attempt-10`` comes after ``attempt-9``) where several hold one."""
    def earliest(summary: Path) -> tuple[int, str]:
        number = attempt_number(summary.parent.parent)
        return (sys.maxsize if number is None else number, str(summary))

    summaries = sorted(folder.glob("attempt-*/*/summary.json"), key=earliest)
    return summaries[0].parent if summaries else None


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    """The last record of each cell in ``cells.jsonl`` (absent: none). A line that is not a
    cell's record (a write cut short by a crash) is left out with a warning naming it: the
    records only say why a cell failed; whether it is done is read from its folder."""
    last: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return last
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            warn(f"{path}: line {number}: not JSON ({err.msg}); left out")
            continue
        if not isinstance(record, dict) or not isinstance(record.get("cell"), str):
            warn(f"{path}: line {number}: cell: missing; left out")
            continue
        last[record["cell"]] = record
    return last


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append a cell's record as one line (after a newline if a crash left the last line
    without one, so the new record is not glued to the broken one)."""
    with open(path, "ab+") as f:
        if f.tell() and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
            f.write(b"\n")
        f.write(json.dumps(record).encode() + b"\n")


def warn(message: str) -> None:
    """One warning line on stderr."""
    print(f"layercam-sweep: warning: {message}", file=sys.stderr, flush=True)


def next_attempt(folder: Path) -> int:
    """The number of a cell's next attempt: one past the highest there (a folder removed by
    hand leaves a gap, never a clash)."""
    numbers = [n for p in folder.glob("attempt-*") if (n := attempt_number(p)) is not None]
    return max(numbers, default=0) + 1


class Sweep:
    """Runs a grid's cells one after another into ``sweep_dir``."""

    def __init__(self, grid: SweepGrid, grid_file: Path, sweep_dir: Path, project: Path,
                 federation: str | None, federation_config: str | None, timeout: float) -> None:
        self.grid, self.sweep_dir, self.project = grid, sweep_dir, project
        self.federation, self.federation_config, self.timeout = federation, federation_config, timeout
        try:
            check_passes_through({"results-dir": str(sweep_dir)})
        except ConfigError as err:
            raise ConfigError(f"--sweep-dir {sweep_dir}: {err}") from err
        sweep_dir.mkdir(parents=True, exist_ok=True)
        kept = sweep_dir / "grid.toml"
        if kept.exists() and SweepGrid.load(kept).base != grid.base:
            # a cell's folder is named by its axes and seed only: its done runs would be
            # counted as this grid's
            raise ConfigError(f"--sweep-dir {sweep_dir} holds the runs of a grid whose [base] "
                              f"differs from {grid_file}'s: use another --sweep-dir")
        if not (kept.exists() and kept.samefile(grid_file)):  # resumed from its own copy
            shutil.copyfile(grid_file, kept)  # the grid the sweep now runs (axes, seeds grow)
        self.run_id: str | None = None
        self.process: subprocess.Popen | None = None

    def command(self, cell: Cell, results: Path) -> list[str]:
        values = {**self.grid.run_config(cell), "results-dir": str(results)}
        command = ["flwr", "run", str(self.project)]
        if self.federation:
            command.append(self.federation)
        command += ["--stream", "--run-config", run_config_arg(values)]
        if self.federation_config is not None:
            clients = values.get("num-clients", RunConfig.num_clients)
            command += ["--federation-config",
                        self.federation_config.format(num_clients=clients)]
        return command

    def run_cell(self, cell: Cell) -> dict[str, Any]:
        """Run one cell; its record for ``cells.jsonl``."""
        folder = self.sweep_dir / "cells" / cell.name
        attempt = folder / f"attempt-{next_attempt(folder)}"
        attempt.mkdir(parents=True)
        started = time.monotonic()
        log = attempt / "flwr-run.log"
        with open(log, "w") as output:
            process = self.process = subprocess.Popen(
                self.command(cell, attempt), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, cwd=self.project, start_new_session=True)
            self.run_id, timed_out = None, threading.Event()

            def time_out() -> None:
                timed_out.set()
                self.stop_run()

            watchdog = threading.Timer(self.timeout, time_out)  # also for a silent run
            watchdog.start()
            try:
                for line in process.stdout:  # streamed as the run goes
                    output.write(line)
                    match = re.search(r"started run (\d+)", line)
                    if self.run_id is None and match:
                        self.run_id = match.group(1)
                process.wait()
            finally:
                watchdog.cancel()
                process.stdout.close()
        self.run_id = None
        run = finished_run(folder)
        record = {"cell": cell.name, "values": dict(cell.values),
                  "seconds": round(time.monotonic() - started, 1)}
        if run is not None:
            return {**record, "status": "done", "run": str(run.relative_to(self.sweep_dir))}
        tail = [line for line in log.read_text().splitlines() if line.strip()][-5:]
        cause = (f"stopped after --cell-timeout {self.timeout:g} s" if timed_out.is_set()
                 else f"flwr run exited with code {process.returncode}"
                 + ("" if tail else " and printed nothing"))
        return {**record, "status": "failed", "exit_code": process.returncode,
                "error": "\n".join([cause, *tail])}

    def stop_run(self) -> None:
        """Stop the run in flight on the SuperLink (``flwr stop``) and its ``flwr run``; the
        latter whatever ``flwr stop`` does (it may fail or hang past its 60 s)."""
        try:
            if self.run_id is not None:
                command = (["flwr", "stop", self.run_id]
                           + ([self.federation] if self.federation else []))
                subprocess.run(command, capture_output=True, cwd=self.project, timeout=60)
        except (OSError, subprocess.SubprocessError) as err:
            print(f"flwr stop {self.run_id}: {err}", file=sys.stderr, flush=True)
        finally:
            if self.process is not None and self.process.poll() is None:
                try:  # its session: the CLI and anything it started
                    os.killpg(self.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def status(self) -> dict[str, dict[str, Any]]:
        """Every cell's state: ``done`` (with its run folder), ``failed`` (with the error of its
        last attempt, from ``cells.jsonl``) or ``pending``."""
        last = read_records(self.sweep_dir / "cells.jsonl")
        out = {}
        for cell in self.grid.cells():
            run = finished_run(self.sweep_dir / "cells" / cell.name)
            if run is not None:
                out[cell.name] = {"status": "done", "run": str(run.relative_to(self.sweep_dir))}
            elif cell.name in last:
                out[cell.name] = {"status": "failed", "error": last[cell.name].get("error", "")}
            else:
                out[cell.name] = {"status": "pending"}
        return out

    def write_status(self, state: dict[str, dict[str, Any]]) -> None:
        write_json(self.sweep_dir / "status.json", state)

    def run(self) -> list[dict[str, Any]]:
        """Every cell not done yet; the progress on stdout; the records. ``status.json`` says
        where every cell stands after each one (read from the folders once, then updated)."""
        cells = self.grid.cells()
        state = self.status()
        self.write_status(state)
        todo = [c for c in cells if state[c.name]["status"] != "done"]
        print(f"{len(cells)} cells, {len(cells) - len(todo)} already done; results in "
              f"{self.sweep_dir}", flush=True)
        started, records = time.monotonic(), []
        for i, cell in enumerate(todo, 1):
            record = self.run_cell(cell)
            records.append(record)
            append_record(self.sweep_dir / "cells.jsonl", record)
            state[cell.name] = {"status": record["status"],
                                **{k: record[k] for k in ("run", "error") if k in record}}
            self.write_status(state)
            elapsed = time.monotonic() - started
            remaining = elapsed / i * (len(todo) - i)
            print(f"[{len(cells) - len(todo) + i}/{len(cells)}] {cell.name}: {record['status']} "
                  f"in {record['seconds']:.0f} s; elapsed {elapsed / 60:.1f} min, about "
                  f"{remaining / 60:.1f} min to go", flush=True)
        failed = [r["cell"] for r in records if r["status"] == "failed"]
        if failed:
            print(f"{len(failed)} cell(s) failed (errors in {self.sweep_dir / 'status.json'}): "
                  f"{failed}", flush=True)
        return records


def check_federation_config(template: str) -> None:
    """``--federation-config`` names no placeholder but ``{num_clients}``."""
    try:
        template.format(num_clients=2)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"--federation-config: {template!r}: only {{num_clients}} may be in "
                          f"braces ({err!r})") from err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="layercam-sweep", description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path, help="the grid file (TOML)")
    parser.add_argument("--sweep-dir", type=Path, required=True,
                        help="where the cells' results go (run again to resume)")
    parser.add_argument("--project", type=Path, default=Path.cwd(),
                        help="the Flower project to run (default: the current directory)")
    parser.add_argument("--federation", default=None,
                        help="the federation to run on (default: the project's default)")
    parser.add_argument("--federation-config",
                        default=f"num-supernodes={{num_clients}} {SIMULATION_RESOURCES}",
                        help="--federation-config per cell; {num_clients} is the cell's "
                             "num-clients; '' for a deployment")
    parser.add_argument("--cell-timeout", type=float, default=3600.0,
                        help="seconds a cell may run before it is stopped and recorded failed")
    args = parser.parse_args(argv)
    try:
        grid = SweepGrid.load(args.grid)
        check_federation_config(args.federation_config)
        sweep = Sweep(grid, args.grid, args.sweep_dir.resolve(), args.project.resolve(),
                      args.federation, args.federation_config or None, args.cell_timeout)
    except ConfigError as err:
        print(f"layercam-sweep: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the sweep folder cannot be made or written
        print(f"layercam-sweep: {err.filename or args.sweep_dir}: {err.strerror or err}",
              file=sys.stderr)
        return 2

    def interrupted(signum, frame):
        sweep.stop_run()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    try:
        records = sweep.run()
    except OSError as err:  # flwr missing, the sweep folder unwritable
        print(f"layercam-sweep: {err.filename or args.sweep_dir}: {err.strerror or err}",
              file=sys.stderr)
        return 2
    return 1 if any(r["status"] == "failed" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
