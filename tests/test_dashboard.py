"""`stamen dashboard`: a live page of the swarm, opened in headless Chromium, and its JSON, which
is what `stamen health --json` prints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from stamen.testing.swarm import LocalSwarm
from stamen.types import Span

pytestmark = pytest.mark.swarm

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4)


def _chromium() -> str:
    """Debian's chromium, installed when missing (as root, from the package registry); else skip."""
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
            done = subprocess.run(cmd, capture_output=True, env=env, timeout=600)
            if done.returncode != 0:
                break
        if path := shutil.which("chromium"):
            return path
    pytest.skip("headless Chromium is not installed and cannot be installed here (needs root and apt-get)")


def _start(swarm: LocalSwarm, cmd: list[str]) -> subprocess.Popen:
    """A process that runs beside the others (``_finish`` it), stopped with the swarm if a test fails first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=swarm.env,
                            start_new_session=True)
    swarm.apis.append(proc)
    return proc


def _browse(swarm: LocalSwarm, chromium: str, url: str, profile: Path, *extra: str) -> subprocess.Popen:
    """Chromium rendering the page (a profile of its own: two may run at once); its stdout is the
    DOM after the scripts ran with ``--dump-dom`` (virtual time lets the first fetches and redraw finish)."""
    return _start(swarm, [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--window-size=1200,900",
                          *extra, url])


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


def _health_cli(swarm: LocalSwarm, model: str) -> subprocess.Popen:
    """``stamen health --json``, started: it runs beside the dashboard and Chromium."""
    return _start(swarm, [sys.executable, "-m", "stamen", "health", model, "--initial-peers", *swarm.initial_peers,
                          "--json"])


def _finish(proc: subprocess.Popen, check: bool = False) -> str:
    """The process's stdout once it exited (killed past 120 s)."""
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert not check or proc.returncode == 0, f"{proc.args[:5]} exited with {proc.returncode}:\n{err[-3000:]}"
    return out


def _view(health: dict) -> dict:
    """What both must agree on (ping times and record ages differ from one reading to the next)."""
    return dict(servers=sorted((s["peer_id"], s["start"], s["end"], s["state"], s["live"]) for s in health["servers"]),
                uncovered=health["uncovered_blocks"], block_servers=health["block_servers"])


def _wait(condition, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.2)
    raise TimeoutError(what)


def test_the_dashboard_shows_servers_spans_and_a_hole_and_agrees_with_health(tmp_path):
    from stamen.testing.models import save_random_llama

    chromium = _chromium()
    model = str(save_random_llama(tmp_path / "dash-llama", TINY, seed=5))
    with LocalSwarm(log_dir=tmp_path / "logs") as swarm:
        swarm.start_bootstrap()
        first = swarm.add_server(model, Span(0, 2), "--torch-threads", "1")
        second = swarm.add_server(model, Span(2, 4), "--torch-threads", "1")
        swarm.wait_online("dash-llama", 4)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        log = open(tmp_path / "dashboard.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "stamen", "dashboard", model, "--initial-peers",
                                 *swarm.initial_peers, "--port", str(port), "--period", "1"],
                                stdout=log, stderr=subprocess.STDOUT, env=swarm.env, start_new_session=True)
        swarm.apis.append(proc)  # stopped with the swarm
        url = f"http://127.0.0.1:{port}/"

        def live_servers(n):
            def check():
                try:
                    health = _get(url + "api/health")
                except OSError:
                    assert proc.poll() is None, (tmp_path / "dashboard.log").read_text()
                    return None
                return health if sum(s["live"] for s in health["servers"]) == n else None
            return check

        # the CLI starts with the dashboard (once every server is online): both read the same swarm
        cli = _health_cli(swarm, model)
        health = _wait(live_servers(2), "the dashboard never saw both servers live")
        page = _finish(_browse(swarm, chromium, url, tmp_path / "profile0", "--dump-dom"))
        for s in health["servers"]:
            assert s["peer_id"] in page and f"[{s['start']}:{s['end']})" in page
        assert '<b id="uncovered" class="">none</b>' in page
        assert _view(json.loads(_finish(cli, check=True))) == _view(_get(url + "api/health"))

        killed = next(s for s in health["servers"] if (s["start"], s["end"]) == (2, 4))["peer_id"]
        os.killpg(second.proc.pid, signal.SIGKILL)
        second.proc.wait()
        cli = _health_cli(swarm, model)  # started after the kill: it finds the server gone
        health = _wait(lambda: (h := _get(url + "api/health"))["uncovered_blocks"] and h, "no hole was shown")
        assert health["uncovered_blocks"] == [2, 3] and killed in health["unreachable"]
        shot = tmp_path / "dashboard.png"
        dom = _browse(swarm, chromium, url, tmp_path / "profile1", "--dump-dom")
        screenshot = _browse(swarm, chromium, url, tmp_path / "profile2", f"--screenshot={shot}")
        page = _finish(dom)
        assert '<b id="uncovered" class="bad">2, 3</b>' in page
        assert killed in page and "not answering" in page
        assert _view(json.loads(_finish(cli, check=True))) == _view(_get(url + "api/health"))
        history = _get(url + "api/history")["samples"]
        assert history[0]["covered"] == 1.0 and history[-1]["covered"] == 0.5

        _finish(screenshot)
        assert shot.stat().st_size > 10_000
        if os.environ.get("STAMEN_UPDATE_SCREENSHOTS"):  # the README's picture
            shutil.copy(shot, Path(__file__).resolve().parent.parent / "docs" / "img" / "dashboard.png")
        assert first.proc.poll() is None
