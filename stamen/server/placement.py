"""Where servers put their spans: pure functions over plain data.

The same functions drive real servers (``stamen/server/server.py``) and the simulator
(``stamen/sim``). Throughput is additive per block: block ``b`` serves the summed throughput of
the servers hosting it, and the swarm serves at most its weakest block's throughput (the
*bottleneck*). A server hosting ``L`` blocks adds its throughput to each of them.

- ``choose_start``: the window of a given length where the swarm is weakest, compared leximin
  (the sorted throughputs of the window, weakest block first), so uncovered blocks come first.
- ``plan_move``: whether a server should leave its window for the weakest one. It moves only when
  the swarm is out of balance (bottleneck below ``balance_quality`` × mean block throughput) and
  the move raises the weakest of the blocks it touches by at least ``min_gain`` × its own
  throughput, or covers a block nobody serves. Such a move strictly improves the swarm's sorted
  block throughputs, so servers moving one at a time never cycle.
- ``standby_start``, ``plan_standby``: where a standby server holds blocks to take over when their
  servers leave; ``takeover_blocks``: which standby of several takes a hole; ``rest_of_hole``: where
  a standby that took over moves when the hole reaches past its blocks.
- ``upper_bound``: the best bottleneck any assignment could reach for the servers present.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from pydantic import BaseModel, ConfigDict, Field

from stamen.types import Span

EPS = 1e-9
"""Throughput at or below this counts as none (sums of floats leave tiny residues)."""


class PlacementSettings(BaseModel):
    """Thresholds of the rebalancing decision, the same for real servers and the simulator."""

    model_config = ConfigDict(frozen=True)

    balance_quality: float = Field(default=0.9, gt=0, le=1)
    """The swarm counts as balanced (nobody moves) while its bottleneck is at least this fraction of
    the mean block throughput, i.e. of what spreading today's spans' capacity evenly would give."""
    min_gain: float = Field(default=0.5, ge=0, le=1)
    """A move must raise the weakest block it touches by at least this fraction of the mover's own
    throughput; smaller gains are not worth reloading blocks (covering an uncovered block always is)."""


def block_throughputs(num_blocks: int, spans: Iterable[tuple[Span, float]]) -> np.ndarray:
    """Total throughput per block, as a float array of ``num_blocks``."""
    diff = np.zeros(num_blocks + 1)
    for span, throughput in spans:
        diff[min(span.start, num_blocks)] += throughput
        diff[min(span.end, num_blocks)] -= throughput
    totals = np.cumsum(diff[:-1])
    totals[np.abs(totals) <= EPS] = 0.0
    return totals


def window_minima(totals: np.ndarray, length: int) -> np.ndarray:
    """``out[s] = min(totals[s : s + length])`` for every window start."""
    return sliding_window_view(totals, length).min(axis=1)


def choose_start(others: np.ndarray, length: int, current: int | None = None) -> int:
    """The start of the weakest window of ``length`` blocks over the per-block throughput ``others``
    (the swarm without the server choosing): leximin on each window's sorted throughputs, so the
    weakest block decides first, then the next weakest, and more uncovered blocks come first.
    Ties go to ``current`` (a server does not move for nothing), then to the leftmost window."""
    length = min(length, len(others))
    windows = np.sort(sliding_window_view(others, length), axis=1)  # (starts, length), weakest first
    windows = np.round(windows, 9)  # float residues must not break ties
    best = int(np.lexsort(windows.T[::-1])[0])  # lexsort's last key is primary; stable: leftmost wins
    if current is not None and 0 <= current < len(windows) and np.array_equal(windows[current], windows[best]):
        return current
    return best


def standby_start(counts: np.ndarray, standbys: np.ndarray, totals: np.ndarray, length: int,
                  current: int | None = None) -> int:
    """Where a standby server holds its blocks: the window the swarm can least afford to lose. The
    pool spreads first (blocks held by the fewest other standbys: a pool stacked on one weak region
    helps nothing when another region loses its servers at once, the failures that open holes in a
    large swarm), then the fewest online servers (``counts``), then the lowest throughput
    (``totals``); compared leximin like ``choose_start``, ties to ``current``."""
    by_servers = counts + totals / (float(totals.max()) + 1.0 if len(totals) else 1.0)  # throughput adds < 1
    key = standbys + by_servers / (float(by_servers.max()) + 1.0 if len(by_servers) else 1.0)  # servers add < 1
    return choose_start(key, length, current)


def plan_standby(counts: np.ndarray, standbys: np.ndarray, totals: np.ndarray, held: Span,
                 margin: float = 0.2) -> Span | None:
    """Whether a standby holding ``held`` should load other blocks (``standbys`` without its own
    hold): the window ``standby_start`` picks, if it reaches a block held by fewer standbys than the
    held window's least held block, or, as well held, whose weakest block has fewer servers than
    ``(1 - margin)`` × the held window's weakest; a smaller difference is not worth a reload."""
    start = standby_start(counts, standbys, totals, held.length, held.start)
    if start == held.start:
        return None
    proposed, current = slice(start, start + held.length), slice(held.start, held.end)
    fewer_standbys = standbys[proposed].min() < standbys[current].min()
    same_standbys = standbys[proposed].min() == standbys[current].min()
    fewer_servers = counts[proposed].min() <= (1 - margin) * counts[current].min() and \
        counts[proposed].min() < counts[current].min()
    return Span(start, start + held.length) if fewer_standbys or (same_standbys and fewer_servers) else None


