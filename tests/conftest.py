"""Shared fixtures: a self-started Flower SuperLink (simulation runtime) for end-to-end tests,
and torch's thread count kept from leaking from one test into the next.

Each test session gets its own FLWR_HOME and a free port (started again on another if the
port was taken before the SuperLink bound it); the SuperLink and everything it spawned are
stopped in teardown so no Flower process outlives the tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.local_federation import BIN, flower_env, stage_app, start_listening, stop


def pytest_configure(config) -> None:
    """Each pytest-xdist worker (``addopts``: two) gives torch and BLAS one thread: two
    workers of two threads each on two cores spin against each other (a GAE test took 43 s
    instead of 5). The Flower processes the tests start keep their own settings."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(1)
        threadpool_limits(1)


def pytest_collection_modifyitems(items) -> None:
    """Whole runs (marked ``e2e``) first, the rest in their order: the workers start the long
    files at once and the short ones fill in after, so that no long file runs alone at the end
    (``--no-loadscope-reorder`` in ``addopts``: pytest-xdist would otherwise hand out the files
    with the most tests first, which puts the whole runs, a few tests each, last)."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)


@pytest.fixture(scope="session")
def initial_torch_threads() -> int:
    """torch's intra-op thread count as the session found it (set up before any module's
    fixtures: the session scope comes first)."""
    import torch

    return torch.get_num_threads()


@pytest.fixture(autouse=True)
def torch_threads_reset(initial_torch_threads):
    """The ClientApp sets torch's intra-op threads to 1 (a simulated client shares the cores),
    and so do the heat-map workers; called in-process by a test or a module's fixture, that
    setting would reach every later test, whose numbers then depend on which tests ran before
    (float sums reduce in another order). After each test, the session's count is set back."""
    import torch

    yield
    torch.set_num_threads(initial_torch_threads)


class SimulationLink:
    """A running ``flower-superlink --simulation`` and how to submit runs to it."""

    def __init__(self, home: Path, port: int, app: Path) -> None:
        self.home, self.port, self.app = home, port, app

    def env(self) -> dict[str, str]:
        return flower_env(self.home)

    def run(self, run_config: str, num_supernodes: int, timeout: float = 600) -> tuple[str, Path]:
        """Submit ``flwr run`` (streamed) and return its output and the run's results folder.

        ``flwr run --stream`` exits 0 even when the run fails, so success is judged from the
        results folder (``summary.json``), which the caller checks.
        """
        results = Path(self.home) / f"results-{time.monotonic_ns()}"
        cmd = [str(BIN / "flwr"), "run", str(self.app), "sim", "--stream",
               "--federation-config",
               f"num-supernodes={num_supernodes} client-resources-num-cpus=1 init-args-num-cpus=2",
               "--run-config", f"{run_config} results-dir='{results}'"]
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout)
        return proc.stdout + proc.stderr, results


@pytest.fixture(scope="session")
def flower_app(tmp_path_factory) -> Path:
    """This app as ``flwr run`` packs it, outside the repository and its .venv
    (``stage_app``)."""
    return stage_app(tmp_path_factory.mktemp("app"))


@pytest.fixture(scope="session")
def simulation_link(tmp_path_factory, flower_app):
    home = tmp_path_factory.mktemp("flwr-home")

    def command(port: int) -> list[str]:
        return [str(BIN / "flower-superlink"), "--insecure", "--simulation",
                "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                "--port", str(port), "--database", str(home / "state.db")]

    proc, port = start_listening(command, home / "superlink.log", flower_env(home))
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    yield SimulationLink(home, port, flower_app)
    stop(proc)  # the SuperLink and the apps it spawned


def read_rounds(results: Path) -> tuple[Path, list[dict]]:
    """The single run folder under ``results`` and its rounds.jsonl rows."""
    runs = [p for p in results.iterdir() if p.is_dir()] if results.exists() else []
    assert len(runs) == 1, f"expected one run folder in {results}, found {runs}"
    rows = [json.loads(line) for line in (runs[0] / "rounds.jsonl").read_text().splitlines()]
    return runs[0], rows


def rows_without_timings(folder: Path) -> list[dict]:
    """A run folder's rounds.jsonl rows without what differs from run to run (the timings)."""
    rows = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    for row in rows:
        del row["seconds"], row["elapsed"]
        row.get("defense", {}).pop("timings", None)
    return rows
