"""Server lifecycle: join the DHT, pick and load a span, serve RPCs, announce, leave cleanly."""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time

import torch
from hivemind import DHT
from hivemind.p2p import PeerID

from stamen.dht.records import ServerRecord, ServerState, announce, fetch_servers
from stamen.models import BlockConfig, KVCache, load_config, load_span, open_checkpoint
from stamen.models.span import SpanModel
from stamen.server.backend import SpanBackend
from stamen.server.config import ServerConfig, default_dht_prefix
from stamen.server.handler import SpanHandler, ping
from stamen.server.placement import choose_span
from stamen.types import ModelName, PeerIDStr, Span
from stamen.version import __version__

logger = logging.getLogger(__name__)


def start_dht(initial_peers: list[str], host: str, port: int, identity: str | None = None,
              announce_maddrs: list[str] | None = None, client_mode: bool = False) -> DHT:
    """A hivemind DHT peer listening on ``host:port`` (port 0: any free port)."""
    kwargs = {}
    if identity is not None:
        kwargs["identity_path"] = identity
    if announce_maddrs:
        kwargs["announce_maddrs"] = announce_maddrs
    return DHT(
        initial_peers=initial_peers,
        start=True,
        client_mode=client_mode,
        host_maddrs=[f"/ip4/{host}/tcp/{port}"],
        **kwargs,
    )


def measure_throughput(model: SpanModel, dtype: torch.dtype, device: str, repeats: int = 12) -> float:
    """Single-token inference steps per second through one block (median of a few runs)."""
    block_span = Span(model.span.start, model.span.start + 1)
    cache = KVCache(model.config, 1, 1, repeats + 4, dtype, device)
    hidden = torch.randn(1, 1, model.config.hidden_size, dtype=dtype, device=device)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 3):
            start = time.perf_counter()
            model.step(hidden, cache, blocks=block_span)
            times.append(time.perf_counter() - start)
    times = sorted(times[3:])
    return 1.0 / max(times[len(times) // 2], 1e-6)


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.model_name = ModelName(config.dht_prefix or default_dht_prefix(config.model))
        self._stop = asyncio.Event()

    def run(self) -> None:
        import uvloop  # hivemind depends on it; its loop wakes up faster than asyncio's default

        uvloop.run(self._main())

    def request_stop(self) -> None:
        self._stop.set()

    async def _main(self) -> None:
        cfg = self.config
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)

        hf_config = load_config(cfg.model)
        block_config = BlockConfig.from_hf(hf_config)
        checkpoint = open_checkpoint(cfg.model)
        dht = start_dht(cfg.initial_peers, cfg.host, cfg.port, str(cfg.identity) if cfg.identity else None,
                        cfg.announce_maddrs)
        peer_id = PeerIDStr(dht.peer_id.to_base58())
        span = cfg.blocks or self._choose_span(dht, block_config)
        if span.end > block_config.num_blocks:
            raise SystemExit(f"--blocks {span} is past the model's {block_config.num_blocks} blocks")
        tag = f"[{peer_id[-6:]} {self.model_name} blocks {span}]"
        logger.info("%s joining; visible at %s", tag, " ".join(str(m) for m in dht.get_visible_maddrs()))

        def record(state: ServerState, throughput: float = 0.0, cache_left: int = 0,
                   next_pings: dict[str, float] | None = None) -> ServerRecord:
            return ServerRecord(state=state, start=span.start, end=span.end, throughput=throughput,
                                cache_tokens_left=cache_left, dtype=cfg.dtype, version=__version__,
                                public_name=cfg.public_name, next_pings=next_pings or {})

        announce(dht, self.model_name, peer_id, record(ServerState.JOINING, cfg.throughput or 1.0), cfg.record_ttl)
        try:
            model = await loop.run_in_executor(
                None, lambda: load_span(checkpoint, block_config, span, cfg.torch_dtype, cfg.device)
            )
            throughput = cfg.throughput or measure_throughput(model, cfg.torch_dtype, cfg.device)
            backend = SpanBackend(model, cfg.torch_dtype, torch.device(cfg.device), cfg.max_cache_tokens,
                                  cfg.max_step_tokens)
            handler = SpanHandler(backend, peer_id, __version__, cfg.session_timeout, cfg.request_timeout)
            p2p = await dht.replicate_p2p()
            await handler.add_p2p_handlers(p2p)
            logger.info("%s online: %.1f steps/s per block, cache budget %d tokens", tag, throughput,
                        cfg.max_cache_tokens)
            while not self._stop.is_set():
                pings = await self._ping_next_servers(dht, p2p, peer_id, span, block_config.num_blocks)
                announce(dht, self.model_name, peer_id,
                         record(ServerState.ONLINE, throughput, backend.budget.tokens_left, pings), cfg.record_ttl)
                try:
                    await asyncio.wait_for(self._stop.wait(), cfg.record_ttl / 3)
                except TimeoutError:
                    pass
            logger.info("%s leaving", tag)
            announce(dht, self.model_name, peer_id, record(ServerState.OFFLINE), cfg.record_ttl)
            await handler.remove_p2p_handlers(p2p)
            backend.shutdown()
        finally:
            dht.shutdown()
        logger.info("%s stopped", tag)

    async def _ping_next_servers(self, dht: DHT, p2p, peer_id: str, span: Span, num_blocks: int,
                                 max_peers: int = 8) -> dict[str, float]:
        """Round trips to servers hosting the block right after our span (clients route with them)."""
        if span.end >= num_blocks:
            return {}
        loop = asyncio.get_running_loop()
        records = await loop.run_in_executor(None, lambda: fetch_servers(dht, self.model_name, num_blocks, [span.end]))
        peers = [p for p, r in records.items() if r.state == ServerState.ONLINE and p != peer_id]
        peers = random.sample(peers, min(max_peers, len(peers)))
        rtts = await asyncio.gather(*(ping(p2p, PeerID.from_base58(p), timeout=2.0) for p in peers))
        return {p: round(rtt, 6) for p, rtt in zip(peers, rtts, strict=True) if rtt is not None}

    def _choose_span(self, dht: DHT, block_config: BlockConfig) -> Span:
        servers = fetch_servers(dht, self.model_name, block_config.num_blocks)
        live = [(r.span, r.throughput) for r in servers.values() if r.state != ServerState.OFFLINE]
        span = choose_span(block_config.num_blocks, self.config.num_blocks or 1, live)
        logger.info("chose blocks %s: the weakest window among %d servers", span, len(live))
        return span
