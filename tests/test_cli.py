"""The CLI as a user runs it: dht, server lifecycle (withdraw on SIGTERM), generate streaming."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from stamen.dht.records import ServerState, fetch_servers
from stamen.types import Span

pytestmark = pytest.mark.swarm


def test_generate_command_streams_the_greedy_text(swarm, model_dirs):
    path = model_dirs["llama-gqa"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path)
    ids = tokenizer("The swarm", return_tensors="pt")["input_ids"]
    expected_ids = ref.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = tokenizer.decode(expected_ids[0, ids.shape[1]:], skip_special_tokens=True)
    proc = subprocess.run(
        [sys.executable, "-m", "stamen", "generate", path, "--initial-peers", *swarm.initial_peers,
         "--prompt", "The swarm", "--max-new-tokens", "12", "--no-eos"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected.strip()
    assert "route:" in proc.stderr and "ms/token" in proc.stderr


def test_server_withdraws_on_sigterm(swarm, model_dirs):
    path = model_dirs["llama-gqa"]
    extra = swarm.add_server(path, Span(1, 3), "--torch-threads", "1")
    swarm.wait_online("llama-gqa", 6, [extra])
    peers_before = fetch_servers(swarm.client_dht(), "llama-gqa", 6)
    assert any(r.span == Span(1, 3) and r.state == ServerState.ONLINE for r in peers_before.values())
    assert swarm.stop_server(extra, signal.SIGTERM) == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        records = fetch_servers(swarm.client_dht(), "llama-gqa", 6)
        if all(not (r.span == Span(1, 3) and r.state == ServerState.ONLINE) for r in records.values()):
            break
        time.sleep(0.3)
    else:
        pytest.fail("the server still looks online after SIGTERM")
    assert "leaving" in extra.log_path.read_text()


def test_server_refuses_bad_blocks_option(model_dirs):
    proc = subprocess.run([sys.executable, "-m", "stamen", "server", model_dirs["llama-gqa"], "--blocks", "4:2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "START:END" in proc.stderr or "start < end" in proc.stderr


def test_client_waits_then_fails_with_missing_blocks(swarm, tmp_path):
    from stamen import AutoDistributedModelForCausalLM
    from stamen.errors import SwarmNotReadyError
    from stamen.testing.models import save_random_llama

    path = save_random_llama(tmp_path / "orphan", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                       num_attention_heads=2, num_key_value_heads=1))
    start = time.monotonic()
    with pytest.raises(SwarmNotReadyError, match="0-2") as info:
        AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, connect_timeout=2)
    assert info.value.missing_blocks == [0, 1, 2]
    assert time.monotonic() - start < 30


def test_blocked_servers_are_never_used(swarm, model_dirs):
    from stamen import AutoDistributedModelForCausalLM
    from stamen.errors import SwarmNotReadyError

    path = model_dirs["llama-gqa"]
    records = fetch_servers(swarm.client_dht(), "llama-gqa", 6)
    first = [p for p, r in records.items() if r.span == Span(0, 2) and r.state == ServerState.ONLINE]
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                            wait_for_servers=False, blocked_servers=first)
    try:
        with pytest.raises(SwarmNotReadyError, match="0-1"):
            model.swarm.route()
        allowed = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                  allowed_servers=list(records))
        try:
            assert {h.peer_id for h in allowed.swarm.route()} <= set(records)
        finally:
            allowed.shutdown()
    finally:
        model.shutdown()


def test_health_command_reports_servers_and_coverage(swarm, model_dirs):
    import json

    proc = subprocess.run(
        [sys.executable, "-m", "stamen", "health", model_dirs["qwen2-bias"], "--initial-peers", *swarm.initial_peers,
         "--json"], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["num_blocks"] == 4 and report["uncovered_blocks"] == []
    online = [s for s in report["servers"] if s["state"] == "online"]
    assert sorted((s["start"], s["end"]) for s in online) == [(0, 3), (3, 4)]
    assert report["block_servers"] == [1, 1, 1, 1] and report["bottleneck_throughput"] > 0
    text = subprocess.run(
        [sys.executable, "-m", "stamen", "health", model_dirs["qwen2-bias"], "--initial-peers", *swarm.initial_peers],
        capture_output=True, text=True, timeout=120,
    ).stdout
    assert "uncovered blocks: none" in text and "[0:3)" in text
