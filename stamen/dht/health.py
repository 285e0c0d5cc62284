"""The swarm's state as plain data: servers, per-block coverage and throughput (for `stamen health`)."""

from __future__ import annotations

from pydantic import BaseModel

from stamen.dht.records import ServerRecord, ServerState
from stamen.types import missing_blocks


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


class SwarmHealth(BaseModel):
    model: str
    num_blocks: int
    servers: list[ServerRow]
    block_servers: list[int]
    """Online servers per block."""
    block_throughput: list[float]
    """Summed throughput of online servers per block."""
    uncovered_blocks: list[int]
    bottleneck_throughput: float
    """The weakest block's throughput: the swarm serves at most this many steps per second."""


def swarm_health(model: str, num_blocks: int, records: dict[str, ServerRecord]) -> SwarmHealth:
    online = [r for r in records.values() if r.state == ServerState.ONLINE]
    counts, totals = [0] * num_blocks, [0.0] * num_blocks
    for r in online:
        for b in range(r.start, min(r.end, num_blocks)):
            counts[b] += 1
            totals[b] += r.throughput
    rows = sorted(
        (ServerRow(peer_id=p, start=r.start, end=r.end, state=r.state.value, throughput=r.throughput,
                   cache_tokens_left=r.cache_tokens_left, dtype=r.dtype, version=r.version,
                   public_name=r.public_name, moving_to=r.moving_to, forward_throughput=r.forward_throughput,
                   network_bandwidth=r.network_bandwidth, quant=r.quant) for p, r in records.items()),
        key=lambda row: (row.start, row.end, row.peer_id),
    )
    return SwarmHealth(
        model=model, num_blocks=num_blocks, servers=rows, block_servers=counts, block_throughput=totals,
        uncovered_blocks=missing_blocks(num_blocks, (r.span for r in online)),
        bottleneck_throughput=min(totals) if totals else 0.0,
    )


def format_health(h: SwarmHealth) -> str:
    lines = [f"model {h.model}: {h.num_blocks} blocks, {len(h.servers)} servers, "
             f"bottleneck {h.bottleneck_throughput:.1f} steps/s"]
    lines.append(f"{'peer':<14} {'blocks':<10} {'state':<8} {'steps/s':>9} {'free cache':>11} {'dtype':<9} version")
    for s in h.servers:
        name = f" ({s.public_name})" if s.public_name else ""
        blocks = f"[{s.start}:{s.end})"
        state = f"moving to [{s.moving_to[0]}:{s.moving_to[1]})" if s.moving_to else s.state
        lines.append(f"…{s.peer_id[-12:]:<13} {blocks:<10} {state:<8} {s.throughput:>9.1f} "
                     f"{s.cache_tokens_left:>11} {s.dtype + (f'/{s.quant}' if s.quant else ''):<9} {s.version}{name}")
    lines.append("per block (online servers / steps/s): " + " ".join(
        f"{b}:{n}/{t:.0f}" for b, (n, t) in enumerate(zip(h.block_servers, h.block_throughput, strict=True))))
    lines.append("uncovered blocks: " + (", ".join(map(str, h.uncovered_blocks)) or "none"))
    return "\n".join(lines)
