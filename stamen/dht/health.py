"""The swarm's state as plain data: servers, per-block coverage and throughput (for `stamen health`).

Only live servers count toward coverage: a record says what a server announced, not that it still
runs (a killed server's online record stays until it expires, up to its TTL). A server is live when
its record is online and it answered a ping (``stamen health`` pings every online server), or, when
it was not pinged, when its record is fresh (``is_stale``)."""

from __future__ import annotations

from hivemind.utils.timed_storage import get_dht_time
from pydantic import BaseModel

from stamen.dht.records import ANNOUNCES_PER_TTL, ServerRecord, ServerState
from stamen.types import Span, missing_blocks


class ServerRow(BaseModel):
    peer_id: str
    start: int
    end: int
    state: str
    throughput: float
    cache_tokens_left: int
    dtype: str
    version: str
    public_name: str | None = None
    moving_to: tuple[int, int] | None = None
    """The span a moving server is loading."""
    forward_throughput: float | None = None
    network_bandwidth: float | None = None
    quant: str | None = None
    """Quantized block weights ("int8", "nf4"), or None."""
    reachable: bool | None = None
    """Whether the server answered a ping (None: not pinged)."""
    ping_ms: float | None = None
    """The ping's round trip."""
    age: float | None = None
    """Seconds since the server announced this record (None: a server that does not say)."""
    stale: bool = False
    """An online record past the server's next announcement (``is_stale``)."""
    live: bool = False
    """Counted toward coverage: online, and answered the ping (or, not pinged, not stale)."""


class SwarmHealth(BaseModel):
    model: str
    num_blocks: int
    servers: list[ServerRow]
    block_servers: list[int]
    """Live servers per block."""
    block_throughput: list[float]
    """Summed throughput of live servers per block."""
    uncovered_blocks: list[int]
    bottleneck_throughput: float
    """The weakest block's throughput: the swarm serves at most this many steps per second."""
    unreachable: list[str] = []
    """Servers announced online that did not answer a ping (not counted)."""
    stale: list[str] = []
    """Servers announced online whose record is stale (``is_stale``)."""
    accused: dict[str, int] = {}
    """Peers accused of wrong outputs in the DHT (``dht/accusations.py``) -> how many peers accuse
    them. Evidence to audit them, not a verdict: a lying client can accuse an honest server."""
    standbys: list[str] = []
    """Standby servers: they hold blocks to take over when those lose their servers, and count
    toward nothing until then (never live)."""


STALE_GRACE = 5.0
"""Least seconds past a server's next announcement before its record counts as stale."""


def is_stale(record: ServerRecord, now: float) -> bool:
    """Whether an online record is older than its server's announce period (``ttl / ANNOUNCES_PER_TTL``)
    plus a grace (half a period, at least ``STALE_GRACE``): a server that runs announces before that,
    so the server stopped (killed, hung, cut off) and its record only waits to expire. Records of
    joining or offline servers (no period) and of servers that do not stamp the time are not stale."""
    if record.state != ServerState.ONLINE or record.announced_at is None or record.ttl is None:
        return False
    period = record.ttl / ANNOUNCES_PER_TTL
    return now - record.announced_at > period + max(period / 2, STALE_GRACE)


