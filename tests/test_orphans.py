"""A harness that dies without stopping its swarm (a crash, SIGKILL) does not leave servers running."""

from __future__ import annotations

import contextlib
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
print(swarm.bootstrap.pid, server.proc.pid, swarm.client_dht().pid, flush=True)
time.sleep(600)
"""


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


def _daemon_of(pid: int, timeout: float = 60.0) -> int:
    """The p2pd that the DHT process ``pid`` started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in _children(pid):
            if b"p2pd" in _cmdline(child):
                return child
        time.sleep(0.2)
    raise AssertionError(f"no p2pd under {pid}")


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _wait_dead(pids: dict[str, int], timeout: float) -> list[str]:
    """Names of the processes still alive after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [name for name, pid in pids.items() if _alive(pid)]


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
        bootstrap_pid, server_pid, dht_pid = map(int, line)
        daemon_pid = _daemon_of(dht_pid)
        assert _alive(server_pid) and _alive(bootstrap_pid)
        os.kill(harness.pid, signal.SIGKILL)  # no cleanup runs
        harness.wait()
        # the harness's own DHT process and p2pd (its swarm view) die with it at once
        assert not _wait_dead({"its DHT process": dht_pid, "its p2pd": daemon_pid}, 10), "outlived the harness"
        left = _wait_dead({"the server": server_pid, "the bootstrap peer": bootstrap_pid}, 60)
        assert not left, f"{left} outlived their harness"
    finally:
        harness.kill()


def test_a_killed_server_takes_its_dht_process_and_daemon_along(model_dirs, tmp_path):
    """SIGKILL of a server's main process alone (not its group): its DHT process and p2pd follow."""
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "stamen", "server", model_dirs["llama-gqa"], "--blocks", "0:2",
                               "--torch-threads", "1", "--throughput", "1"], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        dht = []
        while not dht and time.monotonic() < deadline and server.poll() is None:
            dht = [p for p in _children(server.pid) if b"stamen" in _cmdline(p)]  # a fork (not torch_shm_manager)
            time.sleep(0.2)
        assert len(dht) == 1, f"no DHT process under the server:\n{(tmp_path / 'server.log').read_text()}"
        daemon = _daemon_of(dht[0])
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
        left = _wait_dead({"its DHT process": dht[0], "its p2pd": daemon}, 10)
        assert not left, f"{left} outlived the killed server"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
