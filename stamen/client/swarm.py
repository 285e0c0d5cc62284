"""The client's view of the swarm: servers read from the DHT, coverage, and routes."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from collections.abc import Collection

from hivemind.p2p import P2P, PeerID

from stamen.client import loop
from stamen.client.config import ClientConfig
from stamen.client.routing import Candidate, Hop, find_route, load_of, sample_route
from stamen.dht.accusations import Accusation, fetch_accusations, publish_accusations
from stamen.dht.node import create_dht
from stamen.dht.records import RemoteServer, ServerRecord, ServerState, fetch_servers
from stamen.errors import RemoteCallError, ServerFullError, SwarmNotReadyError
from stamen.process import check_peer_addresses, children_die_with_me
from stamen.rpc.calls import ping
from stamen.types import ModelName, PeerIDStr, Span, missing_blocks

logger = logging.getLogger(__name__)

STALE_VIEW_WAIT_S = 0.3
"""Most seconds a route waits for a stale view of the swarm to be re-read (see ``Swarm._view``)."""
ALTERNATIVE_MAX_AGE_S = 2.0
"""A view older than this is re-read before a hung server is waited on for want of a replacement."""
ALTERNATIVE_READ_S = 5.0
"""Most seconds that re-read may take (the hang detection's loop goes on with the old view)."""
_background: set[asyncio.Task] = set()
"""Pings refreshing round trips in the background (held: the loop keeps tasks only weakly)."""


class Swarm:
    """Servers of one model, read from the DHT; routes over them."""

    def __init__(self, model_name: ModelName, num_blocks: int, config: ClientConfig):
        self.model_name, self.num_blocks, self.config = model_name, num_blocks, config
        check_peer_addresses(config.initial_peers)  # before anything starts
        with children_die_with_me():  # the DHT process and its p2pd die with this process, even by SIGKILL
            try:
                self.dht = create_dht(config.initial_peers, client_mode=True)
            except Exception as e:  # raised in the DHT process: no initial peer answered, the daemon did not start
                raise RemoteCallError(f"could not join the swarm through {' '.join(config.initial_peers)}: "
                                      f"{e}") from e
        try:
            self.p2p: P2P = loop.run(self.dht.replicate_p2p())
        except BaseException:
            self.dht.shutdown()
            raise
        self._finalizer = weakref.finalize(self, _shutdown, self.p2p, self.dht)
        self._servers: dict[PeerIDStr, RemoteServer] = {}
        self._fetched_at = -float("inf")
        self._banned_until: dict[PeerIDStr, float] = {}
        self._rtts: dict[PeerIDStr, tuple[float, float]] = {}  # peer -> (rtt seconds, measured at)
        self._rng = random.Random()
        self._convicted: dict[PeerIDStr, str] = {}
        """Servers this client's own audits caught returning wrong outputs (never taken back; copy-on-write)."""
        self._accused: frozenset[PeerIDStr] = frozenset()
        """Servers that other peers accuse in the DHT (read with the view): audited at every step."""
        self.accusations: list[Accusation] = []
        """This client's own accusations, as published."""

    def convict(self, peer_id: PeerIDStr, reason: str) -> None:
        """Leave a server that failed this client's own audit out of every route and audit for
        good (``_pardon`` never takes it back, unlike a ban)."""
        logger.warning("banning %s for wrong outputs: %s", peer_id, reason)
        self._convicted = {**self._convicted, peer_id: reason}

    @property
    def convicted(self) -> dict[PeerIDStr, str]:
        return self._convicted

    def accused(self) -> frozenset[PeerIDStr]:
        """Servers accused in the DHT by peers other than this client (as of the last view read)."""
        return self._accused

    async def accuse(self, accusation: Accusation) -> None:
        """Publish an accusation (with this client's earlier ones) in the DHT, signed by its key."""
        self.accusations = [*self.accusations, accusation]
        try:
            await asyncio.to_thread(publish_accusations, self.dht, self.model_name, self.accusations)
        except Exception as e:  # evidence is best effort: the ban stands either way
            logger.warning("could not publish an accusation against %s: %r", accusation.accused, e)

    def forget_verdicts(self) -> None:
        """Take back every ban and conviction (benchmarks and tests that repeat a detection)."""
        self._convicted, self._banned_until = {}, {}

    def ban(self, peer_id: PeerIDStr, reason: str) -> None:
        """Leave a failed server out of routes for ``ban_timeout`` seconds (a fault only: a server
        that is full is avoided by the session that met it, never banned).

        ``_banned_until`` is copy-on-write: a change builds a new dict and rebinds it, so that
        ``servers()`` (in a worker thread) and concurrent sessions on the client loop never see it
        change under them, and two requests taking back the same server cannot collide."""
        logger.warning("banning %s for %.0f s: %s", peer_id, self.config.ban_timeout, reason)
        self._banned_until = {**self._banned_until, peer_id: time.monotonic() + self.config.ban_timeout}
        # when the ban expires, it must answer a ping before a route takes it again (a dead server's
        # record outlives a ban, and opening a stream to a dead peer can take 20 s to fail)
        self._rtts = {p: v for p, v in self._rtts.items() if p != peer_id}

    def has_alternative(self, peer_id: PeerIDStr, blocks: Span) -> bool:
        """Whether other servers of the current view (less the banned) cover ``blocks``."""
        others = [s.span for s in self._allowed() if s.peer_id != peer_id]
        return all(any(span.start <= b < span.end for span in others) for b in range(blocks.start, blocks.end))

    async def find_alternative(self, peer_id: PeerIDStr, blocks: Span) -> bool:
        """``has_alternative``, re-reading the view from the DHT first (off the client loop, at most
        ``ALTERNATIVE_READ_S``) when the view has none and is older than ``ALTERNATIVE_MAX_AGE_S``: a
        spare that came online after the view was read must not leave a session waiting on a hung
        server until the request timeout."""
        if self.has_alternative(peer_id, blocks):
            return True
        if time.monotonic() - self._fetched_at > ALTERNATIVE_MAX_AGE_S:
            try:
                await asyncio.wait_for(asyncio.to_thread(self.servers, True), ALTERNATIVE_READ_S)
            except Exception as e:  # the old view stands
                logger.debug("could not re-read the servers of %s: %r", self.model_name, e)
        return self.has_alternative(peer_id, blocks)

    def servers(self, refresh: bool = False) -> list[RemoteServer]:
        """Online servers allowed by the config."""
        if refresh or time.monotonic() - self._fetched_at > self.config.refresh_period:
            records = fetch_servers(self.dht, self.model_name, self.num_blocks)
            self._servers = {p: RemoteServer(p, r) for p, r in records.items() if r.state == ServerState.ONLINE}
            if self.config.verify != "off":
                me = self.dht.peer_id.to_base58()
                try:
                    self._accused = frozenset(PeerIDStr(a.accusation.accused)
                                              for a in fetch_accusations(self.dht, self.model_name) if a.accuser != me)
                except Exception as e:  # the view of servers stands without them
                    logger.debug("could not read accusations: %r", e)
            self._fetched_at = time.monotonic()
        return self._allowed()

    def _allowed(self) -> list[RemoteServer]:
        """The servers of the last view read from the DHT, less the banned and those the config excludes."""
        now = time.monotonic()
        banned = {p for p, until in self._banned_until.items() if until > now}
        allowed, blocked = self.config.allowed_servers, set(self.config.blocked_servers) | banned | set(self._convicted)
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
        a server that does not answer a ping is banned. (Runs on the client loop.) Servers never
        measured are pinged before the route is chosen; a measurement over a minute old is
        refreshed in the background while the old one serves, so that a route (a failover's above
        all) never waits for the ping of a server that died meanwhile to time out (seen: 2 s of a
        failover)."""
        now = time.monotonic()
        stale = [s.peer_id for s in servers if now - self._rtts.get(s.peer_id, (0.0, -float("inf")))[1] > 60.0]
        known = [p for p in stale if p in self._rtts]
        for peer_id in known:  # marked as measured now: one refresh at a time
            self._rtts[peer_id] = (self._rtts[peer_id][0], now)
        if known:
            task = asyncio.ensure_future(self._measure(known, now))
            _background.add(task)
            task.add_done_callback(_background.discard)
        unknown = [p for p in stale if p not in known]
        if unknown:
            await self._measure(unknown, now)
        return {p: rtt for p, (rtt, _) in self._rtts.items()}

    async def _measure(self, peers: list[PeerIDStr], now: float) -> None:
        results = await self._ping_all(peers)
        for peer_id, rtt in zip(peers, results, strict=True):
            if rtt is None:
                self.ban(peer_id, "did not answer a ping")
            else:
                self._rtts[peer_id] = (rtt, now)

    async def _ping_all(self, peers: list[PeerIDStr]) -> list[float | None]:
        return await asyncio.gather(*(ping(self.p2p, self.peer(p), timeout=2.0) for p in peers))

    def route(self, blocks: Span | None = None, min_cache_tokens: int = 0) -> list[Hop]:
        """The fastest chain through ``blocks`` (from any thread but the client loop's)."""
        return loop.run(self.route_async(blocks, min_cache_tokens))

    async def route_async(self, blocks: Span | None = None, min_cache_tokens: int = 0,
                          avoid: Collection[PeerIDStr] = ()) -> list[Hop]:
        """The fastest chain through ``blocks``; without one, waits up to ``route_grace`` for servers
        to (re)appear, and takes back banned servers that still answer a ping if nothing else
        covers the blocks (see ``_pardon``). ``avoid``: servers that just answered "full" to this
        caller; if every route passes one of them, ``ServerFullError`` at once (the caller may wait
        for cache to free up and ask again)."""
        blocks = blocks or Span(0, self.num_blocks)
        deadline, refresh, pardoned = time.monotonic() + self.config.route_grace, False, False
        while True:
            servers = await self._view(refresh)
            rtts = await self.client_rtts(servers)
            candidates = [
                Candidate(s.peer_id, s.span, s.record.throughput, s.record.cache_tokens_left,
                          {PeerIDStr(p): r for p, r in s.record.next_pings.items()},
                          load_of(s.record.sessions, s.record.queued_steps))
                for s in self._allowed()  # without any server that failed its ping
            ]
            usable = [c for c in candidates if c.peer_id not in avoid]
            route = find_route(usable, blocks, client_rtt=rtts, push=self.config.use_push,
                               min_cache_tokens=min_cache_tokens)
            if route is not None:
                return route
            if len(usable) < len(candidates) and find_route(candidates, blocks, client_rtt=rtts) is not None:
                raise ServerFullError(f"every route through blocks {blocks} of {self.model_name} passes a full "
                                      f"server ({', '.join(sorted(p[-6:] for p in avoid))})")
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

    async def _view(self, refresh: bool) -> list[RemoteServer]:
        """``servers(refresh)`` for a route, read off the client loop (which other sessions share).
        A view that is only stale (older than ``refresh_period``) is re-read, but the route waits at
        most ``STALE_VIEW_WAIT_S`` for it and meanwhile uses the old one: reading the DHT can take
        seconds right after a DHT peer died, and that peer is typically the server being replaced
        (seen: 4 s of a 4.2 s failover). The read goes on in the background for later routes."""
        if refresh or not self._servers or time.monotonic() - self._fetched_at <= self.config.refresh_period:
            return await asyncio.to_thread(self.servers, refresh)
        task = getattr(self, "_refreshing", None)
        if task is None or task.done():
            task = self._refreshing = asyncio.ensure_future(asyncio.to_thread(self.servers, True))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # failures: the old view stays
        done, _ = await asyncio.wait([task], timeout=STALE_VIEW_WAIT_S)
        return task.result() if done and not task.cancelled() and task.exception() is None else self._allowed()

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
        # concurrent requests pardon the same server at once: whoever comes second finds it gone
        # (and a ban made while the pings ran stays)
        bans = self._banned_until
        taken_back = {p for p, _ in alive if p in bans and bans[p] <= now + self.config.ban_timeout}
        if taken_back:
            logger.warning("no route without banned %s, which answer pings: using them again",
                           ", ".join(sorted(taken_back)))
            self._banned_until = {p: t for p, t in self._banned_until.items() if p not in taken_back}
        for peer_id, rtt in alive:
            self._rtts[peer_id] = (rtt, now)
        return bool(alive)

    def forward_route(self, blocks: Span) -> list[Hop]:
        """A chain for stateless calls, drawn so that load spreads in proportion to throughput."""
        candidates = [Candidate(s.peer_id, s.span, s.record.throughput) for s in self.servers()]
        route = sample_route(candidates, blocks, self._rng)
        if route is None:
            return self.route(blocks)  # raises SwarmNotReadyError naming the missing blocks
        return route

    def covering(self, blocks: Span, exclude: Collection[PeerIDStr] = ()) -> list[RemoteServer]:
        """Servers of the current view (less the banned, convicted and ``exclude``) hosting all of ``blocks``."""
        return [s for s in self._allowed()
                if s.peer_id not in exclude and s.span.start <= blocks.start and blocks.end <= s.span.end]

    def record_of(self, peer_id: PeerIDStr) -> ServerRecord | None:
        server = self._servers.get(peer_id)
        return server.record if server else None

    def dtype_of(self, peer_id: PeerIDStr) -> str:
        server = self._servers.get(peer_id)
        return server.record.dtype if server else "float32"

    @staticmethod
    def peer(peer_id: PeerIDStr) -> PeerID:
        return PeerID.from_base58(peer_id)

    def shutdown(self) -> None:
        """Close the libp2p client on the client loop, then stop the DHT process (and its daemon).
        Runs once; a swarm nobody shut down is shut down when it is collected or at interpreter exit."""
        self._finalizer()


def _shutdown(p2p: P2P, dht) -> None:
    """``Swarm.shutdown``, holding no reference to the swarm (a ``weakref.finalize`` callback). The
    libp2p client's tasks live on the client loop and are cancelled there: closed from another
    thread (hivemind's ``P2P.__del__`` when the garbage collector gets it), hivemind looks for a
    current event loop in that thread and prints "There is no current event loop"."""
    try:
        if loop.is_running() and not loop.on_loop_thread():
            loop.run(p2p.shutdown(), timeout=10)
        else:  # on the loop (nothing to wait for), or after the loop's own shutdown (its tasks are done)
            p2p._terminate()
    finally:
        dht.shutdown()


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
