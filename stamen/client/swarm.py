"""The client's view of the swarm: servers read from the DHT, coverage, and routes."""

from __future__ import annotations

import asyncio
import logging
import random
import time

from hivemind import DHT
from hivemind.p2p import P2P, PeerID

from stamen.client import loop
from stamen.client.config import ClientConfig
from stamen.client.routing import Candidate, Hop, find_route, sample_route
from stamen.dht.records import RemoteServer, ServerState, fetch_servers
from stamen.errors import SwarmNotReadyError
from stamen.rpc.calls import ping
from stamen.types import ModelName, PeerIDStr, Span, missing_blocks

logger = logging.getLogger(__name__)


class Swarm:
    """Servers of one model, read from the DHT; routes over them."""

    def __init__(self, model_name: ModelName, num_blocks: int, config: ClientConfig):
        self.model_name, self.num_blocks, self.config = model_name, num_blocks, config
        self.dht = DHT(initial_peers=config.initial_peers, start=True, client_mode=True)
        self.p2p: P2P = loop.run(self.dht.replicate_p2p())
        self._servers: dict[PeerIDStr, RemoteServer] = {}
        self._fetched_at = -float("inf")
        self._banned_until: dict[PeerIDStr, float] = {}
        self._rtts: dict[PeerIDStr, tuple[float, float]] = {}  # peer -> (rtt seconds, measured at)
        self._rng = random.Random()

    def ban(self, peer_id: PeerIDStr, reason: str) -> None:
        """Leave a failed server out of routes for ``ban_timeout`` seconds."""
        logger.warning("banning %s for %.0f s: %s", peer_id, self.config.ban_timeout, reason)
        self._banned_until[peer_id] = time.monotonic() + self.config.ban_timeout

    def servers(self, refresh: bool = False) -> list[RemoteServer]:
        """Online servers allowed by the config."""
        if refresh or time.monotonic() - self._fetched_at > self.config.refresh_period:
            records = fetch_servers(self.dht, self.model_name, self.num_blocks)
            self._servers = {p: RemoteServer(p, r) for p, r in records.items() if r.state == ServerState.ONLINE}
            self._fetched_at = time.monotonic()
        now = time.monotonic()
        banned = {p for p, until in self._banned_until.items() if until > now}
        allowed, blocked = self.config.allowed_servers, set(self.config.blocked_servers) | banned
        return [
            s for s in self._servers.values()
            if s.peer_id not in blocked and (allowed is None or s.peer_id in allowed)
        ]

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Block until online servers cover every block, or raise SwarmNotReadyError naming the gaps."""
        deadline = time.monotonic() + (self.config.connect_timeout if timeout is None else timeout)
        delay = 0.1
        while True:
            missing = missing_blocks(self.num_blocks, (s.span for s in self.servers(refresh=True)))
            if not missing:
                return
            if time.monotonic() > deadline:
                raise SwarmNotReadyError(
                    f"no online servers for blocks {_ranges(missing)} of {self.model_name} "
                    f"({self.num_blocks} blocks) after waiting", missing
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    async def client_rtts(self, servers: list[RemoteServer]) -> dict[PeerIDStr, float]:
        """Round trips from this client to ``servers``, each pinged at most once a minute;
        a server that does not answer a ping is banned. (Runs on the client loop.)"""
        now = time.monotonic()
        stale = [s.peer_id for s in servers if now - self._rtts.get(s.peer_id, (0.0, -float("inf")))[1] > 60.0]
        if stale:
            results = await self._ping_all(stale)
            for peer_id, rtt in zip(stale, results, strict=True):
                if rtt is None:
                    self.ban(peer_id, "did not answer a ping")
                else:
                    self._rtts[peer_id] = (rtt, now)
        return {p: rtt for p, (rtt, _) in self._rtts.items()}

    async def _ping_all(self, peers: list[PeerIDStr]) -> list[float | None]:
        return await asyncio.gather(*(ping(self.p2p, self.peer(p), timeout=2.0) for p in peers))

    def route(self, blocks: Span | None = None, min_cache_tokens: int = 0) -> list[Hop]:
        """The fastest chain through ``blocks`` (from any thread but the client loop's)."""
        return loop.run(self.route_async(blocks, min_cache_tokens))

    async def route_async(self, blocks: Span | None = None, min_cache_tokens: int = 0) -> list[Hop]:
        """The fastest chain through ``blocks``; without one, waits up to ``route_grace`` for servers
        to (re)appear, and takes back banned servers that still answer a ping if nothing else
        covers the blocks (see ``_pardon``)."""
        blocks = blocks or Span(0, self.num_blocks)
        deadline, refresh, pardoned = time.monotonic() + self.config.route_grace, False, False
        while True:
            # reading the DHT blocks: do it off the client loop, which other sessions share
            servers = await asyncio.to_thread(self.servers, refresh)
            rtts = await self.client_rtts(servers)
            candidates = [
                Candidate(s.peer_id, s.span, s.record.throughput, s.record.cache_tokens_left,
                          {PeerIDStr(p): r for p, r in s.record.next_pings.items()})
                for s in self.servers()  # without any server that failed its ping
            ]
            route = find_route(candidates, blocks, client_rtt=rtts, push=self.config.use_push,
                               min_cache_tokens=min_cache_tokens)
            if route is not None:
                return route
            if not pardoned:
                pardoned = True
                if await self._pardon():
                    continue
            if refresh and time.monotonic() >= deadline:
                break
            if refresh:
                await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            refresh = True
        missing = missing_blocks(self.num_blocks, (s.span for s in self.servers()))
        raise SwarmNotReadyError(
            f"no route through blocks {blocks} of {self.model_name}: "
            + (f"blocks {_ranges(missing)} have no online server" if missing else "servers lack free cache"),
            missing,
        )

    async def _pardon(self) -> bool:
        """Unban the banned servers that still announce themselves online and answer a ping now.

        A ban steers routes around a server that failed a call; when no route exists without the
        banned servers, a live one is better than none: one failed call (a cut stream, a timeout
        under load) must not fail every request until the ban expires when that server is the
        only one for some blocks. A dead or hung server does not answer and stays banned; one that
        keeps failing is banned again by the caller, whose retries are bounded."""
        now = time.monotonic()
        banned = [p for p, until in self._banned_until.items() if until > now and p in self._servers]
        if not banned:
            return False
        results = await self._ping_all(banned)
        alive = [(p, rtt) for p, rtt in zip(banned, results, strict=True) if rtt is not None]
        for peer_id, rtt in alive:
            logger.warning("no route without banned %s, which answers pings: using it again", peer_id)
            del self._banned_until[peer_id]
            self._rtts[peer_id] = (rtt, now)
        return bool(alive)

    def forward_route(self, blocks: Span) -> list[Hop]:
        """A chain for stateless calls, drawn so that load spreads in proportion to throughput."""
        candidates = [Candidate(s.peer_id, s.span, s.record.throughput) for s in self.servers()]
        route = sample_route(candidates, blocks, self._rng)
        if route is None:
            return self.route(blocks)  # raises SwarmNotReadyError naming the missing blocks
        return route

    def dtype_of(self, peer_id: PeerIDStr) -> str:
        server = self._servers.get(peer_id)
        return server.record.dtype if server else "float32"

    @staticmethod
    def peer(peer_id: PeerIDStr) -> PeerID:
        return PeerID.from_base58(peer_id)

    def shutdown(self) -> None:
        try:
            loop.run(self.p2p.shutdown(), timeout=10)
        finally:
            self.dht.shutdown()


def _ranges(blocks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, b in enumerate(blocks):
        if start is None:
            start = b
        if i + 1 == len(blocks) or blocks[i + 1] != b + 1:
            out.append(f"{start}-{b}" if b != start else f"{b}")
            start = None
    return ", ".join(out)
