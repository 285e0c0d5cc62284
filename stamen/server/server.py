"""Server lifecycle: join the DHT, pick and load a span, serve RPCs, announce, move, leave cleanly."""

from __future__ import annotations

import asyncio
import logging
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from hivemind import DHT
from hivemind.p2p import P2P, PeerID

from stamen import trace
from stamen.dht.node import SwarmDHT, create_dht
from stamen.dht.records import ServerRecord, ServerState, announce, fetch_servers
from stamen.errors import CheckpointError, RemoteCallError
from stamen.models import BlockConfig, load_block_config, load_span, open_checkpoint
from stamen.models.checkpoint import Checkpoint
from stamen.models.span import SpanModel
from stamen.process import check_peer_addresses, check_port_free, children_die_with_me
from stamen.rpc import replies
from stamen.rpc.calls import measure_bandwidth, ping
from stamen.server.backend import SpanBackend
from stamen.server.compute import (
    DECODE_THREADS_TOLERANCE,
    choose_decode_threads,
    fastest_of,
    fewest_within,
    host_measurement_lock,
)
from stamen.server.config import ServerConfig, parent_gone
from stamen.server.handler import SpanHandler
from stamen.server.limits import Limits
from stamen.server.memory import available_memory, format_bytes, plan_blocks
from stamen.server.metrics import ServerMetrics
from stamen.server.placement import MoveDecision, block_throughputs, choose_span, plan_move
from stamen.server.standby import Standby, choose_standby_span
from stamen.server.throughput import (
    cache_key,
    cached_compute,
    cached_only,
    measure_compute,
    network_steps_per_second,
)
from stamen.types import ModelName, PeerIDStr, Span, default_dht_prefix
from stamen.version import __version__

if TYPE_CHECKING:
    from stamen.server.stage import Stage

logger = logging.getLogger(__name__)

WAKE_CHECK_S = 0.5
"""How often a training server looks whether its stage stepped (its record then announces the new epoch)."""


def start_dht(initial_peers: list[str], host: str, port: int, identity: str | None = None,
              announce_maddrs: list[str] | None = None, client_mode: bool = False) -> SwarmDHT:
    """A hivemind DHT peer listening on ``host:port`` (port 0: any free port). Its DHT process and
    libp2p daemon die with this process (``stamen/process.py``). The addresses and the port are
    checked first; a peer that cannot start or join raises ``RemoteCallError`` (one line)."""
    check_peer_addresses(initial_peers)
    check_port_free(host, port)
    with children_die_with_me():
        try:  # every DHT peer comes from create_dht: the same record validators everywhere (dht/node.py)
            return create_dht(initial_peers, host=host, port=port, identity=identity, announce_maddrs=announce_maddrs,
                              client_mode=client_mode)
        except Exception as e:  # raised in the DHT process: hivemind's bootstrap failure, a daemon that did not start
            through = f" through {' '.join(initial_peers)}" if initial_peers else ""
            raise RemoteCallError(f"could not join the swarm{through}: {e}") from e


def measure_throughput(model: SpanModel, dtype: torch.dtype, device: str, repeats: int = 12) -> float:
    """Single-token inference steps per second through one block (median of a few runs)."""
    return measure_compute(model, dtype, device, repeats=repeats).inference


@dataclass
class Speed:
    """What the server announces about its speed."""

    throughput: float
    """Steps/s per block for placement and routing: compute, capped by the network."""
    forward: float | None = None
    bandwidth: float | None = None


