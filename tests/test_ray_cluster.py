"""The simulation on a Ray cluster: a head and a second Ray node, each started by its own
``ray start`` process on loopback, and ``flwr run`` through a SuperLink whose simulation attaches
to them (``RAY_ADDRESS`` in the SuperLink's environment), as docs/ray-cluster.md does on several
machines. Two rounds of four clients; the rounds' ``ray_nodes`` must name both Ray nodes.

Both nodes share this machine, so each gets its own ``--temp-dir``, free ports for what would
otherwise take a fixed one, and a small object store; on separate machines none of that is
needed. Every process started here is stopped by its process group in teardown.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import read_rounds
from tests.local_federation import BIN, ROOT, flower_env, free_port, start_listening, stop
from tests.sessions import start_session

RAY = shutil.which("ray", path=str(BIN)) or shutil.which("ray")

RECIPE = ROOT / "docs" / "ray-cluster.md"

CPUS_PER_NODE = 2
"""Each node's ``--num-cpus``: with one CPU per client, two clients run on each node at once."""
CLIENTS = 4
NODE_ID = re.compile(r"\bnode_([0-9a-f]{56})\b")
SUPERLINK = ["flower-superlink", "--insecure", "--simulation",
             "--disable-runtime-dependency-installation"]
"""The recipe's SuperLink, started with ``RAY_ADDRESS`` (and its host and port)."""
FEDERATION = "client-resources-num-cpus=1"
"""The recipe's federation config besides ``num-supernodes``: no ``init-args-*``."""
CONNECTION = '[superlink.ray-cluster]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
"""The recipe's connection for the ``flwr`` CLI, added to ``config.toml``."""


def ray_env() -> dict[str, str]:
    """This environment, without an address that would point ``ray`` at another cluster."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def stop_group(process: subprocess.Popen) -> None:
    """Stop ``process``'s group, then wait for the rest of the group (Ray's raylet and
    workers exit after the ``ray start`` that leads it), killing what is left after 20 s."""
    stop(process)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.3)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class RayCluster:
    """A Ray head and a second Ray node on loopback, and the SuperLink attached to them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.processes: list[subprocess.Popen] = []

    def start_head(self) -> None:
        def command(port: int) -> list[str]:
            return [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                    f"--port={port}", f"--num-cpus={CPUS_PER_NODE}", *self._one_machine("head"),
                    "--include-dashboard=false", f"--ray-client-server-port={free_port()}"]

        head, self.port = start_listening(command, self.root / "head.log", ray_env(), timeout=90)
        self.processes.append(head)

    def start_worker(self) -> None:
        command = [RAY, "start", "--block", f"--address=127.0.0.1:{self.port}",
                   "--node-ip-address=127.0.0.1", f"--num-cpus={CPUS_PER_NODE}",
                   *self._one_machine("worker")]
        with open(self.root / "worker.log", "w") as log:
            self.processes.append(start_session(command, stdout=log, stderr=subprocess.STDOUT,
                                                env=ray_env(), cwd=self.root))

    def _one_machine(self, name: str) -> list[str]:
        """What lets two nodes share one machine: their own temp dir, and free ports where
        Ray would take the same fixed one for both."""
        return [f"--temp-dir={self.root / name}", f"--dashboard-agent-listen-port={free_port()}",
                "--min-worker-port=0", "--max-worker-port=0", "--object-store-memory=100000000",
                "--disable-usage-stats"]

    def status(self) -> str:
        return subprocess.run([RAY, "status", f"--address=127.0.0.1:{self.port}"],
                              env=ray_env(), capture_output=True, text=True, timeout=60).stdout

    def active_nodes(self) -> list[str]:
        """The ids of the nodes ``ray status`` lists as active."""
        active = self.status().split("Active:", 1)[-1].split("Pending:", 1)[0]
        return NODE_ID.findall(active)

    def wait_for_nodes(self, count: int, timeout: float = 90) -> list[str]:
        """The active nodes' ids once there are ``count`` (asked of ``ray status`` when the
        last node's ``ray start`` says it started: each ``ray status`` takes seconds)."""
        deadline = time.monotonic() + timeout
        nodes: list[str] = []
        while True:
            dead = [p.args[:3] for p in self.processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "".join((self.root / f).read_text()[-2000:]
                               for f in ("head.log", "worker.log"))
                raise RuntimeError(
                    f"{len(nodes)} of {count} Ray nodes up (exited: {dead}):\n{logs}")
            if "Ray runtime started" in (self.root / "worker.log").read_text():
                if len(nodes := self.active_nodes()) >= count:
                    return nodes
            time.sleep(0.5)

    def start_superlink(self) -> dict[str, str]:
        """A SuperLink whose simulations attach to this cluster; the CLI's environment."""
        home = self.root / "flwr"
        env = {**flower_env(home), "RAY_ADDRESS": f"127.0.0.1:{self.port}"}

        def command(port: int) -> list[str]:
            return [str(BIN / SUPERLINK[0]), *SUPERLINK[1:], "--host", "127.0.0.1",
                    "--port", str(port)]

        link, port = start_listening(command, self.root / "superlink.log", env)
        self.processes.append(link)
        with open(home / "config.toml", "a") as config:
            config.write("\n" + CONNECTION.format(port=port))
        return flower_env(home)

    def close(self) -> None:
        for process in reversed(self.processes):  # the SuperLink, the second node, the head
            stop_group(process)


@pytest.fixture
def ray_cluster():
    # a short root: Ray's socket paths under it must fit the 107 bytes a Unix socket allows
    root = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    cluster = RayCluster(root)
    try:
        cluster.start_head()
        cluster.start_worker()
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)


