"""Standby servers (``stamen server --standby``): hold blocks unserved, go online when they lose their servers.

A standby loads the span the swarm can least afford to lose (``placement.standby_start``: the
blocks held by the fewest other standbys, then with the fewest servers, then the lowest
throughput), announces itself ``standby`` (no route, no placement of other servers and no coverage
counts it) and registers no handlers, so it serves nothing. Every ``--standby-ping-period`` it reads
the records of its blocks and pings the servers announced online there (``rpc.calls.ping``): a
killed server's online record stays in the DHT until it expires, so records alone would notice a
crash only after their TTL. When a block it holds is left without a live server, it waits
uniform(0, ``--standby-jitter``), looks again, claims the hole in its record
(``ServerRecord.claimed_at``), waits ``CLAIM_SETTLE`` seconds and looks once more: if no earlier
claim of another standby covers the blocks (``placement.takeover_blocks``) and they still lack a
server, it registers its handlers and announces itself online for its blocks at once, with no
loading. If the hole reaches past its blocks, it then moves to the window that covers most of it
(``placement.rest_of_hole``), loading only the blocks it lacks (``load_span(reuse=...)``). An
auto-placed standby re-chooses its blocks as the swarm changes (``placement.plan_standby``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from hivemind.p2p import PeerID
from hivemind.utils.timed_storage import get_dht_time
from prometheus_client import Counter

from stamen.dht.health import is_stale
from stamen.dht.records import ANNOUNCES_PER_TTL, ServerRecord, ServerState, announce, fetch_servers
from stamen.models import load_span
from stamen.rpc.calls import ping
from stamen.server.placement import (
    MoveDecision,
    block_throughputs,
    plan_standby,
    rest_of_hole,
    standby_start,
    takeover_blocks,
)
from stamen.types import Span, missing_blocks

logger = logging.getLogger(__name__)

PING_TIMEOUT = 2.0
"""Seconds a watched server has to answer a ping (what clients allow before they ban a server)."""
CLAIM_SETTLE = 0.5
"""Seconds between a standby's claim and its last look: long enough for other standbys' claims
made meanwhile to reach the DHT, so that every claimant sees the same claims."""
CLAIM_WINDOW = 10.0
"""Seconds a claim counts: a claimant goes online or withdraws well within it; an older claim is
one whose standby died while claiming."""


class _Host(Protocol):
    """What a standby uses of its ``Server`` (``server/server.py``)."""

    config: Any
    model_name: str
    span: Span | None
    tag: str
    _metrics_of: Any

    def _record(self, state: ServerState, speed: Any, cache_left: int) -> ServerRecord: ...
    def _announce(self, dht: Any, peer_id: str, state: ServerState, speed: Any, cache_left: int,
                  next_pings: dict[str, float] | None = None, also_blocks: range = range(0)) -> None: ...
    async def _stopped_within(self, seconds: float) -> bool: ...
    async def _move(self, s: Any, decision: MoveDecision) -> None: ...


def pool_view(records: dict[str, ServerRecord], num_blocks: int,
              me: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block, from the records of everyone but ``me``: servers (joining or online, moving ones
    at their target), standbys, and the servers' summed throughput; ``standby_start``'s inputs."""
    servers = [r for p, r in records.items() if p != me and r.state in (ServerState.ONLINE, ServerState.JOINING)]
    counts = block_throughputs(num_blocks, [(r.placed_span, 1.0) for r in servers])
    standbys = block_throughputs(num_blocks, [(r.span, 1.0) for p, r in records.items()
                                              if p != me and r.state == ServerState.STANDBY])
    totals = block_throughputs(num_blocks, [(r.placed_span, r.throughput) for r in servers])
    return counts, standbys, totals


def choose_standby_span(records: dict[str, ServerRecord], num_blocks: int, length: int, me: str) -> Span:
    """The span of ``length`` blocks a joining standby holds (``placement.standby_start``)."""
    length = min(length, num_blocks)
    start = standby_start(*pool_view(records, num_blocks, me), length)
    return Span(start, start + length)


@dataclass
class _Look:
    """What a standby saw of its blocks in one look."""

    uncovered: list[int]
    """Its blocks without a live server."""
    records: dict[str, ServerRecord]
    live: list[str]
    """Servers announced online on its blocks that answered (or were not due for a ping)."""
    gone: list[str] = field(default_factory=list)
    """Servers announced online on its blocks that did not answer, or whose record is stale."""


