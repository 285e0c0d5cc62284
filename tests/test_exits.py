"""Every exit path of the commands is clean: a one-line error and a non-zero exit for typed errors and
bad usage (the traceback only with --debug or STAMEN_DEBUG=1), range and port checks before anything
starts, nothing left running afterwards, and no interpreter-exit noise on stderr."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

NOISE = ("Traceback", "There is no current event loop", "Task was destroyed but it is pending",
         "Exception ignored")


def stamen(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``stamen ARGS`` in a session of its own; afterwards nothing of that session may be alive
    (its DHT process, its p2pd)."""
    return run_alone([sys.executable, "-m", "stamen", *args], timeout, env)


def run_alone(cmd: list[str], timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a session of its own and check that it leaves nothing of that session alive."""
    what = " ".join(cmd[1:5])[:100]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, **(env or {})})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{what} still ran after {timeout} s:\n{err[-3000:]}")
    left = _session_members(proc.pid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"{what} exited and left {left} running"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _session_members(sid: int, grace: float = 5.0) -> list[int]:
    """Live processes of session ``sid`` (after a short grace period for those already dying)."""
    deadline = time.monotonic() + grace
    while True:
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[3]) == sid:
                found.append(int(entry))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The error line of a failed command, checked to be alone and without a traceback or exit noise."""
    assert proc.returncode not in (0, None), proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert not any(n in proc.stderr for n in NOISE), proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


def busy_port() -> socket.socket:
    """A listening socket that, like libp2p's, lets others bind its port with SO_REUSEPORT."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_a_missing_model_directory_is_one_line():
    line = one_line_error(stamen("server", "/nonexistent/model", "--blocks", "0:1"))
    assert "/nonexistent/model" in line and "no such directory" in line and "hub" not in line


def test_blocks_past_the_model_fail_before_anything_starts(model_dirs):
    """It used to print this, then hang for good, deaf to SIGTERM: its DHT process had inherited the
    server loop's SIGTERM handler and the exit waited for it."""
    start = time.monotonic()
    line = one_line_error(stamen("server", model_dirs["llama-gqa"], "--blocks", "0:999", timeout=45))
    assert line == "error: --blocks [0:999) is past the model's 6 blocks"
    assert time.monotonic() - start < 30


def test_debug_shows_the_traceback(model_dirs, monkeypatch):
    proc = stamen("server", model_dirs["llama-gqa"], "--blocks", "0:999", env={"STAMEN_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "CheckpointError" in proc.stderr
    from stamen.cli.main import _debug_requested

    monkeypatch.setenv("STAMEN_DEBUG", "0")  # off (and unset again after the test)
    monkeypatch.setattr(sys, "argv", ["stamen", "server", "m", "--debug", "--blocks", "0:1"])
    assert _debug_requested() and sys.argv == ["stamen", "server", "m", "--blocks", "0:1"]  # every command takes it
    assert os.environ["STAMEN_DEBUG"] == "1"  # and what the command starts inherits it
    monkeypatch.setattr(sys, "argv", ["stamen", "generate", "m", "--", "--debug"])
    monkeypatch.setenv("STAMEN_DEBUG", "0")
    assert not _debug_requested() and sys.argv[-1] == "--debug"


UNREACHABLE = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWL5ufTbMcwEsjxWtvfcfM8GcFDqgDTieUE16bF1LP8p2C"
"""A well-formed peer address that nobody answers at."""


def test_a_busy_port_is_refused_before_anything_starts(model_dirs):
    """`stamen dht` used to start anyway (libp2p listens with SO_REUSEPORT: two daemons on one port)
    and `stamen api` found out only after joining the swarm."""
    with busy_port() as sock:
        port = str(sock.getsockname()[1])
        for command in (["dht", "--port", port], ["server", model_dirs["llama-gqa"], "--blocks", "0:2", "--port", port],
                        ["api", model_dirs["llama-gqa"], "--initial-peers", UNREACHABLE, "--port", port]):
            line = one_line_error(stamen(*command, timeout=20))
            assert line.endswith(f"127.0.0.1:{port}: the port is in use"), line


def test_generate_with_a_malformed_peer_address_is_one_line(model_dirs):
    line = one_line_error(stamen("generate", model_dirs["llama-gqa"], "--initial-peers", "not-an-address"))
    assert "not-an-address" in line


def test_generate_with_an_unreachable_peer_is_one_line(model_dirs):
    line = one_line_error(stamen("generate", model_dirs["llama-gqa"], "--initial-peers", UNREACHABLE))
    assert "could not join" in line


@pytest.mark.swarm
def test_generate_without_full_coverage_is_one_line(swarm, tmp_path):
    from stamen.testing.models import save_random_llama

    path = save_random_llama(tmp_path / "uncovered", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                          num_attention_heads=2, num_key_value_heads=1))
    line = one_line_error(stamen("generate", str(path), "--initial-peers", *swarm.initial_peers,
                                 "--connect-timeout", "1"))
    assert "no online servers for blocks 0-2" in line


def test_generate_refuses_zero_new_tokens(model_dirs):
    proc = stamen("generate", model_dirs["llama-gqa"], "--initial-peers", UNREACHABLE, "--max-new-tokens", "0")
    assert proc.returncode == 2 and "--max-new-tokens" in proc.stderr
    assert not any(n in proc.stderr for n in NOISE), proc.stderr


LEAKY_CLIENT = """
import asyncio, gc, sys, threading, torch
from stamen import AutoDistributedModelForCausalLM
asyncio.run(asyncio.sleep(0))  # as in any program that ran a coroutine: the main thread has no current loop now
first = AutoDistributedModelForCausalLM.from_pretrained(sys.argv[1], initial_peers=sys.argv[2:])
second = AutoDistributedModelForCausalLM.from_pretrained(sys.argv[1], initial_peers=sys.argv[2:])
print(first.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2).tolist(), flush=True)
print(second.generate(torch.tensor([[1, 2]]), max_new_tokens=2).tolist(), flush=True)
del first  # never shut down: the garbage collector meets it on a thread without an event loop
collector = threading.Thread(target=gc.collect)
collector.start()
collector.join()
# the second model is never shut down either: the interpreter's exit meets it
"""


@pytest.mark.swarm
def test_a_client_that_never_shuts_down_exits_quietly(swarm, model_dirs):
    """Swarms nobody shut down are shut down when collected or at exit, on the client loop, and
    the loop's last tasks are cancelled before it closes: no "There is no current event loop" from
    hivemind's P2P.__del__, no "Task was destroyed but it is pending", nothing left running."""
    proc = run_alone([sys.executable, "-c", LEAKY_CLIENT, model_dirs["llama-gqa"], *swarm.initial_peers], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("[[") == 2
    assert not any(n in proc.stderr for n in NOISE), proc.stderr
