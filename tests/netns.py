"""Hosts for deployment tests: Linux network namespaces joined to a hub namespace by veth pairs.

Each host gets its own namespace and a point-to-point link 10.<net>.<i>.0/24 to the hub (hub side
.1, host side .2; <net> one that no address here uses yet, so two runs don't collide), so traffic between hosts and hub crosses real interfaces with real addresses
and no bridging or forwarding (whatever the machine's firewall says about those). Each host
namespace routes everything through its link to the hub, so it can reach every address the hub
has, as a machine whose gateway is the server could (Linux accepts a packet for any of its
addresses on any interface): only what listens on the hub's loopback is out of its reach. Needs
root and iproute2.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from tests.sessions import start_session


def netns_unavailable() -> str | None:
    """Why namespaces can't be made here, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    probe = f"flprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _addresses() -> str:
    """Every IPv4 address on this machine, in the root namespace and every named one."""
    def listing(*prefix: str) -> str:
        return subprocess.run(["ip", *prefix, "-o", "-4", "addr"], capture_output=True,
                              text=True).stdout

    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return listing() + "".join(listing("-n", line.split()[0]) for line in names.splitlines()
                               if line.strip())


def free_net() -> int:
    """A second octet ``n`` such that no address in 10.n.0.0/16 is in use here (another test
    run's lab included), starting from one derived from this process id."""
    used = _addresses()
    start = os.getpid() % 200
    for offset in range(200):
        net = 20 + (start + offset) % 200
        if f" 10.{net}." not in used:
            return net
    raise RuntimeError("no free 10.n.0.0/16 for a test lab")


class Lab:
    """A hub namespace and hosts linked to it; ``close`` removes all of it."""

    def __init__(self, net: int | None = None) -> None:
        self.tag = f"{os.getpid() % 100000}"
        self.net = free_net() if net is None else net
        self.hub = f"flhub{self.tag}"
        self.namespaces = [self.hub]
        self.processes: list[subprocess.Popen] = []
        self._links = 0
        _ip("netns", "add", self.hub)
        _ip("-n", self.hub, "link", "set", "lo", "up")

    def add_host(self, name: str | None) -> tuple[str, str]:
        """Link a new host namespace (or the root namespace, ``name=None``) to the hub; return
        (hub address as the host sees it, host address)."""
        i = self._links
        self._links += 1
        hub_end, host_end = f"fl{self.tag}h{i}", f"fl{self.tag}n{i}"
        _ip("link", "add", hub_end, "type", "veth", "peer", "name", host_end)
        _ip("link", "set", hub_end, "netns", self.hub)
        hub_address, host_address = f"10.{self.net}.{i}.1", f"10.{self.net}.{i}.2"
        _ip("-n", self.hub, "addr", "add", f"{hub_address}/24", "dev", hub_end)
        _ip("-n", self.hub, "link", "set", hub_end, "up")
        prefix: list[str] = []
        if name is not None:
            ns = f"fl{self.tag}{name}"
            _ip("netns", "add", ns)
            self.namespaces.append(ns)
            _ip("link", "set", host_end, "netns", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            prefix = ["-n", ns]
        _ip(*prefix, "addr", "add", f"{host_address}/24", "dev", host_end)
        _ip(*prefix, "link", "set", host_end, "up")
        if name is not None:  # the hub is this host's gateway: it reaches every hub address
            _ip("-n", f"fl{self.tag}{name}", "route", "add", "default", "via", hub_address)
        return hub_address, host_address

    def namespace(self, name: str) -> str:
        return self.hub if name == "hub" else f"fl{self.tag}{name}"

    def start(self, name: str, args: list[str], log: Path, env: dict, cwd: Path) -> subprocess.Popen:
        """Start ``args`` inside host ``name`` (``"hub"`` for the hub), output to ``log``."""
        handle = open(log, "w")
        process = start_session(
            ["ip", "netns", "exec", self.namespace(name), *args], stdout=handle,
            stderr=subprocess.STDOUT, env=env, cwd=cwd)
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        for ns in self.namespaces:  # anything still running inside, e.g. orphaned app processes
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
            for pid in pids.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for ns in self.namespaces:  # deleting a namespace deletes its veth ends
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        for i in range(self._links):  # a namespace dies only once its last process has gone:
            # delete the root-namespace end now, so the next Lab can reuse the name
            subprocess.run(["ip", "link", "del", f"fl{self.tag}n{i}"], check=False,
                           capture_output=True)
