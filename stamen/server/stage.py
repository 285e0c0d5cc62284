"""A training server's stage (``stamen server --train``): the span's weights train together with
the other training servers of the same span.

The span's parameters stay float32 and require grad. A trainer's microbatch (``rpc_train`` with a
``Microbatch``) runs on a kept graph that reaches them; its backward returns the input gradient as
any training call does and adds the weight gradient, times the microbatch's samples, to the
``StageAverager``'s accumulators, once per microbatch id and epoch (``stamen/train/averaging.py``).
When the stage's live peers hold ``target_batch_size`` samples together, the averager averages
their gradients (hivemind all-reduce in the group ``{model}.stage.{A}-{B}.{averaging}``) and every
peer runs the same optimizer step on the same averaged gradient, so the peers stay bitwise equal.

Weight updates (the optimizer step, a load of the stage's state) change the parameters in place;
autograd refuses a backward through a tensor changed since its forward. So an update waits until no
kept graph is held and holds new ones back meanwhile (``SpanBackend.gate``; a graph still held after
``--session-timeout`` is dropped), then runs under the compute lock, so inference steps and forwards
see whole steps only.

A joining peer loads the stage's state (parameters, optimizer and averager state, epoch) from a live
peer of the stage (``rpc_stage_state``) before it goes online; a peer left behind (a live peer at a
higher epoch) is brought up to date by the averager through ``fetch_state``. A peer that moves to
another span leaves between steps (``leave``): the microbatches it counted stay with the stage.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from hivemind.p2p import P2P, PeerID

from stamen.dht.records import StageInfo
from stamen.errors import ServerBusyError, StageEpochError
from stamen.rpc.stage import fetch_stage_state
from stamen.server.backend import SpanBackend
from stamen.server.config import TrainSettings
from stamen.types import PeerIDStr, Span
from stamen.wire.messages import Microbatch

logger = logging.getLogger(__name__)

StagePeers = Callable[[], list[tuple[PeerIDStr, int]]]
"""The other live peers of this stage and their announced epochs (a blocking DHT read)."""
State = tuple[int, dict[str, torch.Tensor], dict[str, Any]]
"""A stage's state: (epoch, tensors by name, optimizer meta), as ``rpc_stage_state`` carries it."""

FETCH_TIMEOUT = 300.0
"""Seconds a peer may take to send the stage's state."""
APPLY_SLACK = 600.0
"""Seconds an update may compute once the kept graphs drained, before the averager stops waiting."""
LEAVE_CHECK_S = 0.2
"""How often a leaving peer looks whether its counted microbatches went into a step."""
LEAVING_RETRY_S = 1.0
"""The retry-after of a microbatch refused by a leaving peer (trainers draw another peer meanwhile)."""


def stage_prefix(model: str, span: Span, averaging: str) -> str:
    """The hivemind key prefix of a stage's averaging group: the peers of one span and averaging."""
    return f"{model}.stage.{span.start}-{span.end}.{averaging}"


def make_optimizer(settings: TrainSettings) -> Callable[[Sequence[torch.nn.Parameter]], torch.optim.Optimizer]:
    """The stage's optimizer factory (every peer builds the same one)."""
    if settings.optimizer == "adamw":
        return partial(torch.optim.AdamW, lr=settings.lr, weight_decay=settings.weight_decay)
    return partial(torch.optim.SGD, lr=settings.lr, weight_decay=settings.weight_decay)


