"""Routing: which servers carry a request through blocks ``[start, end)``. Pure functions over plain data."""

from __future__ import annotations

import heapq
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from stamen.types import PeerIDStr, Span

CLIENT = PeerIDStr("")
"""The client, as the origin of a route."""


@dataclass(frozen=True)
class Candidate:
    """A server as routing sees it."""

    peer_id: PeerIDStr
    span: Span
    throughput: float
    """Single-token steps per second per block."""
    cache_tokens_left: int = 1 << 62
    next_pings: dict[PeerIDStr, float] = field(default_factory=dict, hash=False, compare=False)
    """Round-trip seconds from this server to servers that follow it, as it measured them."""
    load: float = 0.0
    """How much longer than an idle server's a step takes here, as a fraction (``load_of``): the
    time per block is (1 + load) / throughput."""


SESSION_LOAD = 0.2
"""Extra time of a step per other session on a batching server: a batched step of 8 sessions
through the 246M Llama's span took about 2.5× one session's on CPU (docs/benchmarks.md); on a
GPU far less, so this overstates it there, which only spreads sessions more."""


def load_of(sessions: int, queued_steps: float) -> float:
    """A server's announced load as routing weighs it: each step already queued there runs before
    ours (a whole step each, at worst), each open session adds ``SESSION_LOAD`` to a batched step."""
    return queued_steps + SESSION_LOAD * sessions


@dataclass(frozen=True)
class Hop:
    """One server of a route and the blocks it runs for this route."""

    peer_id: PeerIDStr
    blocks: Span


def find_route(
    candidates: Sequence[Candidate],
    blocks: Span,
    *,
    client_rtt: dict[PeerIDStr, float] | None = None,
    push: bool = True,
    default_rtt: float = 0.002,
    min_cache_tokens: int = 0,
    cache_penalty: float = 60.0,
) -> list[Hop] | None:
    """The chain of servers covering ``blocks`` with the least expected time per token.

    Per block: (1 + load)/throughput of the server running it. Network, with ``push``: half the client's
    round trip to the first server, half of each server-to-server round trip (as the earlier
    server announced it, else the client's to the later one), and half the client's round trip to
    the last server; without push: the client's full round trip to every server. Unknown round
    trips count ``default_rtt``. Servers lacking ``min_cache_tokens`` free cost ``cache_penalty``
    seconds more (used only when nothing else covers the blocks). None if no chain exists.

    Dijkstra over states (block boundary, previous server): a hop from boundary b to boundary e
    goes through a server with start <= b < e <= end.
    """
    client_rtt = client_rtt or {}
    usable = [c for c in candidates if c.throughput > 0 and c.span.start < blocks.end and c.span.end > blocks.start]
    by_peer = {c.peer_id: c for c in usable}
    bounds = sorted(
        {blocks.start, blocks.end}
        | {c.span.start for c in usable if blocks.start < c.span.start < blocks.end}
        | {c.span.end for c in usable if blocks.start < c.span.end < blocks.end}
    )

    def to_client(peer: PeerIDStr) -> float:
        return client_rtt.get(peer, default_rtt)

    def link(prev: PeerIDStr, peer: PeerIDStr) -> float:
        if not push:
            return to_client(peer)
        if prev == CLIENT:
            return to_client(peer) / 2
        return by_peer[prev].next_pings.get(peer, to_client(peer)) / 2

    start_state = (blocks.start, CLIENT)
    best: dict[tuple[int, PeerIDStr], float] = {start_state: 0.0}
    back: dict[tuple[int, PeerIDStr], tuple[tuple[int, PeerIDStr], Span]] = {}
    heap: list[tuple[float, int, PeerIDStr]] = [(0.0, blocks.start, CLIENT)]
    done: tuple[int, PeerIDStr] | None = None
    while heap:
        cost, b, prev = heapq.heappop(heap)
        if b == blocks.end:
            done = (b, prev)
            break
        if cost > best.get((b, prev), float("inf")):
            continue
        for c in usable:
            if not (c.span.start <= b < c.span.end) or c.peer_id == prev:
                continue
            penalty = cache_penalty if c.cache_tokens_left < min_cache_tokens else 0.0
            for e in bounds:
                if e <= b or e > c.span.end:
                    continue
                new = cost + link(prev, c.peer_id) + (e - b) * (1 + c.load) / c.throughput + penalty
                if e == blocks.end and push:
                    new += to_client(c.peer_id) / 2  # the last server returns the result to the client
                state = (e, c.peer_id)
                if new < best.get(state, float("inf")):
                    best[state], back[state] = new, ((b, prev), Span(b, e))
                    heapq.heappush(heap, (new, e, c.peer_id))
    if done is None:
        return None
    hops: list[Hop] = []
    state = done
    while state != start_state:
        previous, span = back[state]
        hops.append(Hop(state[1], span))
        state = previous
    return hops[::-1]


