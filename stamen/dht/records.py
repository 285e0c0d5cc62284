"""Server records on the hivemind DHT: one key per block, one subkey per server.

Key ``"{model}.{block}"``, subkey: the server's owner subkey (``[owner:<its public key>]``, signed
by that key; see ``dht/node.py``), value: a ``ServerRecord`` as a plain dict. A reader takes the
server's peer id from the subkey's key, never from the value. Both sides live here: ``announce``
(servers) next to ``fetch_servers`` (clients).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from functools import partial

from hivemind import DHT
from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import get_dht_time
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stamen.dht.node import MAX_RECORD_TTL, SwarmDHT, owner_peer_id
from stamen.types import ModelName, PeerIDStr, Span

logger = logging.getLogger(__name__)


class ServerState(enum.StrEnum):
    JOINING = "joining"
    ONLINE = "online"
    OFFLINE = "offline"
    STANDBY = "standby"
    """Holds blocks without serving them, to go online when they lose their servers
    (``server/standby.py``); counts toward no route, no placement of others and no coverage."""


class StageInfo(BaseModel):
    """A training server's stage (``stamen server --train``): its peers share parameters and step
    together (``server/stage.py``)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    epoch: int = Field(ge=0)
    """Optimizer steps the stage has taken."""
    samples: int = Field(ge=0)
    """Samples this peer accumulated towards the next step."""
    target_batch_size: int = Field(gt=0)
    averaging: str
    """plain, powersgd or acp."""
    optimizer: str
    """sgd or adamw."""


class ServerRecord(BaseModel):
    """What a server announces about itself for each block it hosts."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    state: ServerState
    """joining (loading weights), online (serving), offline (leaving), standby (holding blocks, serving none)."""
    start: int = Field(ge=0)
    """First block of the server's span."""
    end: int = Field(gt=0)
    """One past the last block of the server's span."""
    throughput: float = Field(ge=0)
    """Single-token inference steps per second through one block (higher is faster)."""
    cache_tokens_left: int = Field(ge=0)
    """Tokens (batch × length) of KV cache the server can still give to new sessions."""
    dtype: str
    """The server's compute dtype; activations travel in it."""
    version: str
    """Stamen version of the server."""
    public_name: str | None = None
    """Optional human-readable name."""
    next_pings: dict[str, float] = Field(default_factory=dict)
    """Round-trip seconds to servers hosting the block after this span, as this server measured them."""
    forward_throughput: float | None = Field(default=None, ge=0)
    """Tokens per second through one block in forward batches (None: not measured)."""
    network_bandwidth: float | None = Field(default=None, ge=0)
    """Bytes per second this server sent to a peer of the swarm when it started (None: no peer to measure)."""
    moving_to: tuple[int, int] | None = None
    """(start, end) of the span the server is loading to move to; placement counts it there already."""
    quant: str | None = None
    """How the server's block weights are quantized ("int8", "nf4"); None: not quantized."""
    claimed_at: float | None = None
    """A standby's claim (DHT time) to go online for uncovered blocks of its span: of several
    standbys that claim the same hole, the earliest claim takes it (``server/standby.py``)."""
    sessions: int = Field(default=0, ge=0)
    """Inference sessions open on the server when it announced (load)."""
    queued_steps: float = Field(default=0.0, ge=0)
    """Inference steps waiting for compute, on average over the iterations since the last
    announcement (load; 0 for a server that does not batch or was idle)."""
    stage: StageInfo | None = None
    """Set by a server whose blocks train (``--train``); None: frozen blocks."""
    announced_at: float | None = None
    """DHT time (seconds since the epoch) of this announcement, set by ``announce``."""
    ttl: float | None = Field(default=None, gt=0)
    """Seconds this announcement was stored for, set by ``announce``; a server announces again every
    ``ttl / ANNOUNCES_PER_TTL`` seconds while it runs."""

    @property
    def span(self) -> Span:
        return Span(self.start, self.end)

    @property
    def placed_span(self) -> Span:
        """Where this server's throughput counts for placement: its target while it moves."""
        return Span(*self.moving_to) if self.moving_to else self.span


@dataclass(frozen=True)
class RemoteServer:
    """A server as a client sees it: its peer id and record."""

    peer_id: PeerIDStr
    record: ServerRecord

    @property
    def span(self) -> Span:
        return self.record.span


def block_key(model: ModelName, block: int) -> str:
    return f"{model}.{block}"


ANNOUNCES_PER_TTL = 3
"""A server announces itself this many times per record TTL (every ``ttl / 3`` seconds)."""


def announce(dht: SwarmDHT, model: ModelName, record: ServerRecord, ttl: float, also_blocks: range = range(0)) -> None:
    """Store ``record`` under every block of its span (and of ``also_blocks``: a moved server
    overwrites its old blocks' records), under this peer's owner subkey, stamped with the time and
    ``ttl``; it expires after ``ttl`` seconds (at most ``MAX_RECORD_TTL``) unless renewed."""
    if ttl > MAX_RECORD_TTL:
        raise ValueError(f"a record TTL of {ttl} s is over the {MAX_RECORD_TTL:.0f} s that DHT peers accept")
    blocks = sorted(set(range(record.start, record.end)) | set(also_blocks))
    keys = [block_key(model, b) for b in blocks]
    now = get_dht_time()
    value = record.model_copy(update=dict(announced_at=now, ttl=ttl)).model_dump(mode="json")
    dht.run_coroutine(partial(_store_many, keys=keys, subkey=dht.owner_subkey, value=value, expiration=now + ttl))


async def _store_many(dht: DHT, node: DHTNode, keys: list[str], subkey: bytes, value: dict, expiration: float) -> None:
    await node.store_many(keys, [value] * len(keys), expiration, subkeys=[subkey] * len(keys))


def fetch_servers(dht: DHT, model: ModelName, num_blocks: int,
                  blocks: list[int] | None = None) -> dict[PeerIDStr, ServerRecord]:
    """Every server announced for any block of the model (or of ``blocks``), by peer id (latest record
    wins). A record counts only under an owner subkey, as the record of that key's peer (the DHT's
    validators checked its signature); whatever peer id its value may claim is ignored."""
    keys = [block_key(model, b) for b in (range(num_blocks) if blocks is None else blocks)]
    found = dht.run_coroutine(partial(_get_many, keys=keys))
    servers: dict[PeerIDStr, ServerRecord] = {}
    expirations: dict[PeerIDStr, float] = {}
    for key in keys:
        entry = found.get(key)
        if entry is None or not isinstance(entry.value, dict):
            continue
        for subkey, item in entry.value.items():
            peer = owner_peer_id(subkey)
            if peer is None:
                logger.debug("ignoring a record under %s that no key owns", key)
                continue
            try:
                record = ServerRecord.model_validate(item.value)
            except ValidationError:
                logger.debug("ignoring a malformed record of %s under %s", peer, key)
                continue
            if peer not in servers or item.expiration_time > expirations[peer]:
                servers[peer], expirations[peer] = record, item.expiration_time
    return servers


async def _get_many(dht: DHT, node: DHTNode, keys: list[str]) -> dict:
    return await node.get_many(keys, sufficient_expiration_time=float("inf"))
