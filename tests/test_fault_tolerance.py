"""Servers die or hang mid-generation; the client replays into replacements and the tokens do not change.

A dedicated swarm (its own bootstrap peer) so killing servers does not disturb other tests.
Model of 4 blocks; servers: A[0:2), C1[0:1) + C2[1:2) (together a replacement for A), and six
servers for [2:4). Throughput is pinned so the first route is A -> one [2:4) server. Each test kills
servers at a fixed step and first makes sure the servers it needs are alive (``_ensure`` starts
them if earlier tests used them up), so every test passes alone and in any order.

A run with a fault is compared with a failure-free run of the same inputs: tokens, every step's
logits, and every hop's history (the hidden states the client sent each span, step by step), so a
replay that lost, duplicated or reordered a step fails even where the tokens would not show it.
"""

from __future__ import annotations

import itertools
import re
import signal
import time
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessorList

from stamen import AutoDistributedModelForCausalLM
from stamen.errors import SwarmNotReadyError
from stamen.testing.models import TRAINED_SPREAD, save_random_llama
from stamen.testing.scores import ScoreRecorder
from stamen.testing.swarm import LocalSwarm
from stamen.types import Span

pytestmark = pytest.mark.swarm

NEW_TOKENS = 40
COMMON = ("--torch-threads", "1", "--throughput", "100")
SLOW = ("--torch-threads", "1", "--throughput", "5")  # C1, C2: routes prefer A until it dies


@dataclass
class FT:
    swarm: LocalSwarm
    path: str
    servers: dict
    model: AutoDistributedModelForCausalLM
    prompt: torch.Tensor
    expected: Run


@dataclass
class Run:
    tokens: torch.Tensor
    logits: torch.Tensor
    """(B, steps, vocab): what the logits processors got at every step."""
    histories: dict[Span, list[torch.Tensor]]
    """Per hop of the final route: the hidden states it was sent, one entry per step."""
    recoveries: int
    chained_steps: int

    def assert_same_as(self, other: Run) -> None:
        assert torch.equal(self.tokens, other.tokens)
        torch.testing.assert_close(self.logits, other.logits, rtol=0, atol=1e-5)
        common = self.histories.keys() & other.histories.keys()
        assert Span(2, 4) in common
        for blocks in common:
            mine, theirs = self.histories[blocks], other.histories[blocks]
            assert len(mine) == len(theirs) == NEW_TOKENS  # the prompt's step and 39 decoding steps
            for a, b in zip(mine, theirs, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def _run(ft: FT, ids: torch.Tensor, batch: int = 1, fault: _FaultAtStep | None = None, **settings) -> Run:
    scores = ScoreRecorder()
    processors = LogitsProcessorList([scores] + ([fault] if fault is not None else []))
    with ft.model.inference_session(max_length=ids.shape[1] + NEW_TOKENS, batch_size=batch) as session:
        if fault is not None:
            fault.session = session
        out = ft.model.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=None, logits_processor=processors,
                                **settings)
        session.settle()
        histories = {live.hop.blocks: list(live.history) for live in session._hops}
        return Run(out, torch.stack(scores.seen, 1), histories, session.recoveries, session.chained_steps)


@pytest.fixture(scope="module")
def ft(tmp_path_factory):
    path = str(save_random_llama(tmp_path_factory.mktemp("ft") / "llama-ft", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        **TRAINED_SPREAD)))
    with LocalSwarm(log_dir=tmp_path_factory.mktemp("ft-logs")) as swarm:
        swarm.start_bootstrap()
        servers = {
            "A": swarm.add_server(path, Span(0, 2), *COMMON),
            "C1": swarm.add_server(path, Span(0, 1), *SLOW),
            "C2": swarm.add_server(path, Span(1, 2), *SLOW),
            **{f"B{i}": swarm.add_server(path, Span(2, 4), *COMMON) for i in range(1, 7)},
        }
        swarm.wait_online("llama-ft", 4)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            # a hung server is caught by this timeout: short, yet far above a step on a loaded machine
            path, initial_peers=swarm.initial_peers, request_timeout=10, max_retries=3, ban_timeout=600)
        try:
            prompt = torch.randint(3, model.block_config.vocab_size, (1, 8),
                                   generator=torch.Generator().manual_seed(0))
            state = FT(swarm, path, servers, model, prompt, None)  # type: ignore[arg-type]
            state.expected = _run(state, prompt)
            assert state.expected.recoveries == 0 and state.expected.chained_steps >= 1
            local = AutoModelForCausalLM.from_pretrained(path).generate(
                prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                output_logits=True, return_dict_in_generate=True)
            assert torch.equal(state.expected.tokens, local.sequences)
            assert (state.expected.logits - torch.stack(local.logits, 1)).abs().max() <= 1e-4
            yield state
        finally:
            model.shutdown()


_spares = itertools.count(1)


def _live(ft: FT, span: Span) -> list:
    return [s for s in ft.servers.values() if s.span == span and s.proc.poll() is None]


def _ensure(ft: FT, span: Span, count: int) -> None:
    """At least ``count`` live servers of ``span`` (started like the fixture's if earlier tests
    killed them), online and in the client's view."""
    missing = count - len(_live(ft, span))
    if missing <= 0:
        return
    new = [ft.swarm.add_server(ft.path, span, *COMMON) for _ in range(missing)]
    for server in new:
        ft.servers[f"spare{next(_spares)}"] = server
    ft.swarm.wait_online("llama-ft", 4, servers=new)
    deadline = time.monotonic() + 60
    while not all(server in _peers(ft).values() for server in new):  # the client's own view of the DHT
        assert time.monotonic() < deadline, "the client does not see the new servers"
        time.sleep(0.5)


