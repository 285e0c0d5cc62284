"""The step batcher in-process (``server/batching.py``): what an iteration takes, bursts, fairness."""

from __future__ import annotations

import asyncio

import pytest
import torch

from stamen.models import BlockConfig, load_config, load_span, open_checkpoint
from stamen.rpc.inputs import SpanInputs
from stamen.server.backend import SpanBackend
from stamen.server.batching import BURST_WAIT_S
from stamen.testing.models import TRAINED_SPREAD, save_random_llama
from stamen.types import Span
from stamen.wire.messages import Burst, OpenSession, SpanRef, Step

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=97, **TRAINED_SPREAD)


@pytest.fixture(scope="module")
def span_model(tmp_path_factory):
    path = save_random_llama(tmp_path_factory.mktemp("batcher"), TINY, with_tokenizer=False)
    config = BlockConfig.from_hf(load_config(path))
    return load_span(open_checkpoint(path), config, Span(0, 2), torch.float32, progress=False)


class _Replies:
    def put_nowait(self, response) -> None:
        pass


def _backend(model) -> SpanBackend:
    return SpanBackend(model, torch.float32, torch.device("cpu"), 4096, 4096, inline_compute=True, batching=True,
                       max_batch_tokens=64)


def _open(backend, name: str, owner: str):
    msg = OpenSession(session_id=name, blocks=SpanRef.of(Span(0, 2)), max_length=64, batch_size=1)
    return backend.open(msg, _Replies(), owner=owner)


def _step(backend, session, step_id: int, burst: Burst | None = None, sender: str = "client"):
    msg = Step(session_id=session.id, step_id=step_id, position=session.cache.length, burst=burst)
    return backend.step(session, msg, SpanInputs(torch.randn(1, 1, 64)), sender=sender)


def test_the_members_of_a_burst_share_one_iteration(span_model):
    async def run():
        backend = _backend(span_model)
        sessions = [_open(backend, f"s{i}", "client") for i in range(4)]
        burst = Burst(id="b1", size=4)
        first = asyncio.create_task(_step(backend, sessions[0], 0, burst))
        await asyncio.sleep(BURST_WAIT_S / 4)  # the rest of the burst is still on the wire
        rest = [asyncio.create_task(_step(backend, s, 0, burst)) for s in sessions[1:]]
        await asyncio.gather(first, *rest)
        stats = backend.batcher.stats
        backend.shutdown()
        return stats

    stats = asyncio.run(run())
    assert (stats.iterations, stats.steps, stats.burst_misses) == (1, 4, 0)


def test_lone_steps_do_not_wait_and_missing_members_wait_at_most_the_bound(span_model):
    async def run():
        backend = _backend(span_model)
        session = _open(backend, "lone", "client")
        loop = asyncio.get_running_loop()
        for i in range(5):
            await _step(backend, session, i)
        lone_waits = backend.batcher.stats.burst_waits
        start = loop.time()
        await _step(backend, session, 5, Burst(id="never-complete", size=3))
        missing = loop.time() - start
        stats = backend.batcher.stats
        backend.shutdown()
        return lone_waits, missing, stats

    lone_waits, missing, stats = asyncio.run(run())
    assert lone_waits == 0
    assert BURST_WAIT_S * 0.9 <= missing < BURST_WAIT_S + 0.5
    assert (stats.burst_waits, stats.burst_misses) == (1, 1)


def test_a_peer_whose_bursts_never_complete_is_no_longer_waited_for(span_model):
    """A peer that announces bursts it does not send would delay every iteration by the wait: after
    a few misses (and most of its recent bursts missing members), its bursts are ignored."""

    async def run():
        backend = _backend(span_model)
        session = _open(backend, "liar", "liar")
        for i in range(12):
            await _step(backend, session, i, Burst(id=f"fake{i}", size=8), sender="liar")
        stats = backend.batcher.stats
        backend.shutdown()
        return stats

    stats = asyncio.run(run())
    assert stats.burst_misses == stats.burst_waits == 4


def test_a_member_arriving_after_its_bursts_iteration_does_not_wait_again(span_model):
    """The burst was taken by an earlier iteration: a straggler runs at once, and does not count as
    another miss against its sender (which would soon stop every wait for that sender)."""

    async def run():
        backend = _backend(span_model)
        early, late = _open(backend, "early", "client"), _open(backend, "late", "client")
        burst = Burst(id="split", size=2)
        await _step(backend, early, 0, burst)  # waits for its partner, which comes only afterwards
        await _step(backend, late, 0, burst)
        stats = backend.batcher.stats
        backend.shutdown()
        return stats

    stats = asyncio.run(run())
    assert (stats.iterations, stats.burst_waits, stats.burst_misses) == (2, 1, 1)


def test_prefills_get_a_share_of_the_budget_while_sessions_decode(span_model):
    """Alone, a prompt runs in chunks of the whole budget (64 rows here); while a session decodes,
    in chunks of ``PREFILL_SHARE_WHILE_DECODING`` of it, so the decoding steps between the chunks
    wait for short iterations only."""
    from stamen.server.batching import PREFILL_SHARE_WHILE_DECODING

    def prompt(backend, session, positions):
        msg = Step(session_id=session.id, step_id=0, position=0)
        return backend.step(session, msg, SpanInputs(torch.randn(1, positions, 64)), sender="client")

    async def run():
        backend = _backend(span_model)
        stats = backend.batcher.stats
        await prompt(backend, _open(backend, "alone", "a"), 64)
        alone = stats.iterations
        decoding = _open(backend, "decoding", "b")
        await _step(backend, decoding, 0)
        before = stats.iterations
        long = asyncio.create_task(prompt(backend, _open(backend, "long", "c"), 60))
        for i in range(1, 4):
            await _step(backend, decoding, i)
        await long
        shared = stats.iterations - before
        backend.shutdown()
        return alone, shared

    alone, shared = asyncio.run(run())
    share = int(64 * PREFILL_SHARE_WHILE_DECODING)
    assert alone == 1  # 64 positions: one chunk of the whole budget
    assert shared == -(-60 // share)  # every chunk of the second prompt a share, decoding steps beside them
