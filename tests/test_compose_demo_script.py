"""``deploy/compose-demo.sh`` up to Docker, with ``docker`` and ``docker-compose`` replaced by
stubs that log their arguments: the TLS material it makes names ``SUPERLINK_HOST``, material
made before for another address stops it at once, and ``DEMO_RUN_CONFIG`` reaches the CLI
container as written. The demo with Docker for real: docs/deployment.md."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("openssl") is None,
    reason="the script hands its secrets to Flower's user 49999 (root or sudo) and needs openssl")

STUB = """#!/bin/sh
{ printf '%s' "$(basename "$0")"; for a in "$@"; do printf ' [%s]' "$a"; done; echo; } >> "$STUB_LOG"
case "$1" in build) exit "${BUILD_STATUS:-0}" ;; esac
"""


@pytest.fixture
def demo(tmp_path):
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy",
                    ignore=shutil.ignore_patterns("certs", "keys", "secrets"))
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name in ("docker", "docker-compose"):
        (stubs / name).write_text(STUB)
        (stubs / name).chmod(0o755)

    def run(**env) -> tuple[subprocess.CompletedProcess, str]:
        log = tmp_path / "stub.log"
        log.write_text("")
        done = subprocess.run(
            ["bash", str(tmp_path / "deploy" / "compose-demo.sh")], capture_output=True,
            text=True, timeout=120,
            env={**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(log),
                 **env})
        return done, log.read_text()

    return tmp_path, run


def names(certificate: Path) -> str:
    return subprocess.run(["openssl", "x509", "-in", str(certificate), "-noout", "-ext",
                           "subjectAltName"], capture_output=True, text=True, check=True).stdout


def test_the_certificates_name_superlink_host_and_others_stop_the_demo(demo):
    folder, run = demo
    done, log = run(SUPERLINK_HOST="10.0.0.5", BUILD_STATUS="1")  # stop at the image build
    assert done.returncode == 1 and log.startswith("docker [build]"), done.stderr
    assert "IP Address:10.0.0.5" in names(folder / "deploy" / "certs" / "server.pem")
    done, log = run(SUPERLINK_HOST="10.0.0.6")
    assert done.returncode == 1 and log == ""  # before anything is built or started
    assert "server.pem does not name 10.0.0.6 (SUPERLINK_HOST)" in done.stderr


def test_demo_run_config_reaches_the_cli_container_as_written(demo):
    folder, run = demo
    extra = 'layercam-ae-views="norm,direction" seed=$(id -u)'
    done, log = run(DEMO_RUN_CONFIG=extra)  # nothing answers on 9092: the check fails after
    assert done.returncode == 1 and "FAILED: https://127.0.0.1:9092" in done.stderr, done.stderr
    (cli,) = [line for line in log.splitlines() if line.startswith("docker [run]")]
    assert f"[-e] [DEMO_RUN_CONFIG={extra}]" in cli
    assert '--run-config "num-server-rounds=2' in log and 'layercam-ae-epochs=50 $DEMO_RUN_CONFIG"' in log
    assert "docker-compose [down] [--remove-orphans]" in log  # stopped on the way out
