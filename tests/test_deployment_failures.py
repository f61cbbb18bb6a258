"""A server crash in a real deployment (``tests.local_federation``: a SuperLink and three
SuperNodes as separate processes on loopback, the ``flwr`` CLI submitting runs): a full run;
then the same run, its ServerApp process killed (SIGKILL) once round 1 is checkpointed, stopped
with ``flwr stop`` as an operator would and resumed from its results folder, ends with the full
run's rounds.jsonl and final model (and the rounds both wrote before the kill were the same: one
seed, the same files). A client host that goes down is in ``test_deployment.py``."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import rows_without_timings
from tests.local_federation import LocalFederation

pytestmark = pytest.mark.e2e

NODES = 3
RUN = (f"num-clients={NODES} num-attackers=1 attack='sign-flip' sign-flip-scale=4.0 "
       "defense='layercam-ae' local-epochs=1 layercam-ae-epochs=50 min-replies=2 "
       "num-server-rounds=2")


def wait_for(condition, timeout: float, what: str, federation: LocalFederation) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}"
                           for p in sorted(federation.workdir.glob("*.log")))
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{logs}")
        time.sleep(0.5)


def run_folder(results: Path) -> Path | None:
    folders = [p for p in results.glob("*") if p.is_dir()] if results.exists() else []
    return folders[0] if len(folders) == 1 else None


def finished(results: Path) -> bool:
    folder = run_folder(results)
    return folder is not None and (folder / "summary.json").exists()


@pytest.fixture
def federation(tmp_path, flower_app):
    federation = LocalFederation(tmp_path, flower_app)
    try:
        for i in range(NODES):
            role = "attacker" if i == NODES - 1 else "benign"
            federation.add_node(f"node{i}", f"partition-id={i} num-partitions={8 * NODES} "
                                           f"role='{role}'")  # small partitions: quick training
        wait_for(lambda: federation.online() == NODES, 90, "three SuperNodes online", federation)
        yield federation
    finally:
        federation.close()


def running_run(federation: LocalFederation) -> str:
    listing = federation.cli("ls", "local", "--format", "json")
    (run,) = [r for r in json.loads(listing.stdout)["runs"] if r["status"] == "running"]
    return run["run-id"]


def submit(federation: LocalFederation, results: Path, extra: str = "") -> None:
    submitted = federation.submit(f"{RUN} results-dir='{results}' {extra}")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr


def test_a_killed_serverapp_resumes_to_the_full_run(federation, tmp_path):
    full = tmp_path / "full"
    submit(federation, full)
    wait_for(lambda: finished(full), 300, "the full run", federation)

    killed = tmp_path / "killed"
    submit(federation, killed)
    wait_for(lambda: (f := run_folder(killed)) is not None and (f / "checkpoint.pt").exists(),
             300, "round 1 of the run to kill", federation)
    (serverapp,) = federation.serverapps()
    os.kill(serverapp, signal.SIGKILL)
    folder = run_folder(killed)
    assert not (folder / "summary.json").exists() and not (folder / "model.pt").exists()
    assert rows_without_timings(folder) == rows_without_timings(run_folder(full))[:2]  # rounds 0 and 1: the same files
    # the operator stops the crashed run (docs/experiments.md): else the SuperLink marks it
    # failed only once its heartbeats are missed, and until then the SuperNodes wait on the
    # round-2 messages it had sent (45 s here)
    stopped = federation.cli("stop", running_run(federation), "local")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    submit(federation, tmp_path / "unused", f"resume-from='{folder}'")
    wait_for(lambda: (folder / "summary.json").exists(), 300, "the resumed run", federation)

    expected = run_folder(full)
    assert rows_without_timings(folder) == rows_without_timings(expected)
    final, wanted = torch.load(folder / "model.pt"), torch.load(expected / "model.pt")
    assert final.keys() == wanted.keys() and all(torch.equal(final[k], wanted[k]) for k in final)
    assert not (tmp_path / "unused").exists()  # the resumed run wrote into its own folder