def test_the_recipe_gives_the_commands_this_test_runs():
    """docs/ray-cluster.md, with the head at 10.0.0.5 and the SuperLink on port 8000."""
    recipe = RECIPE.read_text()
    assert "ray start --head --port=6379 --num-cpus=" in recipe
    assert "ray start --address=10.0.0.5:6379 --num-cpus=" in recipe
    superlink = " ".join(SUPERLINK)
    assert f"RAY_ADDRESS=10.0.0.5:6379 {superlink} --host 127.0.0.1 --port 8000 &" in recipe
    assert CONNECTION.format(port=8000).replace("\n", "\\n") in recipe  # as printf's argument
    federation = f'--federation-config "num-supernodes=24 {FEDERATION}"'
    assert f"flwr run . ray-cluster --stream {federation}" in recipe


@pytest.mark.e2e
@pytest.mark.skipif(RAY is None, reason="the `ray` CLI is not installed")
def test_a_simulation_attached_to_a_ray_cluster_runs_clients_on_both_nodes(ray_cluster):
    nodes = ray_cluster.wait_for_nodes(2)
    assert len(nodes) == 2, ray_cluster.status()
    cli_env = ray_cluster.start_superlink()
    results = ray_cluster.root / "results"
    run = subprocess.run(
        [str(BIN / "flwr"), "run", str(ROOT), "ray-cluster", "--stream",
         # no init-args-num-cpus: an attached simulation gets the CPUs each node was started with
         "--federation-config", f"num-supernodes={CLIENTS} {FEDERATION}",
         "--run-config", f"num-server-rounds=2 num-clients={CLIENTS} num-attackers=1 "
         f"attack='sign-flip' defense='fedavg' local-epochs=1 results-dir='{results}'"],
        env=cli_env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    output = run.stdout + run.stderr
    run_dir, rows = read_rounds(results)
    assert (run_dir / "summary.json").exists(), output[-3000:]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:  # every upload named its Ray node, one of the cluster's
        ray_nodes = row.get("ray_nodes", {})
        print(f"round {row['round']}: ray_nodes {json.dumps(ray_nodes)}")
        assert set(ray_nodes) <= set(nodes), (ray_nodes, nodes)
        assert sorted(sum(ray_nodes.values(), [])) == sorted(row["defense"]["received"])
    assert set().union(*(row["ray_nodes"] for row in rows[1:])) == set(nodes), output[-3000:]
    print("\n".join(line for line in output.splitlines() if "Ray nodes" in line))
