"""Servers die or hang mid-generation; the client replays into replacements and the tokens do not change.

A dedicated swarm (its own bootstrap peer) so killing servers does not disturb other tests.
Model of 4 blocks; servers: A[0:2), C1[0:1) + C2[1:2) (together a replacement for A), and three
servers for [2:4): each test below uses one up. Throughput is pinned so the first route is A -> one [2:4) server.
"""

from __future__ import annotations

import signal
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from stamen import AutoDistributedModelForCausalLM
from stamen.errors import SwarmNotReadyError
from stamen.testing.models import save_random_llama
from stamen.testing.swarm import LocalSwarm
from stamen.types import Span

pytestmark = pytest.mark.swarm

NEW_TOKENS = 40


@pytest.fixture(scope="module")
def ft(tmp_path_factory):
    path = save_random_llama(tmp_path_factory.mktemp("ft") / "llama-ft", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2))
    with LocalSwarm(log_dir=tmp_path_factory.mktemp("ft-logs")) as swarm:
        swarm.start_bootstrap()
        common = ("--torch-threads", "1", "--throughput", "100")
        servers = {
            "A": swarm.add_server(path, Span(0, 2), *common),
            # slower, so routes prefer A until it dies
            "C1": swarm.add_server(path, Span(0, 1), "--torch-threads", "1", "--throughput", "5"),
            "C2": swarm.add_server(path, Span(1, 2), "--torch-threads", "1", "--throughput", "5"),
            "B1": swarm.add_server(path, Span(2, 4), *common),
            "B2": swarm.add_server(path, Span(2, 4), *common),
            "B3": swarm.add_server(path, Span(2, 4), *common),
            "B4": swarm.add_server(path, Span(2, 4), *common),
            "B5": swarm.add_server(path, Span(2, 4), *common),
            "B6": swarm.add_server(path, Span(2, 4), *common),
        }
        swarm.wait_online("llama-ft", 4)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers, request_timeout=3, max_retries=3, ban_timeout=600)
        prompt = torch.randint(3, model.block_config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
        expected = model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=None)
        local = AutoModelForCausalLM.from_pretrained(path)
        assert torch.equal(expected, local.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False,
                                                    eos_token_id=None, pad_token_id=0))
        yield swarm, servers, model, prompt, expected
        model.shutdown()


def _server_of(swarm, servers, session, blocks: Span):
    """The process serving ``blocks`` in the session's current route."""
    peer = next(h.peer_id for h in session.route if h.blocks == blocks)
    for proc in servers.values():
        if proc.span == blocks and proc.proc.poll() is None and peer[-6:] in proc.log_path.read_text():
            return proc
    raise LookupError(f"no live process for {peer} {blocks}")


class _FaultAtStep:
    """A logits processor (called once per generated token, in beam search too) that signals, at
    step ``at_step``, the server serving ``blocks`` in the session's route."""

    def __init__(self, swarm, servers, session, blocks: Span, sig: int, at_step: int):
        self.swarm, self.servers, self.session, self.blocks = swarm, servers, session, blocks
        self.sig, self.at_step, self.count, self.victim = sig, at_step, 0, None

    def __call__(self, input_ids, scores):
        self.count += 1
        if self.count == self.at_step:
            self.victim = _server_of(self.swarm, self.servers, self.session, self.blocks)
            self.swarm.signal_group(self.victim, self.sig)
        return scores


def _generate_with_fault(ft, ids, blocks: Span, sig: int, batch: int = 1, **settings):
    """Generate NEW_TOKENS tokens while a server of ``blocks`` gets ``sig`` at a random step."""
    from transformers import LogitsProcessorList

    swarm, servers, model, _, _ = ft
    settings = dict(max_new_tokens=NEW_TOKENS, eos_token_id=None, **settings)
    with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS, batch_size=batch) as session:
        fault = _FaultAtStep(swarm, servers, session, blocks, sig, int(torch.randint(3, NEW_TOKENS - 5, ())))
        out = model.generate(ids, logits_processor=LogitsProcessorList([fault]), **settings)
        assert fault.victim is not None and session.recoveries >= 1
        # steps before the fault went down the push chain, their intermediate outputs held by the
        # servers: the replay fetched them (or took them from the replacement's replay)
        assert session.chained_steps >= 1
        return out, fault.victim


def test_forward_survives_a_dead_server(ft):
    swarm, servers, model, prompt, expected = ft
    ids = expected[:, :20]
    before = model(ids).logits
    live_b = [s for name, s in servers.items() if name.startswith("B") and s.proc.poll() is None]
    victim, other = live_b[0], live_b[1]
    records = model.swarm.servers(refresh=True)
    peer_of = {s.peer_id: next(p for p in servers.values() if s.peer_id[-6:] in p.log_path.read_text())
               for s in records}
    victim_peer = next(p for p, proc in peer_of.items() if proc is victim)
    # forward routes are drawn by throughput: allow only the victim and one other [2:4) server
    model.swarm.config.allowed_servers = [p for p, proc in peer_of.items() if proc.span != Span(2, 4)] + [
        victim_peer, next(p for p, proc in peer_of.items() if proc is other)]
    swarm.signal_group(victim, signal.SIGKILL)
    victim.proc.wait()
    try:
        for _ in range(20):  # the client's view still lists the dead server as online until it is tried
            assert torch.equal(model(ids).logits, before)
            if victim_peer in model.swarm._banned_until:
                break
        assert victim_peer in model.swarm._banned_until  # it was tried, failed, banned and routed around
    finally:
        model.swarm.config.allowed_servers = None


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_failed_server_replaced_by_one_server(ft, sig):
    """SIGKILL: the connection drops; SIGSTOP: the server stops answering and is caught by timeout."""
    _, _, _, prompt, expected = ft
    start = time.monotonic()
    out, victim = _generate_with_fault(ft, prompt, Span(2, 4), sig)
    assert torch.equal(out, expected)
    assert time.monotonic() - start < 60
    ft[0].signal_group(victim, signal.SIGKILL)  # a stopped server is reaped now


@pytest.mark.parametrize("mode", ["batch", "beam"])
def test_batch_and_beam_sessions_survive_a_kill(ft, mode):
    _, _, model, prompt, _ = ft
    if mode == "batch":
        ids, batch, settings = torch.cat([prompt, prompt.flip(1)]), 2, {}
    else:
        ids, batch, settings = prompt, 3, dict(num_beams=3, length_penalty=1.0)
    reference = model.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=None, **settings)
    got, _ = _generate_with_fault(ft, ids, Span(2, 4), signal.SIGKILL, batch=batch, **settings)
    assert torch.equal(got, reference)


def test_sigkill_replaced_by_two_servers(ft):
    _, _, _, prompt, expected = ft
    out, _ = _generate_with_fault(ft, prompt, Span(0, 2), signal.SIGKILL)  # only C1 + C2 cover [0:2) now
    assert torch.equal(out, expected)


def test_no_replacement_gives_a_clear_error_in_bounded_time(ft):
    _, servers, _, prompt, _ = ft
    assert sum(s.span == Span(2, 4) and s.proc.poll() is None for s in servers.values()) == 1  # the last one
    start = time.monotonic()
    with pytest.raises(SwarmNotReadyError, match="2-3") as info:
        _generate_with_fault(ft, prompt, Span(2, 4), signal.SIGKILL)
    assert info.value.missing_blocks == [2, 3]
    assert time.monotonic() - start < 60
