"""What a server takes from its peers before it refuses: how long it waits for a request's bytes,
how many request bytes it holds at once, how many calls and streams one peer may have open.

A refusal is a typed reply (``ServerFullError``, "server busy", for what a later try may get;
``InvalidRequestError`` for what no try will), never a stream cut under the client's writes: a
client takes a cut stream for a network fault and retries it elsewhere, banning a healthy server.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields

from stamen.errors import ServerFullError
from stamen.server.config import ServerConfig

DRAIN_S = 5.0
"""Longest a server reads (and drops) what a client still sends after the reply that ended its
call, so that the client reads the reply before the stream closes (at most ``read_timeout``)."""


@dataclass(frozen=True)
class Limits:
    """The ``ServerConfig`` fields of the same names (see their docstrings there)."""

    read_timeout: float
    request_read_timeout: float
    max_request_bytes: int
    max_peer_calls: int
    max_peer_streams: int
    max_peer_sessions: int
    peer_cache_share: float
    max_peer_queued_steps: int

    @classmethod
    def of(cls, config: ServerConfig) -> Limits:
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})

    @classmethod
    def default(cls) -> Limits:
        return cls(**{f.name: ServerConfig.model_fields[f.name].default for f in fields(cls)})

    @property
    def drain_s(self) -> float:
        return min(DRAIN_S, self.read_timeout)

    def peer_cache_limit(self, capacity: int, peers: int) -> int:
        """Cache (block-tokens) one peer may reserve while ``peers`` peers (itself included) hold
        sessions: all of it alone, else the larger of its share and 1 / ``peers``."""
        if peers <= 1:
            return capacity
        return int(capacity * max(self.peer_cache_share, 1 / peers))


class PeerSlots:
    """Calls (or streams) in flight per peer, at most ``limit`` each."""

    def __init__(self, limit: int, what: str):
        self.limit, self.what = limit, what
        self.counts: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, peer) -> Iterator[None]:
        """One slot of ``peer`` while the block runs; ``ServerFullError`` when it holds them all."""
        key = str(peer)
        held = self.counts.get(key, 0)
        if held >= self.limit:
            raise ServerFullError(f"server busy: {held} {self.what} of {key} in flight, at most {self.limit}")
        self.counts[key] = held + 1
        try:
            yield
        finally:
            self.counts[key] -= 1
            if not self.counts[key]:
                del self.counts[key]
