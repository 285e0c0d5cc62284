"""A discrete-event simulation of a swarm placing itself with the real placement code.

Virtual servers with heterogeneous throughput and memory join, check whether to move at jittered
intervals, move (loading new blocks before leaving old ones), and leave, gracefully or by crashing.
Each server decides on a *view* of the swarm like the DHT's: announcements reach the others after
``dht_delay`` seconds and a crashed server's record lingers for ``record_ttl`` seconds. The swarm's
real bottleneck (online servers only) is sampled against the upper bound for the servers present.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from stamen.server.placement import (
    PlacementSettings,
    choose_start,
    plan_move,
    plan_standby,
    standby_start,
    upper_bound,
)
from stamen.types import Span


class SimConfig(BaseModel):
    """Settings of one simulation run."""

    model_config = ConfigDict(frozen=True)

    num_servers: int = Field(default=500, gt=0)
    """Servers present at once (churn replaces them one for one)."""
    num_blocks: int = Field(default=80, gt=0)
    """Blocks of the model."""
    min_throughput: float = Field(default=1.0, gt=0)
    """Slowest server's throughput (steps/s per block); throughputs are log-uniform in the range."""
    max_throughput: float = Field(default=10.0, gt=0)
    """Fastest server's throughput."""
    min_memory_blocks: int = Field(default=4, gt=0)
    """Fewest blocks a server's memory holds; memories are uniform integers in the range."""
    max_memory_blocks: int = Field(default=40, gt=0)
    """Most blocks a server's memory holds."""
    churn_per_hour: float = Field(default=0.2, ge=0)
    """Fraction of the servers replaced per hour (a Poisson process of leaves, each followed by a join)."""
    hours: float = Field(default=24.0, gt=0)
    """Simulated time."""
    warmup_hours: float = Field(default=2.0, ge=0)
    """Samples before this are left out of the summary's means."""
    join_minutes: float = Field(default=30.0, ge=0)
    """The initial servers join one by one at random times within this window."""
    balance_period: float = Field(default=120.0, gt=0)
    """Mean seconds between a server's rebalancing checks (each wait uniform in 0.5×–1.5×)."""
    move_jitter: float = Field(default=10.0, ge=0)
    """A server that decides to move waits uniform(0, this) seconds, then looks again before moving."""
    load_seconds_per_block: float = Field(default=5.0, ge=0)
    """Seconds to load one block (joins and moves)."""
    dht_delay: float = Field(default=5.0, ge=0)
    """Seconds before an announcement is visible to other servers."""
    record_ttl: float = Field(default=60.0, ge=0)
    """Seconds a crashed server's record stays visible."""
    crash_fraction: float = Field(default=0.5, ge=0, le=1)
    """Fraction of leaves that are crashes (no offline announcement)."""
    sample_period: float = Field(default=60.0, gt=0)
    """Seconds between samples of the bottleneck."""
    rebalance: bool = True
    """Whether servers rebalance (off: they only choose a span when joining)."""
    exodus_hour: float | None = None
    """At this hour, every server whose span starts in the first ``exodus_fraction`` of the blocks
    crashes at once and is not replaced (a correlated failure, e.g. one hosting provider going away)."""
    exodus_fraction: float = Field(default=0.25, gt=0, le=1)
    """The share of the blocks whose servers leave in the exodus."""
    placement: PlacementSettings = PlacementSettings()
    """The thresholds of the rebalancing decision."""
    standby_fraction: float = Field(default=0.0, ge=0, le=1)
    """Standby servers, as a fraction of ``num_servers`` (a backup pool): each holds the blocks the
    swarm can least afford to lose without serving them, and goes online for them, without loading,
    when a hole opens there; a new standby then joins the pool."""
    standby_detect_seconds: float = Field(default=2.0, ge=0)
    """Seconds a standby needs to notice that its blocks lost their servers (its ping period)."""
    standby_jitter: float = Field(default=1.0, ge=0)
    """A standby that noticed a hole waits uniform(0, this) seconds and looks again before taking
    over, so that only one of several standbys holding the blocks takes it."""
    seed: int = 0
    """Random seed."""


