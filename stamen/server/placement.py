"""Which span a joining server takes: a pure function over plain data."""

from __future__ import annotations

from collections.abc import Iterable

from stamen.types import Span


def block_throughputs(num_blocks: int, spans: Iterable[tuple[Span, float]]) -> list[float]:
    """Total announced throughput per block."""
    totals = [0.0] * num_blocks
    for span, throughput in spans:
        for b in range(span.start, min(span.end, num_blocks)):
            totals[b] += throughput
    return totals


def choose_span(num_blocks: int, length: int, spans: Iterable[tuple[Span, float]]) -> Span:
    """The window of ``length`` blocks where the swarm is weakest: fewest uncovered-first, then the
    lowest bottleneck throughput, then the lowest total; ties go to the leftmost window."""
    length = min(length, num_blocks)
    totals = block_throughputs(num_blocks, spans)

    def weakness(start: int) -> tuple[int, float, float]:
        window = totals[start : start + length]
        uncovered = sum(1 for t in window if t <= 0)
        return (-uncovered, min(window), sum(window))

    best = min(range(num_blocks - length + 1), key=weakness)
    return Span(best, best + length)
