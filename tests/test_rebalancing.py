"""Servers started without --blocks place themselves, and one moves to cover a gap while a client generates.

Real processes on 127.0.0.1. A 4-block model; every server's memory (--max-memory) holds 2 blocks.
A (throughput pinned at 10) takes [0:2) in the empty swarm, B (10) the uncovered [2:4), and C
(throughput measured: compute cached, bandwidth against A and B) the leftmost of the equally weak
windows, [0:2). A and B check for moves only hourly, C every second, so the mover is known. The
client is kept off A, so its route is C[0:2) -> B[2:4). B leaves mid-generation; C loads [2:4),
announces it, finishes the client's open session on [0:2), and the client replays B's history into
C's new span: the tokens do not change.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessorList

from stamen import AutoDistributedModelForCausalLM
from stamen.dht.records import ServerState
from stamen.models import BlockConfig, KVCache, load_config
from stamen.server.memory import block_bytes
from stamen.testing.models import save_random_llama
from stamen.testing.swarm import LocalSwarm
from stamen.types import Span

pytestmark = pytest.mark.swarm

NAME, BLOCKS, CACHE_TOKENS, NEW_TOKENS = "llama-auto", 4, 1024, 24


def _memory_for(path, blocks: float, margin: float = 0.1) -> str:
    """--max-memory that fits ``blocks`` blocks (weights + KV cache budget) after the safety margin."""
    config = BlockConfig.from_hf(load_config(path))
    per_block = block_bytes(config, torch.float32) + KVCache.nbytes_per_token(config, 1, torch.float32) * CACHE_TOKENS
    return str(int(blocks * per_block / (1 - margin)))


def _peer_of(records, log_text: str) -> str:
    return next(p for p in records if p[-6:] in log_text)


def _online_at(span: Span, peer: str | None = None):
    def condition(records):
        return [p for p, r in records.items() if r.state == ServerState.ONLINE and r.span == span
                and r.moving_to is None and (peer is None or p == peer)]
    return condition


def _log_has(server, pattern: str):
    return lambda _records: re.search(pattern, server.log_path.read_text())


class _LeaveAtStep:
    """A logits processor that, at step ``at``, stops B and waits until C has moved into B's blocks."""

    def __init__(self, swarm, leaver, mover, mover_peer: str, at: int):
        self.swarm, self.leaver, self.mover, self.mover_peer = swarm, leaver, mover, mover_peer
        self.at, self.count = at, 0

    def __call__(self, input_ids, scores):
        self.count += 1
        if self.count == self.at:
            assert self.swarm.stop_server(self.leaver) == 0  # SIGTERM: it announces offline and exits
            self.swarm.wait_for(NAME, BLOCKS, _online_at(Span(2, 4), self.mover_peer),
                                "C moved to [2:4)", timeout=60, servers=[self.mover])
        return scores


def test_servers_place_themselves_and_cover_a_leavers_gap(tmp_path_factory):
    path = save_random_llama(tmp_path_factory.mktemp("auto") / NAME, dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=BLOCKS, num_attention_heads=4, num_key_value_heads=2))
    cache_file = tmp_path_factory.mktemp("cache") / "throughput.json"
    common = ("--torch-threads", "1", "--max-memory", _memory_for(path, 2.5), "--max-cache-tokens", str(CACHE_TOKENS),
              "--move-jitter", "0.5", "--throughput-cache", str(cache_file))
    with LocalSwarm(log_dir=tmp_path_factory.mktemp("auto-logs")) as swarm:
        swarm.start_bootstrap()
        a = swarm.add_auto_server(path, *common, "--throughput", "10", "--balance-period", "3600")
        swarm.wait_for(NAME, BLOCKS, _online_at(Span(0, 2)), "A online at [0:2)")
        b = swarm.add_auto_server(path, *common, "--throughput", "10", "--balance-period", "3600")
        swarm.wait_for(NAME, BLOCKS, _online_at(Span(2, 4)), "B online at [2:4)")
        c = swarm.add_auto_server(path, *common, "--balance-period", "1")
        records = swarm.wait_for(NAME, BLOCKS, lambda r: len(_online_at(Span(0, 2))(r)) == 2 and r,
                                 "C online at [0:2) beside A")
        peer_a, peer_c = _peer_of(records, a.log_path.read_text()), _peer_of(records, c.log_path.read_text())
        assert "hosting 2 blocks" in c.log_path.read_text()  # decided from --max-memory
        measured = records[peer_c]
        assert measured.forward_throughput > 0 and measured.network_bandwidth > 0  # against A and B
        assert measured.throughput > 0 and len(json.loads(cache_file.read_text())) == 1

        model = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers, blocked_servers=[peer_a], request_timeout=20, max_retries=5)
        try:
            prompt = torch.randint(3, model.block_config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
            expected = AutoModelForCausalLM.from_pretrained(path).generate(
                prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
            with model.inference_session(max_length=8 + NEW_TOKENS) as session:
                assert [(h.peer_id, h.blocks) for h in session.route][0] == (peer_c, Span(0, 2))
                leave = _LeaveAtStep(swarm, b, c, peer_c, at=6)
                out = model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                                     logits_processor=LogitsProcessorList([leave]))
                assert session.recoveries >= 1
                assert [h.blocks for h in session.route if h.peer_id == peer_c] == [Span(0, 2), Span(2, 4)]
            assert torch.equal(out, expected)
        finally:
            model.shutdown()
        assert c.proc.poll() is None  # the same process moved
        assert "dial to self" not in c.log_path.read_text()  # C[0:2) pushes into C[2:4) in-process
        swarm.wait_for(NAME, BLOCKS, _log_has(c, r"dropped the old blocks \[0:2\) \(their sessions finished\)"),
                       "C dropped [0:2) once the client's session closed", timeout=30, servers=[a, c])
        final = swarm.wait_for(NAME, BLOCKS, _online_at(Span(2, 4), peer_c), "C serves [2:4)", servers=[a, c])
        assert final and _online_at(Span(0, 2), peer_a)(swarm.wait_for(NAME, BLOCKS, lambda r: r, "records"))