def takeover_blocks(held: Span, uncovered: Iterable[int], claims: Iterable[tuple[tuple[float, str], Span]],
                    mine: tuple[float, str]) -> list[int]:
    """The uncovered blocks of ``held`` that a standby claiming at ``mine`` (claim time, peer id)
    should go online for: those no earlier claim (``claims``: other standbys' (claim time, peer id)
    and spans) covers. Every standby that sees the same claims computes the same order, so of
    several claiming one hole, only the earliest takes it."""
    earlier = [span for key, span in claims if key < mine]
    return [b for b in sorted(set(uncovered)) if held.start <= b < held.end
            and not any(span.start <= b < span.end for span in earlier)]


def rest_of_hole(others: np.ndarray, span: Span) -> Span | None:
    """After a standby went online for ``span``, the window of its length that covers the most of
    the hole (``others``: the live servers' throughput per block without it), if that is not
    ``span``: it then loads the blocks it lacks there (a move). None when ``span`` is as good."""
    if not (np.delete(others, range(span.start, span.end)) <= EPS).any():
        return None
    start = choose_start(np.maximum(others, 0.0), span.length, span.start)
    return None if start == span.start else Span(start, start + span.length)


def choose_span(num_blocks: int, length: int, spans: Iterable[tuple[Span, float]]) -> Span:
    """The span of ``length`` blocks a joining server takes, given the others' (span, throughput)."""
    length = min(length, num_blocks)
    start = choose_start(block_throughputs(num_blocks, spans), length)
    return Span(start, start + length)


def quality(totals: np.ndarray) -> float:
    """Bottleneck over mean block throughput: 1 when every block serves the same, 0 with a gap."""
    mean = float(totals.mean()) if len(totals) else 0.0
    return float(totals.min()) / mean if mean > EPS else 0.0


@dataclass(frozen=True)
class MoveDecision:
    """What ``plan_move`` decided and why (for logs and tests)."""

    move: bool
    target: Span
    """The span to move to (the current span when staying)."""
    reason: str
    quality: float
    """Bottleneck over mean block throughput before the move."""
    before: float
    """The weakest throughput among the blocks the move touches, now."""
    after: float
    """The same after the move."""

    @property
    def gain(self) -> float:
        return self.after - self.before


def plan_move(others: np.ndarray, span: Span, throughput: float,
              settings: PlacementSettings = PlacementSettings()) -> MoveDecision:
    """Should a server of ``throughput`` hosting ``span`` move, given the per-block throughput of
    every other server (``others``, where servers already moving count at their target)?"""
    totals = others.copy()
    totals[span.start : span.end] += throughput
    q = quality(totals)

    def stay(reason: str, before: float = 0.0, after: float = 0.0) -> MoveDecision:
        return MoveDecision(False, span, reason, q, before, after)

    if q >= settings.balance_quality and not (totals <= EPS).any():
        return stay(f"balanced: bottleneck is {q:.1%} of the mean block throughput")
    start = choose_start(others, span.length, current=span.start)
    target = Span(start, start + span.length)
    if target == span:
        return stay("already on the weakest window")
    moved = others.copy()
    moved[target.start : target.end] += throughput
    touched = np.r_[span.start : span.end, target.start : target.end]
    before, after = float(totals[touched].min()), float(moved[touched].min())
    if before <= EPS < after:
        return MoveDecision(True, target, f"covers uncovered blocks in {target}", q, before, after)
    if after - before < settings.min_gain * throughput - EPS:
        return stay(f"gain {after - before:.3g} < {settings.min_gain} × own throughput {throughput:.3g}",
                    before, after)
    return MoveDecision(True, target, f"weakest touched block {before:.3g} -> {after:.3g} steps/s", q, before, after)


def upper_bound(num_blocks: int, servers: Iterable[tuple[float, int]]) -> float:
    """The highest bottleneck any placement could reach for servers given as (throughput, most
    blocks they can hold): every server hosts as many blocks as it can and the capacity is spread
    perfectly evenly. This is the optimum of the linear programme that lets each server cover any
    fraction x[i, b] ∈ [0, 1] of every block with Σ_b x[i, b] ≤ its memory (spreading each server
    uniformly is feasible and reaches Σ capacity / blocks), so no contiguous, integral placement
    beats it."""
    return sum(t * min(mem, num_blocks) for t, mem in servers) / num_blocks