def _own_peer(proc) -> str | None:
    """A server's peer id: it logs its own address when it starts (its log may name other servers)."""
    match = re.search(r"visible at \S*/p2p/(\w+)", proc.log_path.read_text())
    return match.group(1) if match else None


def _peers(ft: FT) -> dict[str, object]:
    """Peer id -> process, for the live servers the client sees."""
    live = {_own_peer(proc): proc for proc in ft.servers.values() if proc.proc.poll() is None}
    return {r.peer_id: live[r.peer_id] for r in ft.model.swarm.servers(refresh=True) if r.peer_id in live}


def _server_of(swarm, servers, session, blocks: Span):
    """The process serving ``blocks`` in the session's current route."""
    peer = next(h.peer_id for h in session.route if h.blocks == blocks)
    for proc in servers.values():
        if proc.span == blocks and proc.proc.poll() is None and _own_peer(proc) == peer:
            return proc
    raise LookupError(f"no live process for {peer} {blocks}")


class _FaultAtStep:
    """A logits processor (called once per generated token, in beam search too) that signals, at
    step ``at_step``, the server serving ``blocks`` in the session's route (``session`` is set by
    ``_run``)."""

    def __init__(self, ft: FT, blocks: Span, sig: int, at_step: int):
        self.ft, self.blocks, self.session = ft, blocks, None
        self.sig, self.at_step, self.count, self.victim, self.steps_at_fault = sig, at_step, 0, None, None

    def __call__(self, input_ids, scores):
        self.count += 1
        if self.count == self.at_step:
            self.victim = _server_of(self.ft.swarm, self.ft.servers, self.session, self.blocks)
            self.steps_at_fault = len(self.session._steps)
            self.ft.swarm.signal_group(self.victim, self.sig)
        return scores


def _generate_with_fault(ft: FT, ids, blocks: Span, sig: int, at_step: int, batch: int = 1, **settings):
    """Generate NEW_TOKENS tokens while a server of ``blocks`` gets ``sig`` at step ``at_step``."""
    fault = _FaultAtStep(ft, blocks, sig, at_step)
    try:
        run = _run(ft, ids, batch, fault, **settings)
    finally:
        if fault.victim is not None and sig != signal.SIGKILL:
            ft.swarm.signal_group(fault.victim, signal.SIGKILL)  # a stopped server is reaped now
        if fault.victim is not None:
            fault.victim.proc.wait(30)
    # the fault landed mid-generation and the session replayed the dead hop's history
    assert fault.steps_at_fault is not None and fault.steps_at_fault < NEW_TOKENS
    assert run.recoveries >= 1
    # steps before the fault went down the push chain, their intermediate outputs held by the
    # servers: the replay fetched them (or took them from the replacement's replay)
    assert run.chained_steps >= 1
    return run, fault.victim


def test_forward_survives_a_dead_server(ft):
    swarm, model = ft.swarm, ft.model
    _ensure(ft, Span(2, 4), 2)
    ids = ft.expected.tokens[:, :20]
    before = model(ids).logits
    peer_of = _peers(ft)
    victim, other = [proc for proc in peer_of.values() if proc.span == Span(2, 4)][:2]
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


@pytest.mark.parametrize("sig, at_step", [(signal.SIGKILL, 12), (signal.SIGSTOP, 21)], ids=["killed", "hung"])
def test_failed_server_replaced_by_one_server(ft, sig, at_step):
    """SIGKILL: the connection drops; SIGSTOP: the server stops answering and is caught by timeout."""
    _ensure(ft, Span(2, 4), 2)
    start = time.monotonic()
    run, _ = _generate_with_fault(ft, ft.prompt, Span(2, 4), sig, at_step)
    run.assert_same_as(ft.expected)
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("mode, at_step", [("batch", 9), ("beam", 17)])
def test_batch_and_beam_sessions_survive_a_kill(ft, mode, at_step):
    _ensure(ft, Span(2, 4), 2)
    if mode == "batch":
        ids, batch, settings = torch.cat([ft.prompt, ft.prompt.flip(1)]), 2, {}
    else:
        ids, batch, settings = ft.prompt, 3, dict(num_beams=3, length_penalty=1.0)
    reference = _run(ft, ids, batch, **settings)
    got, _ = _generate_with_fault(ft, ids, Span(2, 4), signal.SIGKILL, at_step, batch=batch, **settings)
    got.assert_same_as(reference)


def test_sigkill_replaced_by_two_servers(ft):
    _ensure(ft, Span(0, 2), 1)
    _ensure(ft, Span(2, 4), 1)
    assert len(_live(ft, Span(0, 2))) == 1  # once it dies, only C1 + C2 cover [0:2)
    run, _ = _generate_with_fault(ft, ft.prompt, Span(0, 2), signal.SIGKILL, 25)
    assert Span(0, 1) in run.histories and Span(1, 2) in run.histories
    run.assert_same_as(ft.expected)


def test_no_replacement_gives_a_clear_error_in_bounded_time(ft):
    """The client may use one [2:4) server only; it dies mid-generation: a typed error naming the
    blocks, in bounded time, never a hang."""
    _ensure(ft, Span(2, 4), 1)
    peer_of = _peers(ft)
    last = next(p for p, proc in peer_of.items() if proc.span == Span(2, 4))
    ft.model.swarm.config.allowed_servers = [p for p, proc in peer_of.items() if proc.span != Span(2, 4)] + [last]
    start = time.monotonic()
    try:
        with pytest.raises(SwarmNotReadyError, match="2-3") as info:
            _generate_with_fault(ft, ft.prompt, Span(2, 4), signal.SIGKILL, 6)
    finally:
        ft.model.swarm.config.allowed_servers = None
    assert info.value.missing_blocks == [2, 3]
    assert time.monotonic() - start < 60