class StandbyCounters:
    """A standby's Prometheus counters, in its server's registry (``server/metrics.py``)."""

    def __init__(self, registry) -> None:
        self.takeovers = Counter("stamen_standby_takeovers", "Times this standby went online for a hole",
                                 registry=registry)
        self.blocks_served = Counter("stamen_standby_blocks_served_at_takeover",
                                     "Blocks a takeover served at once, from the weights it held", registry=registry)
        self.blocks_loaded = Counter("stamen_standby_blocks_loaded_at_takeover",
                                     "Blocks loaded at takeovers (holes reaching past the held blocks)",
                                     registry=registry)
        self.blocks_held = Counter("stamen_standby_blocks_loaded",
                                   "Blocks loaded while standby (joining the pool, re-choosing)", registry=registry)


class Standby:
    """A server's standby phase: from its first standby announcement until it goes online (or stops)."""

    def __init__(self, server: _Host, serving: Any, handler: Any):
        self.server, self.s, self.handler = server, serving, handler
        self.config = server.config
        self.num_blocks: int = serving.block_config.num_blocks
        self.counters = StandbyCounters(server._metrics_of.registry)
        self.counters.blocks_held.inc(server.span.length)
        self._failed: dict[str, float | None] = {}
        """Servers that did not answer, with the announcement time of the record they failed under:
        pinged again only once they announce again."""
        self._move_task: asyncio.Task | None = None
        self.takeovers = 0

    @property
    def held(self) -> Span:
        return self.server.span

    def _who(self) -> str:
        return f"{self.s.peer_id[-6:]} {self.server.tag}"

    async def hold(self) -> bool:
        """Hold the blocks until they need this server; True once it is online (its handlers
        registered, announced online), False if it was asked to stop first."""
        cfg, rng = self.config, random.Random()
        logger.info("%s standby holding blocks %s: not serving; watching their servers every %.1f s",
                    self._who(), self.held, cfg.standby_ping_period)
        next_announce, loop = 0.0, asyncio.get_running_loop()
        next_check = loop.time() + cfg.balance_period * rng.uniform(0.5, 1.5)
        while True:
            if loop.time() >= next_announce:
                self._announce_standby()
                next_announce = loop.time() + cfg.record_ttl / ANNOUNCES_PER_TTL
            try:
                look = await self._look()
                if look.uncovered and await self._take_over(look, rng):
                    return True
                if cfg.auto_placed and loop.time() >= next_check:
                    next_check = loop.time() + cfg.balance_period * rng.uniform(0.5, 1.5)
                    await self._rechoose()
                    next_announce = 0.0
            except Exception:  # a DHT hiccup or a failed load: keep holding, look again
                logger.exception("%s standby check failed; still holding %s", self._who(), self.held)
            if await self.server._stopped_within(cfg.standby_ping_period):
                return False

    # --- looking ---

    async def _records(self, blocks: list[int] | None = None) -> dict[str, ServerRecord]:
        dht, model, n = self.s.dht, self.server.model_name, self.num_blocks
        return await asyncio.get_running_loop().run_in_executor(None, lambda: fetch_servers(dht, model, n, blocks))

    async def _look(self, blocks: Span | None = None) -> _Look:
        """The records of ``blocks`` (default: the held ones), and pings to the servers announced
        online there (those that failed a ping are pinged again only after they announce again);
        ``uncovered`` lists the held blocks among them that no live server covers."""
        held, blocks = self.held, blocks or self.held
        records = await self._records(list(range(blocks.start, blocks.end)))
        now = get_dht_time()
        online = {p: r for p, r in records.items() if p != self.s.peer_id and r.state == ServerState.ONLINE
                  and r.start < blocks.end and blocks.start < r.end}
        gone = [p for p, r in online.items() if is_stale(r, now)
                or (p in self._failed and self._failed[p] == r.announced_at)]
        asked = [p for p in online if p not in gone]
        rtts = await asyncio.gather(*(ping(self.s.p2p, PeerID.from_base58(p), PING_TIMEOUT) for p in asked))
        for p, rtt in zip(asked, rtts, strict=True):
            if rtt is None:
                self._failed[p] = online[p].announced_at
                gone.append(p)
            else:
                self._failed.pop(p, None)
        live = [p for p in online if p not in gone]
        uncovered = [b for b in missing_blocks(self.num_blocks, (online[p].span for p in live)) if b in held]
        return _Look(uncovered, records, live, gone)

    def _claims(self, records: dict[str, ServerRecord]) -> list[tuple[tuple[float, str], Span]]:
        now = get_dht_time()
        return [((r.claimed_at, p), r.span) for p, r in records.items()
                if p != self.s.peer_id and r.state == ServerState.STANDBY and r.claimed_at is not None
                and now - r.claimed_at < CLAIM_WINDOW]

    # --- taking over ---

    async def _take_over(self, look: _Look, rng: random.Random) -> bool:
        """Jitter, a fresh look, a claim, a last look; online if the hole is still ours."""
        noticed = time.monotonic()
        wait = rng.uniform(0, self.config.standby_jitter)
        logger.info("%s standby: blocks %s have no live server (not answering or gone: %s); looking again in "
                    "%.2f s", self._who(), _blocks(look.uncovered), ", ".join(p[-6:] for p in look.gone) or "none",
                    wait)
        if await self.server._stopped_within(wait):
            return False
        look = await self._look()
        if not look.uncovered:
            logger.info("%s standby: blocks %s are covered again; still standby", self._who(), self.held)
            return False
        claim = (get_dht_time(), self.s.peer_id)
        self._announce_standby(claimed_at=claim[0])
        if await self.server._stopped_within(CLAIM_SETTLE):
            return False
        look = await self._look()
        mine = takeover_blocks(self.held, look.uncovered, self._claims(look.records), claim)
        if not mine:
            self._announce_standby()  # withdraw the claim
            logger.info("%s standby: another server or an earlier standby claim covers blocks %s; still standby",
                        self._who(), self.held)
            return False
        await self._go_online(look, noticed)
        return True

    async def _go_online(self, look: _Look, noticed: float) -> None:
        s = self.s
        await self.handler.add_p2p_handlers(s.p2p)  # if this fails, nothing is registered: still standby
        try:  # from here on it serves, whatever else fails (the announce loop announces it online again)
            self.server._announce(s.dht, s.peer_id, ServerState.ONLINE, s.speed, s.backend.budget.tokens_left)
            await self._took_over(look, noticed)
        except Exception:
            logger.exception("%s went online for blocks %s, but announcing or planning failed", self._who(),
                             self.held)

    async def _took_over(self, look: _Look, noticed: float) -> None:
        self.takeovers += 1
        self.counters.takeovers.inc()
        self.counters.blocks_served.inc(self.held.length)
        logger.info("%s standby taking over blocks %s (uncovered: %s) without loading: online %.2f s after "
                    "noticing the hole (takeovers: %d)", self._who(), self.held, _blocks(look.uncovered),
                    time.monotonic() - noticed, self.takeovers)
        if not self.config.auto_placed:
            return
        everywhere = await self._look(Span(0, self.num_blocks))  # the live servers of every block
        others = block_throughputs(self.num_blocks, [
            (everywhere.records[p].span, everywhere.records[p].throughput) for p in everywhere.live])
        target = rest_of_hole(others, self.held)
        if target is not None:
            new = len(set(range(target.start, target.end)) - set(range(self.held.start, self.held.end)))
            self.counters.blocks_loaded.inc(new)
            logger.info("%s took over, and the hole reaches past blocks %s: moving to %s, loading %d blocks "
                        "(blocks loaded at takeover: %d)", self._who(), self.held, target, new, new)
            decision = MoveDecision(True, target, f"the hole reaches past the held blocks {self.held}", 0.0, 0.0, 0.0)
            self._move_task = asyncio.create_task(self._move(decision))

    async def _move(self, decision: MoveDecision) -> None:
        try:
            await self.server._move(self.s, decision)
        except Exception:
            logger.exception("%s could not load the rest of the hole; serving %s", self._who(), self.server.span)

    # --- holding ---

    def _announce_standby(self, claimed_at: float | None = None) -> None:
        s, server = self.s, self.server
        if claimed_at is None:
            server._announce(s.dht, s.peer_id, ServerState.STANDBY, s.speed, s.backend.budget.tokens_left)
            return
        record = server._record(ServerState.STANDBY, s.speed, s.backend.budget.tokens_left)
        announce(s.dht, server.model_name, record.model_copy(update=dict(claimed_at=claimed_at)),
                 self.config.record_ttl)

    async def _rechoose(self) -> None:
        """Move the held blocks where the pool is thinnest or the servers fewest (``plan_standby``),
        loading only the blocks not held yet."""
        s, cfg, old = self.s, self.config, self.held
        records = await self._records()
        target = plan_standby(*pool_view(records, self.num_blocks, s.peer_id), old)
        if target is None:
            return
        new = len(set(range(target.start, target.end)) - set(range(old.start, old.end)))
        logger.info("%s standby re-choosing: blocks %s -> %s, loading %d blocks", self._who(), old, target, new)
        model = await s.backend.run_long(lambda: load_span(
            s.checkpoint, s.block_config, target, cfg.torch_dtype, cfg.device, reuse=s.backend.model, quant=cfg.quant))
        s.backend.swap_model(model)
        self.server.span = target
        self.counters.blocks_held.inc(new)
        self.server._announce(s.dht, s.peer_id, ServerState.STANDBY, s.speed, s.backend.budget.tokens_left,
                              also_blocks=range(old.start, old.end))
        self._failed.clear()
        logger.info("%s standby holding blocks %s (was %s)", self._who(), target, old)


def _blocks(blocks: list[int]) -> str:
    return ", ".join(map(str, blocks))
