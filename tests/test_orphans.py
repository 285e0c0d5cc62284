"""A harness that dies without stopping its swarm (a crash, SIGKILL) does not leave servers running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.swarm

HARNESS = """
import sys, time
from stamen.testing.swarm import LocalSwarm
from stamen.types import Span
swarm = LocalSwarm(log_dir=sys.argv[2])
swarm.start_bootstrap()
server = swarm.add_server(sys.argv[1], Span(0, 2), "--torch-threads", "1")
swarm.wait_online("llama-gqa", 2, [server])
print(swarm.bootstrap.pid, server.proc.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_servers_stop_when_their_harness_dies(model_dirs, tmp_path):
    harness = subprocess.Popen([sys.executable, "-c", HARNESS, model_dirs["llama-gqa"], str(tmp_path)],
                               stdout=subprocess.PIPE, text=True)
    try:
        line = harness.stdout.readline().split()
        assert line, "the harness did not start its swarm"
        bootstrap_pid, server_pid = map(int, line)
        assert _alive(server_pid) and _alive(bootstrap_pid)
        os.kill(harness.pid, signal.SIGKILL)  # no cleanup runs
        harness.wait()
        deadline = time.monotonic() + 60
        while (_alive(server_pid) or _alive(bootstrap_pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _alive(server_pid), "the server outlived its harness"
        assert not _alive(bootstrap_pid), "the bootstrap peer outlived its harness"
    finally:
        harness.kill()
