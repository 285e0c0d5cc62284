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


def _browse(chromium: str, url: str, *extra: str) -> str:
    """The page's DOM after its scripts ran (virtual time lets the first fetches and redraw finish)."""
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--virtual-time-budget=5000", "--window-size=1200,900", *extra, url],
                          capture_output=True, text=True, timeout=120)
    return done.stdout


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


def _health_cli(model: str, peers: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "stamen", "health", model, "--initial-peers", *peers, "--json"],
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def _view(health: dict) -> dict:
    """What both must agree on (ping times and record ages differ from one reading to the next)."""
    return dict(servers=sorted((s["peer_id"], s["start"], s["end"], s["state"], s["live"]) for s in health["servers"]),
                uncovered=health["uncovered_blocks"], block_servers=health["block_servers"])


def _wait(condition, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.5)
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

        health = _wait(live_servers(2), "the dashboard never saw both servers live")
        assert _view(_health_cli(model, swarm.initial_peers)) == _view(_get(url + "api/health"))
        page = _browse(chromium, url, "--dump-dom")
        for s in health["servers"]:
            assert s["peer_id"] in page and f"[{s['start']}:{s['end']})" in page
        assert '<b id="uncovered" class="">none</b>' in page

        killed = next(s for s in health["servers"] if (s["start"], s["end"]) == (2, 4))["peer_id"]
        os.killpg(second.proc.pid, signal.SIGKILL)
        second.proc.wait()
        health = _wait(lambda: (h := _get(url + "api/health"))["uncovered_blocks"] and h, "no hole was shown")
        assert health["uncovered_blocks"] == [2, 3] and killed in health["unreachable"]
        page = _browse(chromium, url, "--dump-dom")
        assert '<b id="uncovered" class="bad">2, 3</b>' in page
        assert killed in page and "not answering" in page
        assert _view(_health_cli(model, swarm.initial_peers)) == _view(_get(url + "api/health"))
        history = _get(url + "api/history")["samples"]
        assert history[0]["covered"] == 1.0 and history[-1]["covered"] == 0.5

        shot = tmp_path / "dashboard.png"
        _browse(chromium, url, f"--screenshot={shot}")
        assert shot.stat().st_size > 10_000
        if os.environ.get("STAMEN_UPDATE_SCREENSHOTS"):  # the README's picture
            shutil.copy(shot, Path(__file__).resolve().parent.parent / "docs" / "img" / "dashboard.png")
        assert first.proc.poll() is None
