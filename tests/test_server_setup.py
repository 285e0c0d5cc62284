"""In-process pieces of a self-placing server: memory plan, speed measurement and its cache, the
backend's span swap during a move, and the moving state in health reports."""

from __future__ import annotations

import asyncio

import pytest
import torch

from stamen.dht.health import format_health, swarm_health
from stamen.dht.records import ServerRecord, ServerState
from stamen.errors import WrongBlocksError
from stamen.models import BlockConfig, KVCache, load_config, load_span, open_checkpoint
from stamen.rpc.inputs import SpanInputs
from stamen.server.backend import SpanBackend
from stamen.server.compute import choose_decode_threads, fewest_within, in_fresh_thread, thread_counts
from stamen.server.memory import block_bytes, plan_blocks
from stamen.server.throughput import ComputeThroughput, cached_compute, measure_compute, network_steps_per_second
from stamen.testing.models import save_random_llama
from stamen.types import Span, parse_bytes
from stamen.wire.messages import OpenSession, SpanRef, Step

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_random_llama(tmp_path_factory.mktemp("setup") / "tiny", TINY, with_tokenizer=False)
    return path, BlockConfig.from_hf(load_config(path)), open_checkpoint(path)


def test_parse_bytes():
    assert parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("8GB") == 8 * 10**9
    assert parse_bytes("1.5g") == 3 << 29
    assert parse_bytes("1000") == 1000
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_blocks_that_fit_count_weights_cache_and_margin(tiny):
    _, config, _ = tiny
    weights = block_bytes(config, torch.float32)
    assert weights == 4 * (64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64)
    cache = KVCache.nbytes_per_token(config, 1, torch.float32) * 1024
    plan = plan_blocks(config, torch.float32, 1024, int(3.5 * (weights + cache) / 0.9), 0.1, "allowed")
    assert plan.num_blocks == 3 and plan.message.startswith("hosting 3 blocks") and "KV cache" in plan.message
    assert plan_blocks(config, torch.float32, 1024, 10**12, 0.1, "free").num_blocks == 6  # the whole model
    assert plan_blocks(config, torch.float32, 1024, 10, 0.1, "free").num_blocks == 1


def test_compute_is_measured_once_per_key(tiny, tmp_path):
    _, config, checkpoint = tiny
    model = load_span(checkpoint, config, Span(0, 1), torch.float32, progress=False)
    calls = []

    def measure() -> ComputeThroughput:
        calls.append(1)
        return measure_compute(model, torch.float32, "cpu", forward_tokens=16, repeats=3)

    first, cached = cached_compute(tmp_path / "t.json", "cpu|tiny|float32", measure)
    assert not cached and first.inference > 0 and first.forward > 0 and first.forward_tokens == 16
    again, cached = cached_compute(tmp_path / "t.json", "cpu|tiny|float32", measure)
    assert cached and again == first and len(calls) == 1
    assert network_steps_per_second(1024 * 1024, 64, torch.float32) == 2048


def test_a_moving_backend_keeps_old_sessions_and_serves_the_new_span(tiny):
    """Open a session on [0:2), move to [1:3): block 1 is shared (not reloaded), the open session
    still steps on [0:2) with its cache, new sessions and forwards get [1:3) only."""
    _, config, checkpoint = tiny
    old = load_span(checkpoint, config, Span(0, 2), torch.float32, progress=False)
    new = load_span(checkpoint, config, Span(1, 3), torch.float32, progress=False, reuse=old)
    assert new.blocks[0] is old.blocks[1] and new.blocks[1] is not old.blocks[1]
    reference = load_span(checkpoint, config, Span(0, 2), torch.float32, progress=False)
    backend = SpanBackend(old, torch.float32, torch.device("cpu"), max_cache_tokens=64, max_step_tokens=64)

    async def run():
        hidden = torch.randn(1, 3, 64)
        session = backend.open(OpenSession(session_id="s", blocks=SpanRef.of(Span(0, 2)), max_length=8,
                                           batch_size=1), asyncio.Queue())
        first = await backend.step(session, Step(session_id="s", step_id=0, position=0), SpanInputs(hidden[:, :2]))
        backend.swap_model(new)
        assert backend.span == Span(1, 3) and backend.sessions_on_old_spans() == ["s"]
        second = await backend.step(session, Step(session_id="s", step_id=1, position=2), SpanInputs(hidden[:, 2:]))
        with torch.inference_mode():
            expected = reference(hidden)
        torch.testing.assert_close(torch.cat([first, second], dim=1), expected)
        with pytest.raises(WrongBlocksError), torch.inference_mode():  # a forward checked before the move
            new(hidden, blocks=Span(0, 2))
        with pytest.raises(WrongBlocksError):
            backend.open(OpenSession(session_id="t", blocks=SpanRef.of(Span(0, 2)), max_length=8, batch_size=1),
                         asyncio.Queue())
        backend.open(OpenSession(session_id="u", blocks=SpanRef.of(Span(1, 3)), max_length=8, batch_size=1),
                     asyncio.Queue())
        assert backend.sessions_on_old_spans() == ["s"]
        backend.close("s")
        assert backend.sessions_on_old_spans() == []
        assert backend.budget.tokens_left == 64 - 8

    asyncio.run(run())
    backend.shutdown()