class SimSummary(BaseModel):
    """What a run measured; ``ratio`` is bottleneck / upper bound."""

    config: SimConfig
    mean_ratio: float
    """Mean of bottleneck / upper bound over the samples after warm-up."""
    min_ratio: float
    """The lowest sampled ratio after warm-up."""
    p5_ratio: float
    """The 5th percentile of the sampled ratio after warm-up."""
    mean_bottleneck: float
    """Mean bottleneck throughput (steps/s) after warm-up."""
    mean_upper_bound: float
    """Mean upper bound after warm-up."""
    joins: int
    leaves: int
    checks: int
    """Rebalancing checks run."""
    moves: int
    """Moves carried out."""
    blocks_reloaded: int
    """Blocks loaded by moves (blocks a mover already held are kept, not counted)."""
    blocks_reloaded_after_warmup: int
    moves_after_warmup: int
    blocks_loaded_by_joins: int
    runtime_s: float
    """Wall-clock seconds the simulation took."""
    hours: list[float]
    bottleneck: list[float]
    bound: list[float]
    uncovered: list[int]
    """Blocks no online server serves, per sample."""
    covered_fraction: float = 1.0
    """Fraction of the time after warm-up during which every block had an online server."""
    holes: int = 0
    """Holes (some block without an online server) that closed after warm-up."""
    mean_hole_seconds: float = 0.0
    """Mean time from a hole opening to every block being covered again (holes closed after warm-up)."""
    max_hole_seconds: float = 0.0
    standbys: int = 0
    """Standby servers in the pool at the start."""
    takeovers: int = 0
    """Standbys that went online for a hole."""
    blocks_saved: int = 0
    """Blocks standbys served at once when they took over, which would otherwise have been loaded."""
    standby_blocks_loaded: int = 0
    """Blocks standbys loaded (joining the pool or re-choosing their blocks)."""


class _Ev(IntEnum):  # order breaks ties at equal times
    VIEW = 0
    ONLINE = 1
    MOVED = 2
    LEAVE = 3
    JOIN = 4
    CHECK = 5
    CONFIRM = 6
    SAMPLE = 7
    EXODUS = 8
    STANDBY_READY = 9
    STANDBY_CHECK = 10
    TAKEOVER = 11


@dataclass
class _Server:
    id: int
    throughput: float
    memory: int
    length: int
    span: Span | None = None
    """Blocks it serves (None while loading its first span)."""
    target: Span | None = None
    """Blocks it is loading (joining or moving)."""
    alive: bool = True
    standby: bool = False
    """Holds ``held`` without serving, ready to take over."""
    held: Span | None = None
    """A standby's loaded blocks (None while it loads them)."""
    takeover_pending: bool = False

    @property
    def placed(self) -> Span:
        """Where its capacity counts for placement: the target while loading, else the span."""
        return self.target or self.span or self.held  # type: ignore[return-value]


@dataclass
class _Swarm:
    """True and viewed per-block throughput, kept incrementally."""

    num_blocks: int
    truth: np.ndarray = field(init=False)
    view: np.ndarray = field(init=False)
    viewed: dict[int, tuple[Span, float]] = field(default_factory=dict)
    """Each server's placement as the others see it."""
    view_counts: np.ndarray = field(init=False)
    """Servers per block in the view."""
    standby_counts: np.ndarray = field(init=False)
    """Standbys holding each block (announced as standbys: they count for the pool, not for routes)."""

    def __post_init__(self) -> None:
        self.truth = np.zeros(self.num_blocks)
        self.view = np.zeros(self.num_blocks)
        self.view_counts = np.zeros(self.num_blocks)
        self.standby_counts = np.zeros(self.num_blocks)

    def set_view(self, sid: int, placement: tuple[Span, float] | None) -> None:
        old = self.viewed.pop(sid, None)
        if old is not None:
            self.view[old[0].start : old[0].end] -= old[1]
            self.view_counts[old[0].start : old[0].end] -= 1
        if placement is not None:
            self.view[placement[0].start : placement[0].end] += placement[1]
            self.view_counts[placement[0].start : placement[0].end] += 1
            self.viewed[sid] = placement

    def others(self, sid: int) -> np.ndarray:
        """The view without server ``sid``'s own record."""
        others = self.view.copy()
        mine = self.viewed.get(sid)
        if mine is not None:
            others[mine[0].start : mine[0].end] -= mine[1]
        np.maximum(others, 0.0, out=others)  # float residues
        others[others < 1e-9] = 0.0
        return others


