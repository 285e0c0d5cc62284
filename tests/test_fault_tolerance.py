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


def _generate_with_fault(model, prompt, at_step: int, fault):
    class FaultAt:
        def __init__(self):
            self.count = -1

        def put(self, value):
            self.count += 1
            if self.count == at_step:
                fault()

        def end(self):
            pass

    with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS) as session:
        model._fault_session = session
        out = model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=None, streamer=FaultAt())
        return out, session.recoveries


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


def test_sigkill_replaced_by_one_server(ft):
    swarm, servers, model, prompt, expected = ft
    killed = []

    def kill():
        victim = _server_of(swarm, servers, model._fault_session, Span(2, 4))
        swarm.signal_group(victim, signal.SIGKILL)
        killed.append(victim)

    out, recoveries = _generate_with_fault(model, prompt, at_step=int(torch.randint(3, 35, ())), fault=kill)
    assert killed and recoveries >= 1
    assert torch.equal(out, expected)


def test_hung_server_is_detected_by_timeout(ft):
    swarm, servers, model, prompt, expected = ft
    stopped = []

    def stop():
        victim = _server_of(swarm, servers, model._fault_session, Span(2, 4))
        swarm.signal_group(victim, signal.SIGSTOP)
        stopped.append(victim)

    start = time.monotonic()
    out, recoveries = _generate_with_fault(model, prompt, at_step=int(torch.randint(3, 35, ())), fault=stop)
    assert stopped and recoveries >= 1
    assert torch.equal(out, expected)
    assert time.monotonic() - start < 60
    swarm.signal_group(stopped[0], signal.SIGKILL)


class _KillAtStep:
    """A logits processor (called once per generated token, in beam search too) that runs a fault."""

    def __init__(self, at_step: int, fault):
        self.at_step, self.fault, self.count = at_step, fault, 0

    def __call__(self, input_ids, scores):
        self.count += 1
        if self.count == self.at_step:
            self.fault()
        return scores


def _kill_b_in(swarm, servers, session):
    return lambda: swarm.signal_group(_server_of(swarm, servers, session, Span(2, 4)), signal.SIGKILL)


@pytest.mark.parametrize("mode", ["batch", "beam"])
def test_batch_and_beam_sessions_survive_a_kill(ft, mode):
    from transformers import LogitsProcessorList

    swarm, servers, model, prompt, expected = ft
    if mode == "batch":
        ids = torch.cat([prompt, prompt.flip(1)])
        settings = dict(max_new_tokens=16, eos_token_id=None)
        batch = 2
    else:
        ids = prompt
        settings = dict(max_new_tokens=16, eos_token_id=None, num_beams=3, length_penalty=1.0)
        batch = 3
    reference = model.generate(ids, **settings)
    with model.inference_session(max_length=ids.shape[1] + 16, batch_size=batch) as session:
        fault = _KillAtStep(int(torch.randint(3, 14, ())), _kill_b_in(swarm, servers, session))
        got = model.generate(ids, logits_processor=LogitsProcessorList([fault]), **settings)
        assert session.recoveries >= 1
    assert torch.equal(got, reference)


def test_sigkill_replaced_by_two_servers(ft):
    swarm, servers, model, prompt, expected = ft

    def kill():
        swarm.signal_group(_server_of(swarm, servers, model._fault_session, Span(0, 2)), signal.SIGKILL)

    out, recoveries = _generate_with_fault(model, prompt, at_step=int(torch.randint(3, 35, ())), fault=kill)
    assert recoveries >= 1
    assert torch.equal(out, expected)


def test_no_replacement_gives_a_clear_error_in_bounded_time(ft):
    swarm, servers, model, prompt, expected = ft
    last_b = next(s for name, s in servers.items() if name.startswith("B") and s.proc.poll() is None)

    def kill():
        swarm.signal_group(last_b, signal.SIGKILL)

    start = time.monotonic()
    with pytest.raises(SwarmNotReadyError, match="2-3") as info:
        _generate_with_fault(model, prompt, at_step=5, fault=kill)
    assert info.value.missing_blocks == [2, 3]
    assert time.monotonic() - start < 60
