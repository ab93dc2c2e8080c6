"""The helper that stops test servers leaves no process of their group behind."""

import subprocess
import sys
import time

from tests.facedata import _group_alive, stop

# A leader that exits at SIGTERM and a worker that ignores it: the shape of ``mlflow server`` with a uvicorn
# worker still draining connections.
LEADER = """
import signal, subprocess, sys, time
subprocess.Popen([sys.executable, "-c",
                  "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
                  "time.sleep(600)"])
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
time.sleep(600)
"""


def test_stop_kills_a_worker_that_outlives_its_leader():
    proc = subprocess.Popen([sys.executable, "-c", LEADER], start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the worker is up once the group has two members
        members = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        if len(members) >= 2:
            break
        time.sleep(0.1)
    assert len(members) >= 2, "the worker never started"
    time.sleep(0.5)  # let the worker install its SIGTERM handler
    stop(proc, grace=2.0)
    assert proc.returncode == 0  # the leader left at SIGTERM, as the mlflow CLI does
    assert not _group_alive(proc.pid), "a process of the server's group survived stop()"
