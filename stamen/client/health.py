"""Reading the swarm's health: the DHT's records, with every online server pinged (one view for
``stamen health`` and the dashboard), and the training stages among them."""

from __future__ import annotations

import asyncio

from hivemind import DHT
from hivemind.p2p import PeerID
from pydantic import BaseModel

from stamen.client import loop
from stamen.dht.accusations import accused_counts, fetch_accusations
from stamen.dht.health import ServerRow, SwarmHealth, swarm_health
from stamen.dht.records import ServerRecord, ServerState, fetch_servers
from stamen.rpc.calls import ping
from stamen.types import ModelName


class StagePeer(BaseModel):
    peer_id: str
    epoch: int
    """Optimizer steps this peer's stage had taken when it announced."""
    samples: int
    """Samples it accumulated towards the next step."""
    live: bool


class StageRow(BaseModel):
    """The training servers (``--train``) of one span and averaging: a stage."""

    start: int
    end: int
    averaging: str
    optimizer: str
    target_batch_size: int
    epoch: int
    """The highest epoch among its live peers (-1: none live)."""
    peers: list[StagePeer]


class TrainingHealth(SwarmHealth):
    """``SwarmHealth`` with the swarm's training stages."""

    stages: list[StageRow] = []


async def ping_all(dht: DHT, peers: list[str], timeout: float = 2.0) -> dict[str, float | None]:
    """Round trips to ``peers``, pinged together (None: no answer within ``timeout`` seconds)."""
    if not peers:
        return {}
    p2p = await dht.replicate_p2p()
    rtts = await asyncio.gather(*(ping(p2p, PeerID.from_base58(p), timeout) for p in peers))
    return dict(zip(peers, rtts, strict=True))


def read_health(dht: DHT, model: ModelName, num_blocks: int, ping_timeout: float = 2.0) -> TrainingHealth:
    """The swarm as its records say, counting only online servers that answer a ping (on the
    client loop, where hivemind's P2P replica must stay)."""
    records = fetch_servers(dht, model, num_blocks)
    online = [p for p, r in records.items() if r.state == ServerState.ONLINE]
    health = swarm_health(model, num_blocks, records, loop.run(ping_all(dht, online, ping_timeout)),
                          accused=accused_counts(fetch_accusations(dht, model)))
    return TrainingHealth(**dict(health), stages=stages_of(records, health.servers))


def stages_of(records: dict[str, ServerRecord], rows: list[ServerRow]) -> list[StageRow]:
    """The stages of training servers that announced one (online or not), by span and averaging."""
    live = {row.peer_id: row.live for row in rows}
    groups: dict[tuple[int, int, str], list[tuple[str, ServerRecord]]] = {}
    for peer, record in records.items():
        if record.stage is not None and record.state != ServerState.OFFLINE:
            groups.setdefault((record.start, record.end, record.stage.averaging), []).append((peer, record))
    stages = []
    for (start, end, averaging), members in sorted(groups.items()):
        peers = [StagePeer(peer_id=p, epoch=r.stage.epoch, samples=r.stage.samples, live=live.get(p, False))
                 for p, r in sorted(members)]
        first = members[0][1].stage
        stages.append(StageRow(start=start, end=end, averaging=averaging, optimizer=first.optimizer,
                               target_batch_size=first.target_batch_size, peers=peers,
                               epoch=max((p.epoch for p in peers if p.live), default=-1)))
    return stages


def format_stages(stages: list[StageRow]) -> str:
    """What ``stamen health`` prints about training stages (nothing when there is none)."""
    if not stages:
        return ""
    lines = ["training stages (blocks, averaging: epoch; peers with epoch and samples towards the next step):"]
    for s in stages:
        peers = ", ".join(f"…{p.peer_id[-12:]} epoch {p.epoch} {p.samples}/{s.target_batch_size}"
                          + ("" if p.live else " (not live)") for p in s.peers)
        epoch = "no live peer" if s.epoch < 0 else f"epoch {s.epoch}"
        lines.append(f"  [{s.start}:{s.end}) {s.averaging} {s.optimizer}: {epoch}; {peers}")
    return "\n".join(lines)