@dataclass
class _Serving:
    """The parts of a running server that a move touches."""

    dht: DHT
    p2p: P2P
    peer_id: PeerIDStr
    checkpoint: Checkpoint
    block_config: BlockConfig
    backend: SpanBackend
    speed: Speed


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.model_name = ModelName(config.dht_prefix or default_dht_prefix(config.model))
        self.span: Span | None = None
        self.moving_to: Span | None = None
        self._stop = asyncio.Event()
        self._drains: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._decode_ms: dict[int, float] = {}
        """The fastest decoding step measured per thread count (``_set_decode_threads``)."""
        self._metrics_of: ServerMetrics | None = None
        self._backend: SpanBackend | None = None
        """Set once serving: what the announcements read the load from."""
        self._stage: Stage | None = None
        """A ``--train`` server's stage, once it joined it (``server/stage.py``)."""

    def run(self) -> None:
        """The event loop runs on the main thread and computes decoding steps inline (``server/compute.py``)."""
        import uvloop  # hivemind depends on it; its loop wakes up faster than asyncio's default

        uvloop.run(self._main())

    def request_stop(self) -> None:
        self._stop.set()

    async def _stop_with_parent(self) -> None:
        while not self._stop.is_set():
            if parent_gone():
                logger.warning("%s the process that started this server is gone: stopping", self.tag)
                self.request_stop()
                return
            await asyncio.sleep(1.0)

    @property
    def tag(self) -> str:
        return f"[{self.model_name} blocks {self.span}]"

    async def _main(self) -> None:
        cfg = self.config
        loop = self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        self._watcher = asyncio.create_task(self._stop_with_parent())
        # start-up work (threads, the first load, the speed measurement) runs inline on the loop, which
        # serves nothing yet; once online, the backend decides where compute runs (``server/compute.py``)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.threads = torch.get_num_threads()
        """torch threads of long work; decoding steps on the loop's thread may use fewer."""

        block_config = load_block_config(cfg.model)
        if cfg.blocks is not None and cfg.blocks.end > block_config.num_blocks:  # checked before anything starts
            raise CheckpointError(f"--blocks {cfg.blocks} is past the model's {block_config.num_blocks} blocks")
        checkpoint = open_checkpoint(cfg.model)
        dht = start_dht(cfg.initial_peers, cfg.host, cfg.port, str(cfg.identity) if cfg.identity else None,
                        cfg.announce_maddrs)
        try:  # from here on, every way out shuts the DHT process and its daemon down
            peer_id = PeerIDStr(dht.peer_id.to_base58())
            length = cfg.blocks.length if cfg.blocks else cfg.num_blocks or self._blocks_that_fit(block_config)
            self.span = cfg.blocks or self._choose_span(dht, block_config, length, cfg.standby)
            trace.set_role(f"server{self.span.start}")
            logger.info("%s %s joining%s; visible at %s", peer_id[-6:], self.tag, " as a standby" * cfg.standby,
                        " ".join(str(m) for m in dht.get_visible_maddrs()))
            self._announce(dht, peer_id, ServerState.STANDBY if cfg.standby else ServerState.JOINING,
                           self._expected_speed(block_config), 0)
            # servers of one host load and measure one at a time: a load (reading, copying, laying
            # out weights) beside another server's measurement skewed it (server/compute.py)
            with host_measurement_lock():
                model = load_span(checkpoint, block_config, self.span, cfg.torch_dtype, cfg.device, quant=cfg.quant,
                                  input_major_ok=not cfg.train)
                self._set_decode_threads(model)
            backend = SpanBackend(model, cfg.torch_dtype, torch.device(cfg.device), cfg.max_cache_tokens,
                                  cfg.max_step_tokens, max_train_graphs=cfg.max_train_graphs, inline_compute=True,
                                  long_threads=self.threads, limits=Limits.of(cfg), batching=cfg.batching,
                                  max_batch_tokens=cfg.max_batch_tokens)
            metrics = self._metrics(peer_id, backend)
            self._backend = backend
            handler = SpanHandler(backend, peer_id, __version__, cfg.session_timeout, cfg.request_timeout,
                                  cfg.compression, Limits.of(cfg), metrics)
            p2p = await dht.replicate_p2p()
            if not cfg.standby:  # a standby registers its handlers when it goes online (server/standby.py)
                await handler.add_p2p_handlers(p2p)
            speed = await self._measure(dht, p2p, peer_id, model, block_config)
            serving = _Serving(dht, p2p, peer_id, checkpoint, block_config, backend, speed)
            if cfg.train:  # the stage's state comes from its live peers before this one goes online
                self._stage = await self._start_stage(serving)
            standby = Standby(self, serving, handler) if cfg.standby else None
            online = standby is None or await standby.hold()  # a standby: once it took over a hole
            if online:
                logger.info("%s online: %.1f steps/s per block, cache budget %d tokens", self.tag, speed.throughput,
                            cfg.max_cache_tokens)
                rebalancer = asyncio.create_task(self._rebalance_loop(serving)) if self._may_move else None
                await self._announce_loop(serving)
                if rebalancer is not None:
                    rebalancer.cancel()
            logger.info("%s leaving", self.tag)
            self._announce(dht, peer_id, ServerState.OFFLINE, speed, 0)
            if self._stage is not None:
                await self._stage.shutdown()
            if online:
                await handler.remove_p2p_handlers(p2p)
            backend.shutdown()
        finally:
            dht.shutdown()
        logger.info("%s stopped", self.tag)

    def _set_decode_threads(self, model: SpanModel, note: str = "") -> None:
        """Set the loop thread's torch thread count, the one decoding steps run with."""
        cfg = self.config
        if cfg.decode_threads is not None:
            torch.set_num_threads(min(cfg.decode_threads, self.threads))
            return
        chosen, ms = choose_decode_threads(model, cfg.torch_dtype, cfg.device, self.threads)
        if ms and self._decode_ms:  # a disturbed sample is only ever slower: keep the fastest of both
            ms = fastest_of(ms, self._decode_ms)
            chosen = fewest_within(ms, DECODE_THREADS_TOLERANCE)
            torch.set_num_threads(chosen)
        self._decode_ms = ms
        if ms:
            logger.info("%s %sdecoding steps on %d of %d threads (ms per step through %d blocks: %s)", self.tag, note,
                        chosen, self.threads, min(model.span.length, 4),
                        ", ".join(f"{n} threads {t:.2f}" for n, t in ms.items()))

    @property
    def _may_move(self) -> bool:
        return self.config.auto_placed and self.config.rebalance

    # --- announcing ---

    def _record(self, state: ServerState, speed: Speed, cache_left: int,
                next_pings: dict[str, float] | None = None) -> ServerRecord:
        cfg = self.config
        return ServerRecord(
            state=state, start=self.span.start, end=self.span.end, throughput=speed.throughput,
            cache_tokens_left=cache_left, dtype=cfg.dtype, version=__version__, public_name=cfg.public_name,
            next_pings=next_pings or {}, forward_throughput=speed.forward, network_bandwidth=speed.bandwidth,
            moving_to=(self.moving_to.start, self.moving_to.end) if self.moving_to else None,
            quant=cfg.quant if cfg.quant != "none" else None, stage=self._stage.info() if self._stage else None,
            **self._load(),
        )

    def _load(self) -> dict:
        """Open sessions and queued steps (routing prefers less loaded servers)."""
        backend = self._backend
        if backend is None:
            return {}
        queued = backend.batcher.take_mean_queued() if backend.batcher is not None else 0.0
        return dict(sessions=len(backend.sessions), queued_steps=round(queued, 3))

    def _metrics(self, peer_id: str, backend: SpanBackend) -> ServerMetrics:
        """This server's Prometheus metrics, served on ``--metrics-port`` if given."""
        metrics = ServerMetrics(peer_id)
        metrics.watch(backend)
        replies.on_error = metrics.refused
        if self.config.metrics_port is not None:
            metrics.serve(self.config.metrics_port, self.config.host)
            logger.info("%s metrics at http://%s:%d/metrics", self.tag, self.config.host, self.config.metrics_port)
        self._metrics_of = metrics
        return metrics

    def _announce(self, dht: DHT, peer_id: PeerIDStr, state: ServerState, speed: Speed, cache_left: int,
                  next_pings: dict[str, float] | None = None, also_blocks: range = range(0)) -> None:
        if self._metrics_of is not None and self.span is not None:
            self._metrics_of.set_state(state.value, self.span.start, self.span.end, self.config.dtype)
        announce(dht, self.model_name, self._record(state, speed, cache_left, next_pings), self.config.record_ttl,
                 also_blocks)

    async def _announce_loop(self, s: _Serving) -> None:
        """Announce online every ttl/3 until asked to stop."""
        rechecked = False
        while not self._stop.is_set():
            pings = await self._ping_next_servers(s.dht, s.p2p, s.peer_id, self.span, s.block_config.num_blocks)
            self._announce(s.dht, s.peer_id, ServerState.ONLINE, s.speed, s.backend.budget.tokens_left, pings)
            if await self._stopped_within(self.config.record_ttl / 3, self._stage_stepped()):
                return
            rechecked = rechecked or self._recheck_decode_threads(s.backend)

    def _recheck_decode_threads(self, backend: SpanBackend) -> bool:
        """Measure the decoding threads again while idle (no session, no computation, no other
        server of the host loading or measuring): the start-up measurement may have run beside
        processes that were starting. Returns whether it is done (measured, or nothing to
        measure). Runs inline: a few decoding steps through at most 4 blocks per thread count,
        short enough to hold an idle loop."""
        if self.config.decode_threads is not None:
            return True  # set by the operator
        if backend.sessions or backend.busy:
            return False
        with host_measurement_lock(wait=False) as held:
            if not held:
                return False
            before = torch.get_num_threads()
            self._set_decode_threads(backend.model, "measured again while idle: ")
        if torch.get_num_threads() != before:
            logger.info("%s decoding threads changed from %d to %d", self.tag, before, torch.get_num_threads())
        return True

    async def _stopped_within(self, seconds: float, wake: Callable[[], bool] | None = None) -> bool:
        """Wait ``seconds`` (or until ``wake()``, checked every ``WAKE_CHECK_S``): whether asked to stop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            left = deadline - loop.time() if wake is None else min(deadline - loop.time(), WAKE_CHECK_S)
            try:
                await asyncio.wait_for(self._stop.wait(), max(left, 0.0))
            except TimeoutError:
                if wake is None or loop.time() >= deadline or wake():
                    return False
                continue
            return True

    def _stage_stepped(self) -> Callable[[], bool] | None:
        """For a training server: whether its stage's epoch changed since now (announced at once)."""
        stage = self._stage
        if stage is None:
            return None
        epoch = stage.epoch
        return lambda: self._stage is not stage or stage.epoch != epoch

    # --- training stage (--train) ---

    async def _start_stage(self, s: _Serving) -> Stage:
        """Join the stage of this span: load its state from a live peer (or keep the checkpoint's
        weights when it has none), then average and step with it."""
        from stamen.server.stage import Stage  # imports hivemind's averagers: training servers only

        stage = Stage(s.backend, self.config.training, dht=s.dht, p2p=s.p2p, model_name=self.model_name,
                      peers=partial(self._stage_peers, s), drain_timeout=self.config.session_timeout,
                      label=self.tag)
        await stage.join()
        stage.start()
        logger.info("%s training: stage epoch %d, target batch %d, %s averaging, %s lr %g", self.tag, stage.epoch,
                    self.config.training.target_batch_size, self.config.training.averaging,
                    self.config.training.optimizer, self.config.training.lr)
        return stage

    def _stage_peers(self, s: _Serving) -> list[tuple[PeerIDStr, int]]:
        """The other live peers of this server's stage and their announced epochs (blocking DHT read)."""
        span, averaging = self.span, self.config.training.averaging
        records = fetch_servers(s.dht, self.model_name, s.block_config.num_blocks, [span.start])
        return [(p, r.stage.epoch) for p, r in records.items()
                if p != s.peer_id and r.state == ServerState.ONLINE and r.stage is not None and r.span == span
                and r.stage.averaging == averaging]

    async def _ping_next_servers(self, dht: DHT, p2p, peer_id: str, span: Span, num_blocks: int,
                                 max_peers: int = 8) -> dict[str, float]:
        """Round trips to servers hosting the block right after our span (clients route with them)."""
        if span.end >= num_blocks:
            return {}
        loop = asyncio.get_running_loop()
        records = await loop.run_in_executor(None, lambda: fetch_servers(dht, self.model_name, num_blocks, [span.end]))
        peers = [p for p, r in records.items() if r.state == ServerState.ONLINE and p != peer_id and span.end in r.span]
        peers = random.sample(peers, min(max_peers, len(peers)))
        rtts = await asyncio.gather(*(ping(p2p, PeerID.from_base58(p), timeout=2.0) for p in peers))
        return {p: round(rtt, 6) for p, rtt in zip(peers, rtts, strict=True) if rtt is not None}

    # --- deciding what to host ---

    def _blocks_that_fit(self, block_config: BlockConfig) -> int:
        cfg = self.config
        available = cfg.max_memory or available_memory(cfg.device)
        source = "allowed by --max-memory" if cfg.max_memory else f"free on {cfg.device}"
        plan = plan_blocks(block_config, cfg.torch_dtype, cfg.max_cache_tokens, available, cfg.memory_margin, source,
                           cfg.quant)
        logger.info("%s", plan.message)
        return plan.num_blocks

    def _placements(self, dht: DHT, num_blocks: int, peer_id: str | None) -> list[tuple[Span, float]]:
        """Other servers' (span, throughput), moving ones at their target."""
        records = fetch_servers(dht, self.model_name, num_blocks)
        return [(r.placed_span, r.throughput) for p, r in records.items()
                if r.state not in (ServerState.OFFLINE, ServerState.STANDBY) and p != peer_id]

    def _choose_span(self, dht: DHT, block_config: BlockConfig, length: int, standby: bool = False) -> Span:
        if standby:  # standbys count here (the pool spreads), unlike in ``_placements``
            span = choose_standby_span(fetch_servers(dht, self.model_name, block_config.num_blocks),
                                       block_config.num_blocks, length, dht.peer_id.to_base58())
            logger.info("standby: chose blocks %s, the window the swarm can least afford to lose", span)
            return span
        others = self._placements(dht, block_config.num_blocks, dht.peer_id.to_base58())
        span = choose_span(block_config.num_blocks, length, others)
        logger.info("chose blocks %s: the weakest window of %d blocks among %d servers", span, length, len(others))
        return span

    def _expected_speed(self, block_config: BlockConfig) -> Speed:
        """What a joining server announces before it has measured: ``--throughput`` or the cached
        compute speed (so servers joining at the same time weigh it right), else 1 step/s."""
        cfg = self.config
        if cfg.throughput is not None:
            return Speed(cfg.throughput)
        cached = cached_only(cfg.throughput_cache, cache_key(cfg.device, self.model_name, cfg.torch_dtype,
                                                                 block_config, cfg.quant, self.threads))
        return Speed(cached.inference if cached else 1.0)

    async def _measure(self, dht: DHT, p2p: P2P, peer_id: PeerIDStr, model: SpanModel,
                       block_config: BlockConfig) -> Speed:
        """Compute speed (cached per device, model and dtype) and bandwidth to servers already online."""
        cfg = self.config
        if cfg.throughput is not None:
            return Speed(cfg.throughput)
        loop = asyncio.get_running_loop()
        key = cache_key(cfg.device, self.model_name, cfg.torch_dtype, block_config, cfg.quant, self.threads)
        compute, cached = cached_compute(cfg.throughput_cache, key,
                                         lambda: measure_compute(model, cfg.torch_dtype, cfg.device,
                                                                 forward_threads=self.threads))
        records = await loop.run_in_executor(None, lambda: fetch_servers(dht, self.model_name, block_config.num_blocks))
        peers = [PeerID.from_base58(p) for p, r in records.items() if r.state == ServerState.ONLINE and p != peer_id]
        bandwidth = await measure_bandwidth(p2p, random.sample(peers, min(2, len(peers))))
        throughput = compute.inference
        if bandwidth is not None:
            throughput = min(throughput, network_steps_per_second(bandwidth, block_config.hidden_size,
                                                                  cfg.torch_dtype))
        logger.info("throughput: %.1f steps/s per block (inference, %s), %.0f tokens/s per block (forward of %d), "
                    "network %s", compute.inference, f"cached in {cfg.throughput_cache}" if cached else "measured",
                    compute.forward, compute.forward_tokens,
                    f"{format_bytes(bandwidth)}/s to {len(peers) and min(2, len(peers))} peers" if bandwidth
                    else "not measured (no peer online)")
        return Speed(throughput, compute.forward, bandwidth)

    # --- rebalancing ---

    async def _plan(self, s: _Serving) -> MoveDecision:
        num_blocks = s.block_config.num_blocks
        others = await asyncio.get_running_loop().run_in_executor(
            None, lambda: self._placements(s.dht, num_blocks, s.peer_id))
        return plan_move(block_throughputs(num_blocks, others), self.span, s.speed.throughput,
                         self.config.placement)

    async def _rebalance_loop(self, s: _Serving) -> None:
        """At jittered intervals, check whether moving raises the swarm's bottleneck enough; before
        moving, wait a random while and look at the DHT again, so servers do not move in a herd."""
        cfg, rng = self.config, random.Random()
        while not await self._stopped_within(cfg.balance_period * rng.uniform(0.5, 1.5)):
            try:
                decision = await self._plan(s)
                if not decision.move:
                    logger.debug("%s stays: %s", self.tag, decision.reason)
                    continue
                logger.info("%s considering a move to %s (%s)", self.tag, decision.target, decision.reason)
                if await self._stopped_within(rng.uniform(0, cfg.move_jitter)):
                    return
                decision = await self._plan(s)  # a fresh look: someone else may have moved meanwhile
                if decision.move:
                    await self._move(s, decision)
                else:
                    logger.info("%s stays after all: %s", self.tag, decision.reason)
            except Exception:  # a DHT hiccup or a failed load: keep serving, try again next period
                logger.exception("%s rebalancing check failed; still serving %s", self.tag, self.span)

    async def _move(self, s: _Serving, decision: MoveDecision) -> None:
        """Load the target's missing blocks (keeping the ones already resident), switch to them,
        announce, and let sessions on the old span finish (or close them after ``move_grace``).
        A training server first leaves its stage between steps (announced without it, so trainers
        draw its other peers; ``Stage.leave``), then joins the target's stage, loading its state."""
        cfg, old_span, old_model = self.config, self.span, s.backend.model
        self.moving_to = decision.target
        kept = len(set(range(old_span.start, old_span.end)) & set(range(decision.target.start, decision.target.end)))
        logger.info("%s moving to %s: %s; loading %d blocks, keeping %d", self.tag, decision.target, decision.reason,
                    decision.target.length - kept, kept)
        leaving, self._stage = self._stage, None
        self._announce(s.dht, s.peer_id, ServerState.ONLINE, s.speed, s.backend.budget.tokens_left)
        if leaving is not None:  # trained blocks are not reused for another stage
            await leaving.leave(cfg.move_grace)
        try:
            model = await s.backend.run_long(lambda: load_span(  # pings and steps go on meanwhile
                s.checkpoint, s.block_config, decision.target, cfg.torch_dtype, cfg.device,
                reuse=None if cfg.train else old_model, quant=cfg.quant, input_major_ok=not cfg.train))
        except Exception:
            self.moving_to = None
            if leaving is not None:  # back into the old stage (its state from its peers again)
                self._stage = await self._start_stage(s)
            raise
        s.backend.swap_model(model)
        self.span, self.moving_to = decision.target, None
        if cfg.train:  # the new stage's state from its peers (the checkpoint's weights if it has none)
            self._stage = await self._start_stage(s)
        self._announce(s.dht, s.peer_id, ServerState.ONLINE, s.speed, s.backend.budget.tokens_left,
                       also_blocks=range(old_span.start, old_span.end))
        old = s.backend.sessions_on_old_spans()
        logger.info("%s moved from %s; %d open sessions finish on the old blocks", self.tag, old_span, len(old))
        drain = asyncio.create_task(self._drain(s.backend, old_span))
        self._drains.add(drain)
        drain.add_done_callback(self._drains.discard)

    async def _drain(self, backend: SpanBackend, old_span: Span) -> None:
        """Wait for sessions on the old span to close; after the grace period, close them (their
        clients replay into other servers). The old blocks are freed with their last session."""
        deadline = asyncio.get_running_loop().time() + self.config.move_grace
        while backend.sessions_on_old_spans() and asyncio.get_running_loop().time() < deadline:
            if await self._stopped_within(0.5):
                return
        left = backend.sessions_on_old_spans()
        for session_id in left:
            backend.close(session_id)
        logger.info("%s dropped the old blocks %s (%s)", self.tag, old_span,
                    f"closed {len(left)} sessions after {self.config.move_grace:.0f} s" if left
                    else "their sessions finished")
