"""Start a test's background processes in their own process group, and record the group.

Every test that starts a server (a SuperLink, SuperNodes) stops its group in teardown. As a last
guard for a run that dies before teardown, each group is also appended, with its leader's start
time, to the file named by ``LAYERCAM_TEST_GROUPS`` (set by ``.ci/run``), whose EXIT trap stops
the recorded groups whose leader is still that same process -- never processes by name.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def _start_time(pid: int) -> str:
    """Field 22 of /proc/<pid>/stat: the process's start time, which a reused pid won't share."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[19]


def start_session(args: list[str], **popen_kwargs) -> subprocess.Popen:
    """``subprocess.Popen(args, start_new_session=True, ...)``, its group recorded."""
    process = subprocess.Popen(args, start_new_session=True, **popen_kwargs)
    record = os.environ.get("LAYERCAM_TEST_GROUPS")
    if record:
        try:
            with open(record, "a") as handle:
                handle.write(f"{process.pid} {_start_time(process.pid)}\n")
        except OSError:  # the leader already exited: nothing to guard
            pass
    return process
