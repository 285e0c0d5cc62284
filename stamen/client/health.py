"""Reading the swarm's health: the DHT's records, with every online server pinged (one view for
``stamen health`` and the dashboard)."""

from __future__ import annotations

import asyncio

from hivemind import DHT
from hivemind.p2p import PeerID

from stamen.client import loop
from stamen.dht.accusations import accused_counts, fetch_accusations
from stamen.dht.health import SwarmHealth, swarm_health
from stamen.dht.records import ServerState, fetch_servers
from stamen.rpc.calls import ping
from stamen.types import ModelName


async def ping_all(dht: DHT, peers: list[str], timeout: float = 2.0) -> dict[str, float | None]:
    """Round trips to ``peers``, pinged together (None: no answer within ``timeout`` seconds)."""
    if not peers:
        return {}
    p2p = await dht.replicate_p2p()
    rtts = await asyncio.gather(*(ping(p2p, PeerID.from_base58(p), timeout) for p in peers))
    return dict(zip(peers, rtts, strict=True))


def read_health(dht: DHT, model: ModelName, num_blocks: int, ping_timeout: float = 2.0) -> SwarmHealth:
    """The swarm as its records say, counting only online servers that answer a ping (on the
    client loop, where hivemind's P2P replica must stay)."""
    records = fetch_servers(dht, model, num_blocks)
    online = [p for p, r in records.items() if r.state == ServerState.ONLINE]
    return swarm_health(model, num_blocks, records, loop.run(ping_all(dht, online, ping_timeout)),
                        accused=accused_counts(fetch_accusations(dht, model)))
