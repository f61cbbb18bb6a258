"""Shared fixtures: a self-started Flower SuperLink (simulation runtime) for end-to-end tests.

Each test session gets its own FLWR_HOME and a free port; the SuperLink and everything it
spawned are stopped in teardown so no Flower process outlives the tests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.sessions import start_session

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SimulationLink:
    """A running ``flower-superlink --simulation`` and how to submit runs to it."""

    def __init__(self, home: Path, port: int) -> None:
        self.home, self.port = home, port

    def env(self) -> dict[str, str]:
        return {**os.environ, "FLWR_HOME": str(self.home),
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    def run(self, run_config: str, num_supernodes: int, timeout: float = 600) -> tuple[str, Path]:
        """Submit ``flwr run`` (streamed) and return its output and the run's results folder.

        ``flwr run --stream`` exits 0 even when the run fails, so success is judged from the
        results folder (``summary.json``), which the caller checks.
        """
        results = Path(self.home) / f"results-{time.monotonic_ns()}"
        cmd = [str(BIN / "flwr"), "run", str(ROOT), "sim", "--stream",
               "--federation-config",
               f"num-supernodes={num_supernodes} client-resources-num-cpus=1 init-args-num-cpus=2",
               "--run-config", f"{run_config} results-dir='{results}'"]
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout)
        return proc.stdout + proc.stderr, results


@pytest.fixture(scope="session")
def simulation_link(tmp_path_factory):
    home = tmp_path_factory.mktemp("flwr-home")
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    link = SimulationLink(home, port)
    log = open(home / "superlink.log", "w")
    proc = start_session(
        [str(BIN / "flower-superlink"), "--insecure", "--simulation",
         "--disable-runtime-dependency-installation", "--port", str(port),
         "--fleet-api-address", f"127.0.0.1:{_free_port()}",
         "--database", str(home / "state.db")],
        env=link.env(), stdout=log, stderr=subprocess.STDOUT, cwd=home,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("SuperLink did not start:\n" + (home / "superlink.log").read_text())
    yield link
    os.killpg(proc.pid, signal.SIGTERM)  # the SuperLink and the apps it spawned
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def read_rounds(results: Path) -> tuple[Path, list[dict]]:
    """The single run folder under ``results`` and its rounds.jsonl rows."""
    runs = [p for p in results.iterdir() if p.is_dir()] if results.exists() else []
    assert len(runs) == 1, f"expected one run folder in {results}, found {runs}"
    rows = [json.loads(line) for line in (runs[0] / "rounds.jsonl").read_text().splitlines()]
    return runs[0], rows
