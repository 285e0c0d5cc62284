"""Prometheus metrics of a real server (``stamen server --metrics-port``): exposition text that
prometheus_client's parser reads, with counters that rise after a generation."""

from __future__ import annotations

import socket
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from stamen.testing.swarm import LocalSwarm
from stamen.types import Span

pytestmark = pytest.mark.swarm

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)


def _scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_servers_metrics_parse_and_rise_after_a_generation(tmp_path):
    from stamen import AutoDistributedModelForCausalLM
    from stamen.testing.models import save_random_llama

    model_dir = str(save_random_llama(tmp_path / "metrics-llama", TINY, seed=7))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with LocalSwarm(log_dir=tmp_path / "logs") as swarm:
        swarm.start_bootstrap()
        swarm.add_server(model_dir, Span(0, 2), "--torch-threads", "1", "--metrics-port", str(port))
        swarm.wait_online("metrics-llama", 2)
        before = _scrape(port)
        info = [dict(labels) for name, labels in before if name == "stamen_server_info"]
        assert info and info[0]["state"] == "online" and (info[0]["start"], info[0]["end"]) == ("0", "2")
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers)
        try:
            ids = torch.tensor([[1, 5, 9, 3]])
            with model.inference_session(max_length=16):
                model.generate(ids, max_new_tokens=6, do_sample=False)
                during = _scrape(port)
            model(ids)  # a stateless forward
        finally:
            model.shutdown()
        after = _scrape(port)

    def value(samples, name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value(after, "stamen_steps_total", kind="prefill") + value(after, "stamen_steps_total", kind="decode") \
        >= 6 > value(before, "stamen_steps_total", kind="decode")
    assert value(after, "stamen_tokens_total", kind="forward") == 4
    assert value(after, "stamen_step_seconds_count", kind="decode") == value(after, "stamen_steps_total", kind="decode")
    assert value(during, "stamen_open_sessions") == 1 and value(after, "stamen_open_sessions") == 0
    assert value(during, "stamen_cache_tokens_used") == 16 and value(after, "stamen_cache_tokens_used") == 0
    assert value(after, "stamen_bytes_received_total") > value(before, "stamen_bytes_received_total")