def test_health_shows_a_moving_server():
    common = dict(throughput=5.0, cache_tokens_left=10, dtype="float32", version="0")
    records = {
        "peer-a": ServerRecord(state=ServerState.ONLINE, start=0, end=2, **common),
        "peer-b": ServerRecord(state=ServerState.ONLINE, start=0, end=2, moving_to=(2, 4), network_bandwidth=1e6,
                               forward_throughput=300.0, **common),
    }
    report = swarm_health("m", 4, records)
    assert report.uncovered_blocks == [2, 3]
    assert "moving to [2:4)" in format_health(report)
    assert report.servers[1].network_bandwidth == 1e6 and report.servers[1].forward_throughput == 300.0
    assert ServerRecord.model_validate(records["peer-b"].model_dump(mode="json")).placed_span == Span(2, 4)


def test_health_counts_only_live_servers():
    """A killed server's online record lingers until it expires: health counts a server only if it
    answers a ping or, not pinged, announced within its period (ttl/3, plus a grace)."""
    now, common = 1000.0, dict(throughput=5.0, cache_tokens_left=10, dtype="float32", version="0", ttl=60.0)
    records = {
        "fresh": ServerRecord(state=ServerState.ONLINE, start=0, end=2, announced_at=now - 5, **common),
        "dead": ServerRecord(state=ServerState.ONLINE, start=2, end=4, announced_at=now - 5, **common),
        "quiet": ServerRecord(state=ServerState.ONLINE, start=2, end=4, announced_at=now - 31, **common),
        "loading": ServerRecord(state=ServerState.JOINING, start=2, end=4, announced_at=now - 300, **common),
        "old": ServerRecord(state=ServerState.ONLINE, start=0, end=1, **common),  # no time stamped: not stale
    }
    report = swarm_health("m", 4, records, now=now)  # nobody pinged: the stale record does not count
    assert report.stale == ["quiet"] and report.unreachable == [] and report.servers[-1].age == 31
    assert report.block_servers == [2, 1, 1, 1] and report.uncovered_blocks == []
    report = swarm_health("m", 4, records, pings={"fresh": 0.001, "old": 0.001, "dead": None, "quiet": None}, now=now)
    assert report.unreachable == ["dead", "quiet"] and report.uncovered_blocks == [2, 3]
    assert report.block_servers == [2, 1, 0, 0] and report.bottleneck_throughput == 0
    assert [s.live for s in report.servers] == [True, True, False, False, False]
    text = format_health(report)
    assert "uncovered blocks: 2, 3" in text and "unreachable (announced online" in text and "(2 live)" in text
    # a server that answers counts, even if it has not announced for a while
    report = swarm_health("m", 4, records, pings={"quiet": 0.002}, now=now)
    assert report.uncovered_blocks == [] and report.servers[4].ping_ms == 2.0 and report.stale == ["quiet"]


def test_decoding_threads_are_the_fewest_within_the_tolerance():
    assert thread_counts(1) == [1] and thread_counts(2) == [1, 2] and thread_counts(6) == [1, 2, 4, 6]
    assert fewest_within({1: 10.0, 2: 9.5}, 0.10) == 1  # memory-bound: a second thread adds barriers only
    assert fewest_within({1: 20.0, 2: 10.0, 4: 10.8}, 0.10) == 2
    assert fewest_within({1: 20.0, 2: 12.0, 4: 10.0}, 0.10) == 4


def test_a_second_measurement_keeps_the_faster_sample_per_count():
    """Servers measure again once idle: a start-up sample skewed by processes that were starting
    (2 threads at 7.0 ms) gives way to the undisturbed one, and the choice follows."""
    from stamen.server.compute import fastest_of

    startup, idle = {1: 3.2, 2: 7.0}, {1: 3.4, 2: 2.3}
    assert fewest_within(startup, 0.10) == 1
    assert fastest_of(startup, idle) == {1: 3.2, 2: 2.3}
    assert fewest_within(fastest_of(startup, idle), 0.10) == 2
    assert fastest_of({1: 3.0}, {}) == {1: 3.0}


def test_decoding_and_long_work_keep_their_own_thread_counts(tiny):
    """The loop's thread steps with the measured count; a long-work thread sets its own and leaves
    the caller's alone (torch's thread count is per thread)."""
    _, config, checkpoint = tiny
    model = load_span(checkpoint, config, Span(0, 2), torch.float32, progress=False)
    before = torch.get_num_threads()
    try:
        chosen, ms = choose_decode_threads(model, torch.float32, "cpu", 2, rounds=1, steps=2)
        assert set(ms) == {1, 2} and all(t > 0 for t in ms.values())
        assert chosen == fewest_within(ms, 0.10) and torch.get_num_threads() == chosen
        torch.set_num_threads(1)
        assert asyncio.run(in_fresh_thread(torch.get_num_threads, threads=2)) == 2
        assert torch.get_num_threads() == 1
        assert choose_decode_threads(model, torch.float32, "cpu", 1) == (1, {})
    finally:
        torch.set_num_threads(before)


def test_speed_measurements_of_one_host_take_turns(tmp_path):
    """Servers started together measured their decoding threads side by side, each slowing the
    others' 2-thread steps: the measurement holds a host-wide lock that another holder waits for."""
    import fcntl

    from stamen.server.compute import host_measurement_lock

    path = tmp_path / "measure.lock"
    with host_measurement_lock(str(path)), open(path, "a") as other:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(path, "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again once the measurement is done
        fcntl.flock(other, fcntl.LOCK_UN)
    with host_measurement_lock(str(tmp_path / "missing-dir" / "measure.lock")):
        pass  # a lock file it cannot open (here: no such directory) does not stop the measurement
