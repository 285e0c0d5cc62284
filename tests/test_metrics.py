"""Prometheus metrics (stamen/server/metrics.py): exposition text that prometheus_client's parser reads."""

from __future__ import annotations

import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from stamen.server.metrics import ServerMetrics


class _Budget:
    tokens_left, used, num_blocks = 900, 200, 2


class _Backend:
    sessions = {"a": None, "b": None}
    budget = _Budget()
    train_graphs_held = 1


def _samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_are_served_and_parse():
    metrics = ServerMetrics("peer-x")
    metrics.watch(_Backend())
    metrics.set_state("online", 0, 4, "float32")
    metrics.served("decode", 1, 0.004)
    metrics.served("decode", 1, 0.006)
    metrics.served("forward", 128, 0.3)
    metrics.refused("server_full")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    metrics.serve(port)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = _samples(text)
    assert samples[("stamen_steps_total", (("kind", "decode"),))] == 2
    assert samples[("stamen_tokens_total", (("kind", "forward"),))] == 128
    assert samples[("stamen_step_seconds_count", (("kind", "decode"),))] == 2
    assert samples[("stamen_step_seconds_bucket", (("kind", "decode"), ("le", "0.005")))] == 1
    assert samples[("stamen_refusals_total", (("code", "server_full"),))] == 1
    assert samples[("stamen_open_sessions", ())] == 2
    assert samples[("stamen_cache_tokens_free", ())] == 900 and samples[("stamen_cache_tokens_used", ())] == 100
    infos = [dict(labels) for name, labels in samples if name == "stamen_server_info"]
    assert infos == [dict(peer_id="peer-x", start="0", end="4", dtype="float32", state="online")]