def swarm_health(model: str, num_blocks: int, records: dict[str, ServerRecord],
                 pings: dict[str, float | None] | None = None, now: float | None = None,
                 accused: dict[str, int] | None = None) -> SwarmHealth:
    """The swarm as ``records`` (peer id -> record) describe it, counting only live servers.
    ``pings``: peer id -> round-trip seconds, None for a server that did not answer (servers
    absent were not pinged); ``now``: DHT time (default: the clock)."""
    pings = pings or {}
    now = get_dht_time() if now is None else now
    rows = []
    for p, r in records.items():
        rtt = pings.get(p)
        reachable = (rtt is not None) if p in pings else None
        stale = is_stale(r, now)
        rows.append(ServerRow(
            peer_id=p, start=r.start, end=r.end, state=r.state.value, throughput=r.throughput,
            cache_tokens_left=r.cache_tokens_left, dtype=r.dtype, version=r.version, public_name=r.public_name,
            moving_to=r.moving_to, forward_throughput=r.forward_throughput, network_bandwidth=r.network_bandwidth,
            quant=r.quant, reachable=reachable, ping_ms=None if rtt is None else rtt * 1000,
            age=None if r.announced_at is None else max(0.0, now - r.announced_at), stale=stale,
            live=r.state == ServerState.ONLINE and (reachable if reachable is not None else not stale),
        ))
    rows.sort(key=lambda row: (row.start, row.end, row.peer_id))
    live = [row for row in rows if row.live]
    counts, totals = [0] * num_blocks, [0.0] * num_blocks
    for row in live:
        for b in range(row.start, min(row.end, num_blocks)):
            counts[b] += 1
            totals[b] += row.throughput
    return SwarmHealth(
        model=model, num_blocks=num_blocks, servers=rows, block_servers=counts, block_throughput=totals,
        uncovered_blocks=missing_blocks(num_blocks, (Span(row.start, row.end) for row in live)),
        bottleneck_throughput=min(totals) if totals else 0.0,
        unreachable=[row.peer_id for row in rows if row.state == ServerState.ONLINE and row.reachable is False],
        stale=[row.peer_id for row in rows if row.stale],
        accused=accused or {},
        standbys=[row.peer_id for row in rows if row.state == ServerState.STANDBY],
    )


def format_health(h: SwarmHealth) -> str:
    live = sum(s.live for s in h.servers)
    lines = [f"model {h.model}: {h.num_blocks} blocks, {len(h.servers)} servers ({live} live), "
             f"bottleneck {h.bottleneck_throughput:.1f} steps/s"]
    lines.append(f"{'peer':<14} {'blocks':<10} {'state':<11} {'steps/s':>9} {'free cache':>11} {'dtype':<9} version")
    for s in h.servers:
        name = f" ({s.public_name})" if s.public_name else ""
        blocks = f"[{s.start}:{s.end})"
        state = ("unreachable" if s.reachable is False and s.state == ServerState.ONLINE
                 else "stale" if s.stale and not s.live
                 else f"moving to [{s.moving_to[0]}:{s.moving_to[1]})" if s.moving_to else s.state)
        lines.append(f"…{s.peer_id[-12:]:<13} {blocks:<10} {state:<11} {s.throughput:>9.1f} "
                     f"{s.cache_tokens_left:>11} {s.dtype + (f'/{s.quant}' if s.quant else ''):<9} {s.version}{name}")
    lines.append("per block (live servers / steps/s): " + " ".join(
        f"{b}:{n}/{t:.0f}" for b, (n, t) in enumerate(zip(h.block_servers, h.block_throughput, strict=True))))
    rows = {s.peer_id: s for s in h.servers}
    if h.unreachable:
        lines.append("unreachable (announced online, did not answer a ping; not counted): " + ", ".join(
            f"…{p[-12:]} [{rows[p].start}:{rows[p].end})" for p in h.unreachable))
    if h.stale:
        lines.append("stale (stopped announcing; counted only if it answers a ping): " + ", ".join(
            f"…{p[-12:]} [{rows[p].start}:{rows[p].end}) {rows[p].age:.0f} s ago" for p in h.stale))
    if h.standbys:
        lines.append("standbys (hold blocks, serve none until a hole opens there): " + ", ".join(
            f"…{p[-12:]} [{rows[p].start}:{rows[p].end})" for p in h.standbys))
    if h.accused:
        lines.append("accused of wrong outputs (peers accusing): " + ", ".join(
            f"…{p[-12:]}" + (f" [{rows[p].start}:{rows[p].end})" if p in rows else "") + f" ({n})"
            for p, n in h.accused.items()))
    lines.append("uncovered blocks: " + (", ".join(map(str, h.uncovered_blocks)) or "none"))
    return "\n".join(lines)
