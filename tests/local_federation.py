"""A real Flower deployment on this machine's loopback: a SuperLink (no simulation) and
SuperNodes as separate processes, each in its own process group, driven by the ``flwr`` CLI.

Ports are picked free and released before the server binds them, so another process may take
one in between: a server that exits before it listens is started again on new ports.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from tests.sessions import start_session

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STARTS = 3
"""Tries to start a server whose free port was taken before it bound it."""


def stage_app(directory: Path) -> Path:
    """A copy of this Flower app in ``directory`` holding what its FAB holds: pyproject.toml,
    .gitignore and the files its ``fab-include`` patterns match. ``flwr run`` walks the whole
    app directory before it filters, and the repository's .venv holds some 50,000 files: about
    4 s of CPU a run (``flwr build``: 5.2 s from the repository, 1.1 s from the copy).
    ``tests/test_config.py`` checks that both build the same FAB."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = ["pyproject.toml", ".gitignore"]
    names += sorted({str(path.relative_to(ROOT))
                     for pattern in config["tool"]["flwr"]["app"]["fab-include"]
                     for path in ROOT.glob(pattern) if path.is_file()})
    for name in names:
        if (ROOT / name).exists():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, directory / name)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def flower_env(home: Path) -> dict[str, str]:
    """The environment of a Flower process with its own ``FLWR_HOME``."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    env.update(FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


def start_listening(command, log: Path, env: dict, timeout: float = 60) -> tuple[subprocess.Popen, int]:
    """Start ``command(port)`` (its arguments for a free ``port``) and wait until the port
    answers and the process still runs a second later; if it exits first (the port was taken
    meanwhile, and what answers is another process), start it again on another port."""
    for _ in range(STARTS):
        port = free_port()
        with open(log, "a") as output:
            process = start_session(command(port), stdout=output, stderr=subprocess.STDOUT,
                                    env=env, cwd=log.parent)
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            if listening(port):
                time.sleep(1.0)
                if process.poll() is None:
                    return process, port
            time.sleep(0.3)
        stop(process)
    raise RuntimeError(f"could not start {command(0)[0]}:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop ``process``'s group (it and everything it spawned)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def descendants(pid: int, name: str) -> list[int]:
    """Pids of the processes below ``pid`` whose command line mentions ``name``."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])

    def below(child: int) -> bool:
        while child in parents and child != pid:
            child = parents[child]
        return child == pid

    return [p for p, command in commands.items() if p != pid and name in command and below(p)]


class LocalFederation:
    """An insecure SuperLink and SuperNodes on loopback, and the CLI to run this project on it
    (``app``: its files, ``stage_app``)."""

    def __init__(self, workdir: Path, app: Path) -> None:
        self.workdir, self.app = workdir, app
        self.nodes: dict[str, subprocess.Popen] = {}
        self.link, self.port = self._start_link()
        self.cli_env = flower_env(workdir / "home-cli")
        (workdir / "home-cli" / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n[superlink.local]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')

    def _start_link(self) -> tuple[subprocess.Popen, int]:
        """The SuperLink, serving its Fleet, Control and Runtime APIs on one loopback port."""
        def command(port: int) -> list[str]:
            return [str(BIN / "flower-superlink"), "--insecure",
                    "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                    "--port", str(port)]

        return start_listening(command, self.workdir / "superlink.log",
                               flower_env(self.workdir / "home-link"))

    def add_node(self, name: str, node_config: str) -> None:
        def command(port: int) -> list[str]:
            return [str(BIN / "flower-supernode"), "--insecure",
                    "--superlink", f"127.0.0.1:{self.port}",
                    "--host", "127.0.0.1", "--port", str(port), "--node-config", node_config]

        self.nodes[name], _ = start_listening(command, self.workdir / f"{name}.log",
                                              flower_env(self.workdir / f"home-{name}"))

    def online(self) -> int:
        import json

        listing = self.cli("supernode", "list", "local", "--format", "json")
        if listing.returncode:
            return 0
        return sum(n.get("status") == "online" for n in json.loads(listing.stdout)["nodes"])

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.cli_env, capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT)

    def submit(self, run_config: str) -> subprocess.CompletedProcess:
        """``flwr run`` of this project (``app``), without waiting for the run."""
        return self.cli("run", str(self.app), "local", "--run-config", run_config)

    def serverapps(self) -> list[int]:
        """The pids of the ServerApp processes the SuperLink runs now."""
        return descendants(self.link.pid, "flwr-serverapp")

    def close(self) -> None:
        for process in [*self.nodes.values(), self.link]:
            stop(process)