def sample_route(candidates: Sequence[Candidate], blocks: Span, rng: random.Random) -> list[Hop] | None:
    """A chain for stateless forward/backward calls that spreads load over servers in proportion
    to their throughput: from each boundary, a server covering the next block is drawn with
    probability ∝ throughput and runs as far as it can. None if some block has no server."""
    hops: list[Hop] = []
    b = blocks.start
    while b < blocks.end:
        covering = [c for c in candidates if c.span.start <= b < c.span.end and c.throughput > 0]
        if not covering:
            return None
        chosen = rng.choices(covering, weights=[c.throughput for c in covering])[0]
        e = min(chosen.span.end, blocks.end)
        hops.append(Hop(chosen.peer_id, Span(b, e)))
        b = e
    return hops


# --- SWARM training: stages and randomized pipelines (``client/swarm_train.py``) ---


def stage_chain(spans: Sequence[Span], blocks: Span) -> list[Span] | None:
    """Training stages (distinct spans of ``--train`` servers) that tile ``blocks`` end to end, fewest
    stages first (a stage's peers hold its whole span: a microbatch runs each stage whole); None
    if no chain of stages covers ``blocks`` exactly."""
    by_start: dict[int, list[Span]] = {}
    for span in set(spans):
        by_start.setdefault(span.start, []).append(span)
    best: dict[int, list[Span]] = {blocks.start: []}
    frontier = [blocks.start]
    while frontier:  # breadth first: fewest stages
        nxt: list[int] = []
        for b in frontier:
            for span in sorted(by_start.get(b, []), key=lambda s: -s.end):
                if span.end <= blocks.end and span.end not in best:
                    best[span.end] = [*best[b], span]
                    nxt.append(span.end)
        frontier = nxt
    return best.get(blocks.end)


def stage_peer_weight(candidate: Candidate, inflight: int = 0) -> float:
    """How likely a stage's peer is drawn for a microbatch: throughput / (1 + load), where load is its
    announced queue (``Candidate.load``) plus the microbatches this trainer has in flight there."""
    return max(0.0, candidate.throughput) / (1.0 + candidate.load + inflight)


def draw_stage_peer(candidates: Sequence[Candidate], stage: Span, rng: random.Random,
                    inflight: dict[PeerIDStr, int] | None = None,
                    exclude: Collection[PeerIDStr] = ()) -> Candidate | None:
    """One peer of ``stage`` (candidates hosting exactly that span, less ``exclude``) drawn with
    probability ∝ ``stage_peer_weight``; None if the stage has no usable peer."""
    inflight = inflight or {}
    peers = [c for c in candidates if c.span == stage and c.peer_id not in exclude and c.throughput > 0]
    if not peers:
        return None
    weights = [stage_peer_weight(c, inflight.get(c.peer_id, 0)) for c in peers]
    if sum(weights) <= 0:
        return rng.choice(peers)
    return rng.choices(peers, weights=weights)[0]