class Simulation:
    def __init__(self, config: SimConfig):
        self.c = config
        self.rng = random.Random(config.seed)  # the population: who joins, with what, who leaves when
        self.timing = random.Random(config.seed + 1)  # check and move jitter: runs with and without
        # rebalancing then see the same servers come and go
        self.swarm = _Swarm(config.num_blocks)
        self.servers: dict[int, _Server] = {}
        self.alive: list[int] = []
        self._alive_index: dict[int, int] = {}
        self.events: list[tuple[float, int, int, int, object]] = []
        self._seq = 0
        self.stats = dict(joins=0, leaves=0, checks=0, moves=0, blocks_reloaded=0, blocks_reloaded_after_warmup=0,
                          moves_after_warmup=0, blocks_loaded_by_joins=0)
        self.samples: list[tuple[float, float, float, int]] = []
        self.hole_since: float | None = None
        self.hole_durations: list[float] = []
        self.uncovered_seconds = 0.0
        self.standby_stats = dict(takeovers=0, blocks_saved=0, standby_blocks_loaded=0)

    # --- events ---

    def _at(self, t: float, kind: _Ev, sid: int = -1, payload: object = None) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, int(kind), self._seq, sid, payload))

    def _announce(self, now: float, s: _Server, delay: float | None = None) -> None:
        placement = (s.placed, s.throughput) if s.alive else None
        self._at(now + (self.c.dht_delay if delay is None else delay), _Ev.VIEW, s.id, placement)

    def _new_server(self) -> _Server:
        c = self.c
        sid = len(self.servers)
        throughput = math.exp(self.rng.uniform(math.log(c.min_throughput), math.log(c.max_throughput)))
        memory = self.rng.randint(c.min_memory_blocks, c.max_memory_blocks)
        s = _Server(sid, throughput, memory, min(memory, c.num_blocks))
        self.servers[sid] = s
        self._alive_index[sid] = len(self.alive)
        self.alive.append(sid)
        return s

    def _truth(self, span: Span | None, delta: float) -> None:
        if span is not None:
            self.swarm.truth[span.start : span.end] += delta

    def join(self, now: float, standby: bool = False) -> None:
        if standby:
            self.join_standby(now)
            return
        s = self._new_server()
        self.stats["joins"] += 1
        start = choose_start(self.swarm.others(s.id), s.length)
        s.target = Span(start, start + s.length)
        self.stats["blocks_loaded_by_joins"] += s.length
        self._announce(now, s)
        self._at(now + self.c.load_seconds_per_block * s.length, _Ev.ONLINE, s.id)

    def online(self, now: float, s: _Server) -> None:
        s.span, s.target = s.target, None
        self._truth(s.span, s.throughput)
        self._track(now)
        if self.c.rebalance:
            self._schedule_check(now, s)

    # --- standbys ---

    def join_standby(self, now: float) -> None:
        s = self._new_server()
        s.standby = True
        s.target = self._standby_span(s)
        self._hold(s.target, +1)
        self.standby_stats["standby_blocks_loaded"] += s.length
        self._at(now + self.c.load_seconds_per_block * s.length, _Ev.STANDBY_READY, s.id)

    def _standby_span(self, s: _Server) -> Span:
        start = standby_start(self.swarm.view_counts, self.swarm.standby_counts, self.swarm.view, s.length)
        return Span(start, start + s.length)

    def _hold(self, span: Span | None, delta: int) -> None:
        if span is not None:
            self.swarm.standby_counts[span.start : span.end] += delta

    def standby_ready(self, now: float, s: _Server) -> None:
        if not s.standby:  # it took over while loading: that load was abandoned
            return
        if s.held is not None:
            self._hold(s.held, -1)  # re-chosen: the old blocks are dropped now
        s.held, s.target = s.target, None
        self._schedule_standby_check(now, s)
        self._watch(now, s)

    def _schedule_standby_check(self, now: float, s: _Server) -> None:
        self._at(now + self.c.balance_period * self.timing.uniform(0.5, 1.5), _Ev.STANDBY_CHECK, s.id)

    def standby_check(self, now: float, s: _Server) -> None:
        """Re-choose the held blocks as the swarm changes (loading the new ones before dropping the old)."""
        if not s.standby or s.target is not None:
            return
        others = self.swarm.standby_counts.copy()
        others[s.held.start : s.held.end] -= 1  # without its own hold
        span = plan_standby(self.swarm.view_counts, others, self.swarm.view, s.held)
        if span is None:
            self._schedule_standby_check(now, s)
            return
        s.target = span
        self._hold(span, +1)
        new_blocks = len(set(range(span.start, span.end)) - set(range(s.held.start, s.held.end)))
        self.standby_stats["standby_blocks_loaded"] += new_blocks
        self._at(now + self.c.load_seconds_per_block * new_blocks, _Ev.STANDBY_READY, s.id)

    def _watch(self, now: float, s: _Server) -> None:
        """A ready standby that holds uncovered blocks notices within its ping period."""
        if s.held is None or s.takeover_pending:
            return
        if (self.swarm.truth[s.held.start : s.held.end] <= 1e-9).any():
            s.takeover_pending = True
            delay = self.c.standby_detect_seconds * self.timing.uniform(0.5, 1.0)
            self._at(now + delay + self.timing.uniform(0, self.c.standby_jitter), _Ev.TAKEOVER, s.id)

    def takeover(self, now: float, s: _Server) -> None:
        """A fresh look: if its blocks still lack a server, go online for them at once, no loading."""
        s.takeover_pending = False
        if not s.standby or s.held is None or not (self.swarm.truth[s.held.start : s.held.end] <= 1e-9).any():
            return
        self._hold(s.held, -1)
        if s.target is not None:  # it was re-choosing: that load is abandoned
            self._hold(s.target, -1)
        s.standby, s.span, s.target, s.held = False, s.held, None, None
        self.standby_stats["takeovers"] += 1
        self.standby_stats["blocks_saved"] += s.span.length
        self._truth(s.span, s.throughput)
        self._track(now)
        moving = self._cover_the_rest(now, s)
        self._announce(now, s)
        if self.c.rebalance and not moving:  # a move schedules the next check when it is done
            self._schedule_check(now, s)
        self.join_standby(now)  # the pool gets a new standby

    def _cover_the_rest(self, now: float, s: _Server) -> bool:
        """Blocks of the hole outside what it held: it serves its blocks meanwhile and loads the
        window of its length with the most uncovered blocks (a move, as ``plan_move`` would make)."""
        truth = self.swarm.truth.copy()
        truth[s.span.start : s.span.end] -= s.throughput
        if not (np.delete(truth, range(s.span.start, s.span.end)) <= 1e-9).any():
            return False
        start = choose_start(np.maximum(truth, 0.0), s.length, s.span.start)
        if start == s.span.start:
            return False
        s.target = Span(start, start + s.length)
        new_blocks = len(set(range(s.target.start, s.target.end)) - set(range(s.span.start, s.span.end)))
        self.stats["moves"] += 1
        self.stats["blocks_reloaded"] += new_blocks
        self._at(now + self.c.load_seconds_per_block * new_blocks, _Ev.MOVED, s.id)
        return True

    def _schedule_check(self, now: float, s: _Server) -> None:
        self._at(now + self.c.balance_period * self.timing.uniform(0.5, 1.5), _Ev.CHECK, s.id)

    def _decide(self, s: _Server):
        return plan_move(self.swarm.others(s.id), s.span, s.throughput, self.c.placement)

    def check(self, now: float, s: _Server) -> None:
        self.stats["checks"] += 1
        if self._decide(s).move:
            self._at(now + self.timing.uniform(0, self.c.move_jitter), _Ev.CONFIRM, s.id)
        else:
            self._schedule_check(now, s)

    def confirm(self, now: float, s: _Server) -> None:
        """A fresh look before moving: another server may have moved meanwhile."""
        decision = self._decide(s)
        if not decision.move:
            self._schedule_check(now, s)
            return
        s.target = decision.target
        new_blocks = len(set(range(s.target.start, s.target.end)) - set(range(s.span.start, s.span.end)))
        self.stats["moves"] += 1
        self.stats["blocks_reloaded"] += new_blocks
        if now >= self.c.warmup_hours * 3600:
            self.stats["moves_after_warmup"] += 1
            self.stats["blocks_reloaded_after_warmup"] += new_blocks
        self._announce(now, s)
        self._at(now + self.c.load_seconds_per_block * new_blocks, _Ev.MOVED, s.id)

    def moved(self, now: float, s: _Server) -> None:
        self._truth(s.span, -s.throughput)
        s.span, s.target = s.target, None
        self._truth(s.span, s.throughput)
        self._track(now)
        self._schedule_check(now, s)

    def leave(self, now: float, sid: int | None = None, crashed: bool | None = None) -> _Server:
        if sid is None:
            sid = self.alive[self.rng.randrange(len(self.alive))]
        s = self.servers[sid]
        s.alive = False
        last = self.alive.pop()
        if last != sid:
            index = self._alive_index[sid]
            self.alive[index] = last
            self._alive_index[last] = index
        del self._alive_index[sid]
        if s.standby:
            self._hold(s.held, -1)
            self._hold(s.target, -1)
        self._truth(s.span, -s.throughput)
        self._track(now)
        self.stats["leaves"] += 1
        if crashed is None:
            crashed = self.rng.random() < self.c.crash_fraction
        self._announce(now, s, delay=self.c.record_ttl if crashed else self.c.dht_delay)
        return s

    def exodus(self, now: float) -> None:
        limit = self.c.exodus_fraction * self.c.num_blocks
        for sid in [i for i in self.alive if not self.servers[i].standby and self.servers[i].placed.start < limit]:
            self.leave(now, sid, crashed=True)

    def _track(self, now: float) -> None:
        """Coverage bookkeeping after the truth changed: hole durations, and standbys that notice."""
        uncovered = bool((self.swarm.truth <= 1e-9).any())
        warm = self.c.warmup_hours * 3600
        if uncovered and self.hole_since is None:
            self.hole_since = now
        elif not uncovered and self.hole_since is not None:
            if now > warm:
                self.uncovered_seconds += now - max(self.hole_since, warm)
                if self.hole_since >= warm:
                    self.hole_durations.append(now - self.hole_since)
            self.hole_since = None
        if uncovered:
            for sid in self.standbys:
                self._watch(now, self.servers[sid])

    @property
    def standbys(self) -> list[int]:
        return [sid for sid in self.alive if self.servers[sid].standby]

    def sample(self, now: float) -> None:
        truth = self.swarm.truth
        # loading ones too: the bound counts every server present, but not the standbys, which serve nothing
        present = (s for s in (self.servers[i] for i in self.alive) if not s.standby)
        bound = upper_bound(self.c.num_blocks, ((s.throughput, s.memory) for s in present))
        self.samples.append((now / 3600, float(truth.min()), bound, int((truth <= 1e-9).sum())))

    # --- run ---

    def run(self) -> SimSummary:
        c = self.c
        started = time.perf_counter()
        end = c.hours * 3600
        for _ in range(c.num_servers):
            self._at(self.rng.uniform(0, c.join_minutes * 60), _Ev.JOIN)
        self.num_standbys = round(c.standby_fraction * c.num_servers)
        for _ in range(self.num_standbys):
            self._at(self.rng.uniform(0, c.join_minutes * 60), _Ev.JOIN, payload=True)
        if c.churn_per_hour > 0:
            rate = c.churn_per_hour * c.num_servers / 3600
            t = c.join_minutes * 60
            while (t := t + self.rng.expovariate(rate)) < end:
                self._at(t, _Ev.LEAVE)
        if c.exodus_hour is not None:
            self._at(c.exodus_hour * 3600, _Ev.EXODUS)
        for i in range(int(end // c.sample_period) + 1):
            self._at(i * c.sample_period, _Ev.SAMPLE)
        while self.events:
            now, kind, _, sid, payload = heapq.heappop(self.events)
            if now > end:
                break
            self._dispatch(now, _Ev(kind), sid, payload)
        if self.hole_since is not None:  # a hole still open at the end counts until the end
            self.uncovered_seconds += end - max(self.hole_since, c.warmup_hours * 3600)
        return self._summary(time.perf_counter() - started)

    def _dispatch(self, now: float, kind: _Ev, sid: int, payload: object) -> None:
        if kind == _Ev.VIEW:
            self.swarm.set_view(sid, payload)  # type: ignore[arg-type]
        elif kind == _Ev.JOIN:
            self.join(now, standby=bool(payload))
        elif kind == _Ev.LEAVE:
            left = self.leave(now)
            self.join(now, standby=left.standby)  # churn replaces the server (a standby by a standby)
        elif kind == _Ev.SAMPLE:
            self.sample(now)
        elif kind == _Ev.EXODUS:
            self.exodus(now)
        else:
            s = self.servers[sid]
            if not s.alive:
                return
            {_Ev.ONLINE: self.online, _Ev.MOVED: self.moved, _Ev.CHECK: self.check,
             _Ev.CONFIRM: self.confirm, _Ev.STANDBY_READY: self.standby_ready,
             _Ev.STANDBY_CHECK: self.standby_check, _Ev.TAKEOVER: self.takeover}[kind](now, s)

    def _summary(self, runtime: float) -> SimSummary:
        hours, bottleneck, bound, uncovered = (list(x) for x in zip(*self.samples, strict=True))
        after = [(b, u) for h, b, u in zip(hours, bottleneck, bound, strict=True) if h >= self.c.warmup_hours]
        ratios = np.array([max(0.0, b / u) if u > 0 else 0.0 for b, u in after])
        return SimSummary(
            config=self.c, mean_ratio=float(ratios.mean()), min_ratio=float(ratios.min()),
            p5_ratio=float(np.percentile(ratios, 5)), mean_bottleneck=float(np.mean([b for b, _ in after])),
            mean_upper_bound=float(np.mean([u for _, u in after])), runtime_s=runtime,
            hours=hours, bottleneck=bottleneck, bound=bound, uncovered=uncovered, **self.stats,
            covered_fraction=1 - self.uncovered_seconds / max(1e-9, (self.c.hours - self.c.warmup_hours) * 3600),
            holes=len(self.hole_durations), mean_hole_seconds=float(np.mean(self.hole_durations or [0.0])),
            max_hole_seconds=float(max(self.hole_durations or [0.0])), standbys=self.num_standbys,
            **self.standby_stats,
        )


def simulate(config: SimConfig) -> SimSummary:
    return Simulation(config).run()
