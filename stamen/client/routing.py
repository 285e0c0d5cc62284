"""Routing: which servers carry a request through blocks ``[start, end)``. Pure functions over plain data."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from stamen.types import PeerIDStr, Span


@dataclass(frozen=True)
class Candidate:
    """A server as routing sees it."""

    peer_id: PeerIDStr
    span: Span
    throughput: float
    """Single-token steps per second per block."""
    cache_tokens_left: int = 1 << 62


@dataclass(frozen=True)
class Hop:
    """One server of a route and the blocks it runs for this route."""

    peer_id: PeerIDStr
    blocks: Span


def missing_blocks(num_blocks: int, spans: Iterable[Span]) -> list[int]:
    covered = [False] * num_blocks
    for span in spans:
        for b in range(span.start, min(span.end, num_blocks)):
            covered[b] = True
    return [b for b, c in enumerate(covered) if not c]


def find_route(
    candidates: Sequence[Candidate],
    blocks: Span,
    *,
    hop_cost: float = 0.002,
    rtt: dict[PeerIDStr, float] | None = None,
    min_cache_tokens: int = 0,
) -> list[Hop] | None:
    """The chain of servers covering ``blocks`` with the least expected time per token:
    per hop, the round trip to that server (``rtt``, else ``hop_cost`` seconds), plus per block
    1/throughput. Servers without ``min_cache_tokens`` free are skipped. None if no chain exists.

    Shortest path over block boundaries: a hop goes from boundary b to any boundary e with
    server.start <= b < e <= server.end.
    """
    usable = [
        c for c in candidates
        if c.throughput > 0 and c.cache_tokens_left >= min_cache_tokens
        and c.span.start < blocks.end and c.span.end > blocks.start
    ]
    bounds = sorted(
        {blocks.start, blocks.end}
        | {c.span.start for c in usable if blocks.start < c.span.start < blocks.end}
        | {c.span.end for c in usable if blocks.start < c.span.end < blocks.end}
    )
    rtt = rtt or {}
    best: dict[int, float] = {blocks.start: 0.0}
    back: dict[int, tuple[int, Candidate]] = {}
    heap = [(0.0, blocks.start)]
    while heap:
        cost, b = heapq.heappop(heap)
        if b == blocks.end:
            break
        if cost > best.get(b, float("inf")):
            continue
        for c in usable:
            if not (c.span.start <= b < c.span.end):
                continue
            for e in bounds:
                if e <= b or e > c.span.end:
                    continue
                new = cost + rtt.get(c.peer_id, hop_cost) + (e - b) / c.throughput
                if new < best.get(e, float("inf")):
                    best[e], back[e] = new, (b, c)
                    heapq.heappush(heap, (new, e))
    if blocks.end not in back and blocks.start != blocks.end:
        return None
    hops: list[Hop] = []
    e = blocks.end
    while e != blocks.start:
        b, c = back[e]
        hops.append(Hop(c.peer_id, Span(b, e)))
        e = b
    return hops[::-1]
