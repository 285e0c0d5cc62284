"""Routing and placement are pure functions: tested on synthetic swarms."""

from __future__ import annotations

import pytest

from stamen.client.routing import SESSION_LOAD, Candidate, Hop, find_route, load_of
from stamen.server.placement import choose_span
from stamen.types import PeerIDStr, Span, missing_blocks


def c(name: str, start: int, end: int, throughput: float = 100.0, cache: int = 1 << 30) -> Candidate:
    return Candidate(PeerIDStr(name), Span(start, end), throughput, cache)


def test_route_covers_all_blocks_in_order():
    route = find_route([c("a", 0, 4), c("b", 4, 8), c("c", 8, 12)], Span(0, 12))
    assert route == [Hop("a", Span(0, 4)), Hop("b", Span(4, 8)), Hop("c", Span(8, 12))]


def test_route_prefers_fewer_hops():
    route = find_route([c("a", 0, 4), c("b", 4, 8), c("big", 0, 8)], Span(0, 8))
    assert route == [Hop("big", Span(0, 8))]


def test_route_uses_part_of_an_overlapping_server():
    route = find_route([c("a", 0, 6), c("b", 3, 10, throughput=1000)], Span(0, 10))
    assert [h.peer_id for h in route] == ["a", "b"]
    assert route[0].blocks.start == 0 and route[-1].blocks.end == 10
    assert route[0].blocks.end == route[1].blocks.start


def test_route_avoids_slow_servers():
    fast = find_route([c("slow", 0, 8, throughput=1), c("f1", 0, 4, 1000), c("f2", 4, 8, 1000)], Span(0, 8))
    assert [h.peer_id for h in fast] == ["f1", "f2"]


def test_route_prefers_less_loaded_servers():
    """Equal servers: the one with fewer queued steps and sessions wins, unless it is much slower."""
    busy = Candidate(PeerIDStr("busy"), Span(0, 4), 100.0, load=load_of(sessions=8, queued_steps=2.0))
    idle = Candidate(PeerIDStr("idle"), Span(0, 4), 100.0, load=load_of(sessions=1, queued_steps=0.0))
    assert [h.peer_id for h in find_route([busy, idle], Span(0, 4))] == ["idle"]
    assert [h.peer_id for h in find_route([idle, busy], Span(0, 4))] == ["idle"]
    slow_idle = Candidate(PeerIDStr("slow"), Span(0, 4), 10.0)
    assert [h.peer_id for h in find_route([busy, slow_idle], Span(0, 4))] == ["busy"]
    assert load_of(0, 0.0) == 0.0 and load_of(5, 1.5) == pytest.approx(1.5 + 5 * SESSION_LOAD)


def test_route_avoids_servers_without_cache():
    route = find_route([c("full", 0, 8, cache=10), c("a", 0, 4), c("b", 4, 8)], Span(0, 8), min_cache_tokens=100)
    assert [h.peer_id for h in route] == ["a", "b"]
    # but a full server is still better than no route at all
    assert [h.peer_id for h in find_route([c("full", 0, 8, cache=10)], Span(0, 8), min_cache_tokens=100)] == ["full"]


def test_route_rtt_matters():
    servers = [c("near", 0, 8, throughput=100), c("far", 0, 8, throughput=120)]
    route = find_route(servers, Span(0, 8), client_rtt={PeerIDStr("far"): 0.5, PeerIDStr("near"): 0.001})
    assert route == [Hop("near", Span(0, 8))]


def test_route_uses_server_to_server_pings_with_push():
    # b1 and b2 are equally close to the client, but a measured a short link to b2 only
    a = Candidate(PeerIDStr("a"), Span(0, 4), 100.0, next_pings={PeerIDStr("b1"): 0.2, PeerIDStr("b2"): 0.001})
    servers = [a, c("b1", 4, 8, throughput=110), c("b2", 4, 8, throughput=100)]
    rtt = {PeerIDStr(p): 0.01 for p in ("a", "b1", "b2")}
    assert [h.peer_id for h in find_route(servers, Span(0, 8), client_rtt=rtt)] == ["a", "b2"]
    # without push every hop is a client round trip, so the faster b1 wins
    assert [h.peer_id for h in find_route(servers, Span(0, 8), client_rtt=rtt, push=False)] == ["a", "b1"]


def test_no_route_when_a_block_is_missing():
    assert find_route([c("a", 0, 4), c("b", 5, 8)], Span(0, 8)) is None
    assert missing_blocks(8, [Span(0, 4), Span(5, 8)]) == [4]


def test_sub_range_route():
    assert find_route([c("a", 0, 8)], Span(2, 5)) == [Hop("a", Span(2, 5))]


@pytest.mark.parametrize(
    "existing, length, expected",
    [
        ([], 4, Span(0, 4)),
        ([(Span(0, 4), 10.0)], 4, Span(4, 8)),
        ([(Span(0, 4), 10.0), (Span(8, 12), 10.0)], 4, Span(4, 8)),
        ([(Span(0, 12), 10.0), (Span(0, 6), 50.0)], 6, Span(6, 12)),
        ([], 20, Span(0, 12)),
    ],
)
def test_choose_span_takes_the_weakest_window(existing, length, expected):
    assert choose_span(12, length, existing) == expected


def test_sampled_routes_spread_load_by_throughput():
    import random
    from collections import Counter

    from stamen.client.routing import sample_route

    servers = [c("fast", 0, 4, throughput=300), c("slow", 0, 4, throughput=100), c("tail", 4, 8)]
    rng = random.Random(0)
    counts = Counter(sample_route(servers, Span(0, 8), rng)[0].peer_id for _ in range(4000))
    assert 0.70 < counts["fast"] / 4000 < 0.80  # expected 0.75
    route = sample_route(servers, Span(2, 8), rng)
    assert route[0].blocks == Span(2, 4) and route[-1] == Hop("tail", Span(4, 8))
    assert sample_route([c("a", 0, 3)], Span(0, 8), rng) is None
