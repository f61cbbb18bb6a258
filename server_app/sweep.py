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
"""

from __future__ import annotations

import argparse
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


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its run-config values (grid values plus the seed)."""

    values: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        """A folder name: ``defense=fedavg__attack=gae__seed=42``, safe for a path and for
        Flower's app bundle (whose manifest is comma-separated: no commas)."""
        return "__".join(re.sub(r"[^A-Za-z0-9=.+-]", "_", f"{key}={value}")
                         for key, value in self.values)


@dataclass(frozen=True)
class Grid:
    """A parsed grid file."""

    base: dict[str, Any]
    axes: dict[str, list[Any]]
    seeds: list[int]

    @classmethod
    def load(cls, path: Path) -> Grid:
        """Read and check a grid file: every key must be a run-config key and every cell a
        valid run config (``ConfigError`` names the cell and the key)."""
        spec = tomllib.loads(path.read_text())
        unknown = set(spec) - {"sweep", "base", "grid"}
        if unknown:
            raise ConfigError(f"{path}: unknown table(s) {sorted(unknown)}; use sweep, base, grid")
        axes = {k: v if isinstance(v, list) else [v] for k, v in spec.get("grid", {}).items()}
        if not axes or any(not values for values in axes.values()):
            raise ConfigError(f"{path}: [grid] needs at least one key with at least one value")
        seeds = spec.get("sweep", {}).get("seeds", [RunConfig.seed])
        grid = cls(base=dict(spec.get("base", {})), axes=axes, seeds=list(seeds))
        for cell in grid.cells():
            try:
                RunConfig.from_run_config(grid.run_config(cell))
            except ConfigError as err:
                raise ConfigError(f"{path}: cell {cell.name}: {err}") from err
        return grid

    def cells(self) -> list[Cell]:
        keys = list(self.axes)
        return [Cell(tuple(zip(keys, combo)) + (("seed", seed),))
                for combo in itertools.product(*(self.axes[k] for k in keys))
                for seed in self.seeds]

    def run_config(self, cell: Cell) -> dict[str, Any]:
        return {**self.base, **dict(cell.values)}


def run_config_arg(values: dict[str, Any]) -> str:
    """Flower's ``--run-config`` string (TOML values: strings quoted, booleans lower-case)."""
    def literal(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return "'" + value.replace("'", "") + "'"
        return repr(value)

    return " ".join(f"{key}={literal(value)}" for key, value in values.items())


def finished_run(folder: Path) -> Path | None:
    """The run folder with a ``summary.json`` under a cell's folder, if any."""
    summaries = sorted(folder.glob("attempt-*/*/summary.json"))
    return summaries[0].parent if summaries else None


class Sweep:
    """Runs a grid's cells one after another into ``sweep_dir``."""

    def __init__(self, grid: Grid, grid_file: Path, sweep_dir: Path, project: Path,
                 federation: str | None, federation_config: str | None, timeout: float) -> None:
        self.grid, self.sweep_dir, self.project = grid, sweep_dir, project
        self.federation, self.federation_config, self.timeout = federation, federation_config, timeout
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if not (sweep_dir / "grid.toml").exists():
            shutil.copyfile(grid_file, sweep_dir / "grid.toml")
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
        attempt = folder / f"attempt-{len(list(folder.glob('attempt-*'))) + 1}"
        attempt.mkdir(parents=True)
        started = time.monotonic()
        log = attempt / "flwr-run.log"
        with open(log, "w") as output:
            process = self.process = subprocess.Popen(
                self.command(cell, attempt), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, cwd=self.project, start_new_session=True)
            self.run_id = None
            watchdog = threading.Timer(self.timeout, self.stop_run)  # also for a silent run
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
        self.run_id = None
        run = finished_run(folder)
        record = {"cell": cell.name, "values": dict(cell.values),
                  "seconds": round(time.monotonic() - started, 1)}
        if run is not None:
            return {**record, "status": "done", "run": str(run.relative_to(self.sweep_dir))}
        tail = [line for line in log.read_text().splitlines() if line.strip()][-5:]
        return {**record, "status": "failed", "error": "\n".join(tail)}

    def stop_run(self) -> None:
        """Stop the run in flight on the SuperLink (``flwr stop``) and its ``flwr run``."""
        if self.run_id is not None:
            command = ["flwr", "stop", self.run_id] + ([self.federation] if self.federation else [])
            subprocess.run(command, capture_output=True, cwd=self.project, timeout=60)
        if self.process is not None and self.process.poll() is None:
            try:  # its session: the CLI and anything it started
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def status(self) -> dict[str, dict[str, Any]]:
        """Every cell's state: ``done`` (with its run folder), ``failed`` (with the error of its
        last attempt, from ``cells.jsonl``) or ``pending``."""
        last: dict[str, dict[str, Any]] = {}
        records = self.sweep_dir / "cells.jsonl"
        if records.exists():
            for line in records.read_text().splitlines():
                record = json.loads(line)
                last[record["cell"]] = record
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
            with open(self.sweep_dir / "cells.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
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
        grid = Grid.load(args.grid)
    except (ConfigError, OSError, tomllib.TOMLDecodeError) as err:
        print(f"layercam-sweep: {err}", file=sys.stderr)
        return 2
    sweep = Sweep(grid, args.grid, args.sweep_dir.resolve(), args.project.resolve(),
                  args.federation, args.federation_config or None, args.cell_timeout)

    def interrupted(signum, frame):
        sweep.stop_run()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    records = sweep.run()
    return 1 if any(r["status"] == "failed" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
