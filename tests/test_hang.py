"""A server hangs (SIGSTOP) mid-generation: the client finds it late on a step by its own usual step
time, not by the request timeout, takes a failed ping as proof, and replays into a replacement;
the tokens do not change, and what the hung server sends once it resumes is ignored.

Own swarm (it stops a server). Model of 4 blocks; servers: A[0:1), B[1:3) (fast, so routes use
it), B'[1:3) (announced slow: the replacement), C[3:4). The hung server is in the middle of the
route, so that it owes a push to C as well as replies to the client.
"""

from __future__ import annotations

import signal
import time

import pytest
import torch
from transformers import LogitsProcessorList

from stamen import AutoDistributedModelForCausalLM
from stamen.testing.models import TRAINED_SPREAD, save_random_llama
from stamen.testing.swarm import LocalSwarm
from stamen.types import Span

pytestmark = pytest.mark.swarm

NEW_TOKENS = 24
REQUEST_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def hang(tmp_path_factory):
    path = save_random_llama(tmp_path_factory.mktemp("hang") / "llama-hang", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        **TRAINED_SPREAD))
    with LocalSwarm(log_dir=tmp_path_factory.mktemp("hang-logs")) as swarm:
        swarm.start_bootstrap()
        fast, slow = ("--torch-threads", "1", "--throughput", "100"), ("--torch-threads", "1", "--throughput", "5")
        swarm.add_server(path, Span(0, 1), *fast)
        victim = swarm.add_server(path, Span(1, 3), *fast)
        swarm.add_server(path, Span(1, 3), *slow)
        swarm.add_server(path, Span(3, 4), *fast)
        swarm.wait_online("llama-hang", 4)
        # the default hang detection; the request timeout, which alone bounded a hang before, is a minute
        model = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers, request_timeout=REQUEST_TIMEOUT, ban_timeout=600)
        try:
            prompt = torch.randint(3, model.block_config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
            expected = model.generate(prompt, max_new_tokens=2 * NEW_TOKENS, eos_token_id=None)
            yield swarm, victim, model, prompt, expected
        finally:
            model.shutdown()


def _is(server, peer_id: str) -> bool:
    """Whether ``peer_id`` is the server's (named with its addresses as it starts)."""
    return any(f"/p2p/{peer_id}" in line for line in server.log_path.read_text().splitlines() if "joining" in line)


class _StopAtStep:
    """A logits processor (once per generated token) that SIGSTOPs the victim's process group at
    step ``at_step`` and records when every token came."""

    def __init__(self, swarm, victim, at_step: int):
        self.swarm, self.victim, self.at_step = swarm, victim, at_step
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.monotonic())
        if len(self.times) == self.at_step:
            self.swarm.signal_group(self.victim, signal.SIGSTOP)
        return scores


def test_hung_server_is_replaced_long_before_the_request_timeout(hang):
    swarm, victim, model, prompt, expected = hang
    with model.inference_session(max_length=prompt.shape[1] + 2 * NEW_TOKENS) as session:
        assert any(h.blocks == Span(1, 3) and _is(victim, h.peer_id) for h in session.route)
        stop = _StopAtStep(swarm, victim, at_step=8)
        try:
            start = time.monotonic()
            out = model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                                 logits_processor=LogitsProcessorList([stop]))
            elapsed = time.monotonic() - start
            assert torch.equal(out, expected[:, : prompt.shape[1] + NEW_TOKENS])
            assert session.recoveries == 1  # replaced once, by the spare
            assert not any(_is(victim, h.peer_id) for h in session.route)
            # bounded by the hang detection (about 1.5 s plus the replay here), not by the request
            # timeout: a generous margin for a loaded machine (timings: `stamen bench failover`)
            stall = max(b - a for a, b in zip(stop.times, stop.times[1:], strict=False))
            assert stall < REQUEST_TIMEOUT / 4, stall
            assert elapsed < REQUEST_TIMEOUT / 2, elapsed
        finally:
            swarm.signal_group(victim, signal.SIGCONT)
        # the resumed server answers the step it hung on and pushes its output to C: both were
        # already done by the replacement and must change nothing
        time.sleep(1.0)
        more = model.generate(out, max_new_tokens=NEW_TOKENS, eos_token_id=None)
        assert torch.equal(more, expected)
        assert session.recoveries == 1


def _peer_id(server) -> str:
    """The server's peer id (named with its addresses as it starts)."""
    for line in server.log_path.read_text().splitlines():
        if "joining" in line and "/p2p/" in line:
            return line.rsplit("/p2p/", 1)[1].split()[0]
    raise AssertionError(f"no peer id in {server.log_path}")


def test_a_spare_that_came_online_after_the_route_was_read_replaces_the_hung_server(hang):
    """The only spare for the hung server's blocks started after the client last read the swarm: the
    hang detection re-reads the view instead of waiting on the hung server until the request timeout."""
    swarm, victim, _, prompt, expected = hang
    path = victim.model
    known_spares = [s for s in swarm.servers if s.span == Span(1, 3) and s is not victim]
    model = AutoDistributedModelForCausalLM.from_pretrained(
        path, initial_peers=swarm.initial_peers, request_timeout=REQUEST_TIMEOUT, ban_timeout=600,
        refresh_period=3600.0, blocked_servers=[_peer_id(s) for s in known_spares])
    try:
        with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS) as session:
            assert any(h.blocks == Span(1, 3) and _is(victim, h.peer_id) for h in session.route)
            late = swarm.add_server(path, Span(1, 3), "--torch-threads", "1", "--throughput", "5")
            swarm.wait_online("llama-hang", 4, [late])
            stop = _StopAtStep(swarm, victim, at_step=4)
            try:
                out = model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                                     logits_processor=LogitsProcessorList([stop]))
                assert torch.equal(out, expected[:, : prompt.shape[1] + NEW_TOKENS])
                assert session.recoveries == 1
                assert [h.peer_id for h in session.route if h.blocks == Span(1, 3)] == [_peer_id(late)]
                stall = max(b - a for a, b in zip(stop.times, stop.times[1:], strict=False))
                assert stall < REQUEST_TIMEOUT / 4, stall
            finally:
                swarm.signal_group(victim, signal.SIGCONT)
    finally:
        model.shutdown()