class Stage:
    """The server's part of its stage: the trainable span, its averager and the state exchange."""

    def __init__(self, backend: SpanBackend, settings: TrainSettings, *, dht, p2p: P2P, model_name: str,
                 peers: StagePeers, drain_timeout: float, label: str = ""):
        from stamen.train.averaging import StageAverager  # the averager imports hivemind's averaging

        self.backend, self.settings, self.p2p, self.peers = backend, settings, p2p, peers
        self.span = backend.span
        self.drain_timeout = drain_timeout
        self.label = label
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.current_thread()
        self.leaving = False
        """Set by ``leave``: new microbatches are refused (a retryable "busy"), counted ones still step."""
        model = backend.model
        model.requires_grad_(True)  # microbatch graphs reach the weights; inference runs without autograd
        named = list(model.named_parameters())
        self.param_names = [name for name, _ in named]
        self.averager = StageAverager(
            [p for _, p in named], dht=dht, prefix=stage_prefix(model_name, self.span, settings.averaging),
            target_batch_size=settings.target_batch_size, optimizer=make_optimizer(settings),
            averaging=settings.averaging, rank=settings.rank, aggregation=settings.aggregation, tau=settings.tau,
            clip_iterations=settings.clip_iterations,
            matchmaking_time=settings.matchmaking_time, averaging_timeout=settings.averaging_timeout,
            apply=self._apply_from_thread, fetch_state=self._fetch_from_thread, label=label,
            names=self.param_names)
        backend.train_autocast = torch.bfloat16 if settings.compute_dtype == "bfloat16" else None

    # --- what the server announces and serves ---

    @property
    def epoch(self) -> int:
        return self.averager.epoch

    def info(self) -> StageInfo:
        s = self.settings
        return StageInfo(epoch=self.averager.epoch, samples=self.averager.samples,
                         target_batch_size=s.target_batch_size, averaging=s.averaging, optimizer=s.optimizer)

    def check_epoch(self, epoch: int | None) -> None:
        """A microbatch for another epoch than the stage's is refused before its forward; while this
        peer leaves the stage, every counted microbatch is (trainers retry it on another peer)."""
        if self.leaving:
            raise ServerBusyError(f"this peer is leaving the stage of blocks {self.span}", retry_after=LEAVING_RETRY_S)
        if epoch is not None and epoch != self.averager.epoch:
            raise StageEpochError(f"the stage of blocks {self.span} is in epoch {self.averager.epoch}, "
                                  f"not {epoch}")

    async def accumulate(self, mb: Microbatch, grads: Sequence[torch.Tensor | None]) -> tuple[bool, int]:
        """Count a microbatch's weight gradient (once per id and epoch): (counted now, the epoch)."""
        epoch = self.averager.epoch
        counted = await asyncio.to_thread(self.averager.accumulate, mb.id, mb.samples, grads, mb.epoch)
        return counted, epoch if mb.epoch is None else mb.epoch

    async def state(self, optimizer: bool = True) -> State:
        """The stage's state: copies taken between updates (the averager's state lock)."""
        return await asyncio.to_thread(self.averager.state, optimizer)

    async def load(self, state: State) -> None:
        """Take a peer's state (bitwise); the averager runs the copy through ``apply`` (on a thread:
        ``apply`` comes back to this loop)."""
        await asyncio.to_thread(self.averager.load_state, *state)

    async def fetch(self) -> State | None:
        """The state of a live peer of the stage (the most advanced that answers), or None."""
        peers = await asyncio.get_running_loop().run_in_executor(None, self.peers)
        for peer, epoch in sorted(peers, key=lambda pe: -pe[1]):
            try:
                return await fetch_stage_state(self.p2p, PeerID.from_base58(peer), self.span, optimizer=True,
                                               timeout=FETCH_TIMEOUT)
            except Exception as e:
                logger.warning("%s could not load the stage's state (epoch %d) from %s: %r", self.label, epoch,
                               peer[-6:], e)
        return None

    async def join(self) -> bool:
        """Load the stage's state from a live peer before going online; False: no peer (the weights
        stay the checkpoint's, epoch 0)."""
        state = await self.fetch()
        if state is None:
            logger.info("%s no live peer in the stage: starting from the checkpoint's weights", self.label)
            return False
        await self.load(state)
        logger.info("%s loaded the stage's state at epoch %d from a peer", self.label, state[0])
        return True

    def start(self) -> None:
        """Serve microbatches and average with the stage from now on."""
        self.averager.start()
        self.backend.stage = self

    async def leave(self, timeout: float) -> None:
        """Leave the stage without taking trainers' gradients along (a peer that moves to another
        span): refuse new microbatches, wait until no kept graph is held and the microbatches this
        peer counted went into a step of the stage (at most ``timeout`` s: a trainer that died
        mid-step leaves them waiting), then shut down. A trainer only reruns the microbatches of a
        peer that stops answering; a peer that left alive with counted samples would stall its
        stage in synchronous training."""
        self.leaving = True
        started = self.loop.time()
        while (self.averager.samples or self.backend.gate.held) and self.loop.time() < started + timeout:
            await asyncio.sleep(LEAVE_CHECK_S)
        if self.averager.samples:
            logger.warning("%s leaving the stage with %d counted samples that did not step after %.0f s",
                           self.label, self.averager.samples, timeout)
        await self.shutdown()
        logger.info("%s left the stage at epoch %d (waited %.1f s for its counted microbatches to step)",
                    self.label, self.averager.epoch, self.loop.time() - started)

    async def shutdown(self) -> None:
        """Stop averaging (on a thread: the averager's thread may wait for this loop)."""
        if self.backend.stage is self:
            self.backend.stage = None
        await asyncio.to_thread(self.averager.shutdown)

    # --- the averager's hooks, called from its own thread ---

    def _apply_from_thread(self, update: Callable[[], None]) -> None:
        """Run ``update`` (the optimizer step) once no kept graph is held, under the compute lock."""
        if threading.current_thread() is self._loop_thread:
            raise RuntimeError("a stage update must come from the averager's thread, not the event loop")

        async def apply() -> None:
            async with self.backend.gate.closed(self.drain_timeout):
                await self.backend.run_long(update)

        asyncio.run_coroutine_threadsafe(apply(), self.loop).result(self.drain_timeout + APPLY_SLACK)

    def _fetch_from_thread(self) -> State | None:
        """A live peer's state, for an averager that found itself behind (it loads it through ``apply``)."""
        return asyncio.run_coroutine_threadsafe(self.fetch(), self.loop).result(FETCH_TIMEOUT + 60)
