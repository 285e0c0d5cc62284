"""Exact gradient averaging for SWARM stages: every peer of a group ends a round bitwise equal.

hivemind's all-reduce splits the averaged vector into partitions, each reduced by one peer of the
group, and hands every other peer the *difference* between the average and its own part, which it
adds to its tensors: ``local + (mean - local)`` is the mean only up to float rounding, so peers drift
apart by an ulp a step. A SWARM stage needs more: its peers hold the same parameters, step together
and must stay identical, so that any of them can serve, and any can hand its state to a joiner.
``ExactAllReduceRunner`` sends every member the reducer's result itself (reducers reply with the
averaged part, not a delta, and a reducer's own share is the same tensor), so each member copies the
same bytes; a part that a reducer could not reduce is a failure of the round, not a silently local
value; and a sender that drops out mid-round makes its reducers give up instead of averaging without
it (the survivors would otherwise apply a mean over fewer samples than they agreed on). The reducer
is hivemind's weighted mean or ``CenteredClipReducer`` (train/robust.py).

``ExactAveraging`` is a mixin for any hivemind averager (``DecentralizedAverager``,
``GradientAverager``, ``PowerSGDGradientAverager``, ``ACPSGDGradientAverager``) that runs its
all-reduces with that runner; ``make_averager`` builds one for ``plain``, ``powersgd`` or ``acp``.
The compressed averagers stay exact because everything they derive from a round (PowerSGD's Q, the
ACP-SGD factors) is itself a result of the all-reduce.

``StageAverager`` is what a stage peer (a training server, or a trainer for its client-side parts)
runs. It accumulates microbatch gradients weighted by their samples (once per microbatch id per
epoch), publishes its progress in the DHT, and when the stage's live peers together hold the target
batch it runs a round: the mean of its own gradients goes through the averager with weight = its
samples, so the group gets Σ grad·samples / Σ samples, and the round's gathered metadata (the same
dict on every member) decides whether to apply: the same epoch everywhere and at least the target
samples in the group. Otherwise nothing is applied and the gradients go back to the accumulators,
so a microbatch counts exactly once even when a round fails. A peer alone at its epoch applies its
own mean once it holds the target by itself; a peer that finds another at a higher epoch loads the
stage's state (``fetch_state``) instead of stepping on its own.

One failure is ambiguous: the all-reduce fails here after this peer's parts went out (a reducer's
reply was lost), while a partner got every part and applied the round. Putting the gradients back
would count them again at the next epoch. So each attempt gathers a random token; an applied round
records every member's token with its epoch in the stage's state, and a peer whose round failed once
its all-reduce had started keeps that round's gradients apart ("in doubt"), still offering them in
its next rounds at the same epoch (under their own token, so an applied round spends them) until a
state it loads settles them: spent if their token is in the state's record of that epoch, back into
the accumulators if not.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing as mp
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.compression import NoCompression, deserialize_torch_tensor, serialize_torch_tensor
from hivemind.dht import DHT
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import amap_in_executor, as_aiter, azip

from stamen.errors import InvalidRequestError, StageEpochError
from stamen.train.acp import ACPSGDGradientAverager
from stamen.train.robust import CenteredClipReducer

logger = logging.getLogger(__name__)

AveragingKind = Literal["plain", "powersgd", "acp"]
Aggregation = Literal["mean", "centered_clip"]
StageStateDict = tuple[int, dict[str, torch.Tensor], dict[str, Any]]
"""(epoch, tensors, meta) as ``StageAverager.state`` gives them and ``load_state`` takes them."""

ReducerFactory = Callable[[Sequence[torch.Size], int], TensorPartReducer]


class ExactAllReduceRunner(AllReduceRunner):
    """hivemind's butterfly all-reduce, but every member receives the reducer's averaged part itself
    (not a delta to add), so all members end with the same bytes; ``reducer_factory`` replaces the
    weighted-mean reducer (e.g. with CenteredClip). A reducer gives up on a sender that fails mid-round
    rather than reducing without it. Failed parts are reported in ``tensor_part_container.failed_size``
    (they hold the local values); ``ExactAveraging`` turns them into an error."""

    def __init__(self, *, reducer_factory: ReducerFactory | None = None, **kwargs):
        super().__init__(**kwargs)
        self.tensor_part_container.return_deltas = False  # a failed reducer's parts: our own values
        if reducer_factory is not None:
            default = self.tensor_part_reducer
            default.finished.set()  # unused: no "received 0%" warning when it is collected
            self.tensor_part_reducer = reducer_factory(default.part_shapes, default.num_senders)

    async def _reduce_part(self, sender_index: int, part_index: int, part: torch.Tensor,
                           weight: float) -> torch.Tensor:
        """The reduced part, or ``AllreduceException`` once the reducer gave up (a sender failed)."""
        reducer = self.tensor_part_reducer
        if reducer.finished.is_set():
            raise AllreduceException("the reduction was abandoned: a sender failed")
        try:
            return await reducer.accumulate_part(sender_index, part_index, part, weight=weight)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if reducer.finished.is_set() and not (task is not None and task.cancelling()):
                raise AllreduceException("the reduction was abandoned: a sender failed") from None
            raise

    async def _communicate_with_peer(self, peer_id: PeerID):
        if peer_id != self.peer_id:  # a remote reducer's replies are averaged parts: registered as they come
            return await super()._communicate_with_peer(peer_id)
        peer_index = self.ordered_peer_ids.index(peer_id)
        sender_index = self.sender_peer_ids.index(peer_id)
        try:
            for part_index, part in enumerate(self.parts_for_local_averaging):
                averaged = await self._reduce_part(sender_index, part_index, part, self.weight)
                self.tensor_part_container.register_processed_part(peer_index, part_index, averaged)
        except BaseException:
            self.tensor_part_container.register_failed_reducer(peer_index)  # the output iterator must not hang
            raise

    async def _accumulate_parts_streaming(self, stream: AsyncIterator[averaging_pb2.AveragingData],
                                          sender_index: int) -> AsyncIterator[averaging_pb2.AveragingData]:
        loop = asyncio.get_running_loop()
        received = 0
        try:
            async for part, weight in amap_in_executor(
                    lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight), stream,
                    max_prefetch=self.tensor_part_container.prefetch):
                try:
                    averaged = await self._reduce_part(sender_index, received, part, weight)
                except BannedException:
                    break
                received += 1
                # uncompressed, whatever the sender used: every member must get the very same values
                reply = await loop.run_in_executor(None, serialize_torch_tensor, averaged,
                                                   runtime_pb2.CompressionType.NONE)
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=reply)
        finally:
            if received != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])

    async def _ban_sender(self, peer_id: PeerID):
        async with self.banlock:
            if peer_id not in self.banned_senders:
                self.banned_senders.add(peer_id)
                # hivemind would go on reducing without it; a mean over fewer senders than the group
                # gathered is not what the members agreed to apply, so this reducer's parts all fail
                self.tensor_part_reducer.finalize()


class ExactAveraging:
    """Mixin for a hivemind averager (put it first in the bases): its all-reduces run with
    ``ExactAllReduceRunner``, results are copied into the averaged tensors, and a round with a part
    that was not reduced raises ``AllreduceException`` (the tensors then hold partly averaged values,
    as hivemind would leave them).

    ``aggregation="centered_clip"`` reduces each partition with CenteredClip (``tau``,
    ``clip_iterations``); the averager's process reports how hard each sender was clipped:
    ``clip_history`` is, per peer id, the mean clip factor of that peer's parts in each round this peer
    reduced some of them (1.0: never clipped), and ``suspects`` names the peers clipped hard in several
    consecutive rounds. A peer only sees the partitions it reduces (hivemind sizes them by announced
    bandwidth), so the evidence is local to each peer.

    ``bytes_sent`` counts what this peer sent in all-reduces (its parts to the other reducers and its
    reduced partition back to the other senders), for the benchmark."""

    def __init__(self, *args, aggregation: Aggregation = "mean", tau: float = 1.0, clip_iterations: int = 20,
                 exclude_suspects: bool = True, suspect_rounds: int = 3, suspect_threshold: float = 0.5, **kwargs):
        if aggregation not in ("mean", "centered_clip"):
            raise ValueError(f"aggregation must be mean or centered_clip, got {aggregation!r}")
        if aggregation == "centered_clip" and tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.aggregation, self.tau, self.clip_iterations = aggregation, tau, clip_iterations
        self.exclude_suspects, self.suspect_rounds, self.suspect_threshold = \
            exclude_suspects, suspect_rounds, suspect_threshold
        self._seen_clips: dict[str, list[float]] = {}
        """The clip history as the averager's own process sees it (it decides exclusions there)."""
        # created before the averager's process forks: it writes, this process reads
        self._clip_reports = mp.SimpleQueue()
        self._started_reports = mp.SimpleQueue()
        self._started: list[str] = []
        self._clip_history: dict[str, list[float]] = {}
        self._bytes_sent = mp.Value(ctypes.c_int64, 0)
        super().__init__(*args, **kwargs)

    def _make_reducer(self, part_shapes: Sequence[torch.Size], num_senders: int) -> TensorPartReducer:
        return CenteredClipReducer(part_shapes, num_senders, self.tau, self.clip_iterations)

    async def _run_allreduce_inplace_(self, tensors: Sequence[torch.Tensor], group_info: GroupInfo,
                                      group_id: bytes | None = None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        runner = ExactAllReduceRunner(
            reducer_factory=self._make_reducer if self.aggregation == "centered_clip" else None,
            p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors, group_id=group_id,
            ordered_peer_ids=group_info.peer_ids, **kwargs)
        if isinstance(runner.tensor_part_reducer, CenteredClipReducer) and self.exclude_suspects:
            runner.tensor_part_reducer.excluded = {
                i for i, peer in enumerate(runner.sender_peer_ids)
                if _suspected(self._seen_clips.get(str(peer), []), self.suspect_rounds, self.suspect_threshold)}
        self._running_groups[group_id].set_result(runner)
        my_index = group_info.peer_ids.index(self.peer_id)
        attempt = _attempt_of(self.serializer, group_info.gathered[my_index])
        if attempt is not None:  # before any part leaves: from here on a partner may apply with our parts
            self._started_reports.put(attempt)
        if runner.modes[my_index] == AveragingMode.AUX:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")
        else:
            async for tensor, averaged in azip(as_aiter(*tensors), runner):
                tensor.copy_(averaged)
            self.last_updated = get_dht_time()
            self._state_updated.set()
            self._count_bytes(runner, tensors, my_index)
        if isinstance(runner.tensor_part_reducer, CenteredClipReducer):
            reducer = runner.tensor_part_reducer
            report = {str(peer): sum(factors) / len(factors) for peer, factors
                      in zip(runner.sender_peer_ids, reducer.clip_factors, strict=True) if factors}
            for peer, factor in report.items():
                self._seen_clips.setdefault(peer, []).append(factor)
                if _suspected(self._seen_clips[peer], self.suspect_rounds, self.suspect_threshold) and \
                        not _suspected(self._seen_clips[peer][:-1], self.suspect_rounds, self.suspect_threshold):
                    logger.warning("peer %s was clipped to at most %.2f of its distance in %d consecutive rounds: "
                                   "its gradients are left out of the partitions this peer reduces%s", peer,
                                   self.suspect_threshold, self.suspect_rounds,
                                   "" if self.exclude_suspects else " (not: exclude_suspects is off)")
            self._clip_reports.put(report)
        container = runner.tensor_part_container
        if container.failed_size:
            raise AllreduceException(f"{container.failed_size} of {container.total_size} values were not "
                                     "reduced by the group")

    def _count_bytes(self, runner: AllReduceRunner, tensors: Sequence[torch.Tensor], my_index: int) -> None:
        total = sum(t.numel() * t.element_size() for t in tensors)
        fractions = runner.peer_fractions
        share = fractions[my_index] / sum(fractions) if sum(fractions) > 0 else 0.0
        sent = total * (1 - share) + total * share * (len(runner.sender_peer_ids) - 1)
        with self._bytes_sent.get_lock():
            self._bytes_sent.value += int(sent)

    @property
    def bytes_sent(self) -> int:
        return int(self._bytes_sent.value)

    def shared_buffers(self) -> list[torch.Tensor]:
        """Averager state that every member of a group must hold equal (compression factors, round
        parity): part of a stage's state, loaded by joiners. In shared memory."""
        return []

    def local_buffers(self) -> list[torch.Tensor]:
        """Per-peer averager state (error feedback): restored when a round is not applied, not shared."""
        return []

    def started(self, attempt: str) -> bool:
        """Whether the step gathered with ``attempt=attempt`` reached the all-reduce (its parts may
        have gone out: a partner may have applied them even if this peer's round then failed)."""
        while not self._started_reports.empty():
            self._started.append(self._started_reports.get())
        del self._started[:-64]
        return attempt in self._started

    @property
    def clip_history(self) -> dict[str, list[float]]:
        while not self._clip_reports.empty():
            for peer, factor in self._clip_reports.get().items():
                self._clip_history.setdefault(peer, []).append(factor)
        return self._clip_history

    def suspects(self, rounds: int | None = None, threshold: float | None = None) -> list[str]:
        """Peers whose parts were clipped to at most ``threshold`` of their distance in each of the
        last ``rounds`` rounds (an honest peer's ordinary noise stays within τ and is not clipped);
        by default the averager's own rule, under which it leaves their parts out
        (``exclude_suspects``): an excluded peer counts as clipped to 0, so it stays a suspect."""
        rounds = self.suspect_rounds if rounds is None else rounds
        threshold = self.suspect_threshold if threshold is None else threshold
        return sorted(peer for peer, history in self.clip_history.items() if _suspected(history, rounds, threshold))


def _attempt_of(serializer: Any, gathered: bytes) -> str | None:
    """The ``attempt`` token in a member's gathered bytes (hivemind's (bandwidth, mode, user data))."""
    try:
        _, _, user = serializer.loads(gathered)
        attempt = serializer.loads(user).get("attempt")
    except Exception:
        return None
    return attempt if isinstance(attempt, str) else None


def _suspected(history: Sequence[float], rounds: int, threshold: float) -> bool:
    return len(history) >= rounds and max(history[-rounds:]) <= threshold


class RobustAverager(ExactAveraging):
    """``ExactAveraging`` with CenteredClip aggregation (re-exported by train/robust.py)."""

    def __init__(self, *args, tau: float = 1.0, clip_iterations: int = 20, **kwargs):
        super().__init__(*args, aggregation="centered_clip", tau=tau, clip_iterations=clip_iterations, **kwargs)


class ExactGradientAverager(ExactAveraging, GradientAverager):
    """Plain averaging: the weighted mean of the peers' gradients."""


class ExactPowerSGDAverager(ExactAveraging, PowerSGDGradientAverager):
    """hivemind's PowerSGD (two all-reduces a round: P, then Q and the 1-D tensors)."""

    def shared_buffers(self) -> list[torch.Tensor]:
        return list(self._qs)

    def local_buffers(self) -> list[torch.Tensor]:
        return list(self._ms)


class ExactACPAverager(ExactAveraging, ACPSGDGradientAverager):
    """ACP-SGD (train/acp.py): one all-reduce a round, P and Q in alternate rounds."""

    def shared_buffers(self) -> list[torch.Tensor]:
        return [*self._ps, *self._qs, self._phase.view(1)]

    def local_buffers(self) -> list[torch.Tensor]:
        return list(self._ms)


AVERAGERS: dict[str, type[GradientAverager]] = {
    "plain": ExactGradientAverager, "powersgd": ExactPowerSGDAverager, "acp": ExactACPAverager}


def averager_prefix(prefix: str) -> str:
    """hivemind's group prefix may not contain dots (it appends its own): the same key, dots replaced."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", prefix)


def make_averager(kind: AveragingKind, params: Sequence[torch.nn.Parameter], *, dht: DHT, prefix: str,
                  rank: int = 4, aggregation: Aggregation = "mean", tau: float = 1.0, clip_iterations: int = 20,
                  matchmaking_time: float = 1.0, averaging_timeout: float = 30.0, start: bool = True,
                  **kwargs) -> GradientAverager:
    """A started exact gradient averager of ``kind`` over ``params`` (plain, powersgd with
    ``rank``, acp with ``rank``), its group key derived from ``prefix``. It leaves the parameters'
    ``.grad`` as it found them and never compresses tensors on the wire (lossy compression would
    break bitwise equality). ``kwargs`` go to the hivemind averager."""
    if kind not in AVERAGERS:
        raise ValueError(f"averaging must be one of {sorted(AVERAGERS)}, got {kind!r}")
    params = tuple(params)
    grads = [p.grad for p in params]  # hivemind creates .grad buffers for shapes; we put them back
    options: dict[str, Any] = dict(
        dht=dht, prefix=averager_prefix(prefix), aggregation=aggregation, tau=tau, clip_iterations=clip_iterations,
        min_matchmaking_time=matchmaking_time, request_timeout=min(3.0, 0.75 * matchmaking_time),
        allreduce_timeout=averaging_timeout, compression=NoCompression(), start=False)
    options.update(kwargs)
    cls = AVERAGERS[kind]
    averager = cls(params, rank, **options) if kind != "plain" else cls(params, **options)
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad
    if kind == "powersgd":  # hivemind draws Q at random per peer: the group's peers must start from the same
        generator = torch.Generator().manual_seed(0)
        for q in averager._qs:
            q.copy_(torch.rand(q.shape, generator=generator))
    if start:
        averager.run_in_background(await_ready=True)
    return averager


SPENT_EPOCHS = 32
"""Applied epochs whose attempt tokens a stage's state carries (a peer behind by more drops its doubts)."""
MAX_DOUBTS = 4
"""Rounds in doubt a peer keeps apart at one epoch (each a copy of the span's gradients); beyond it the
oldest goes back to the accumulators."""


@dataclass
class _Taken:
    """What a round took out of the accumulators (put back if the round is not applied), and the
    token its attempt gathered under."""

    grads: list[torch.Tensor]
    samples: int
    ids: set[str]
    token: str = ""


class StageAverager:
    """A stage peer's gradient accumulation and synchronized optimizer steps (see the module doc).

    ``params`` are the trained parameters (the optimizer is built over them by ``optimizer``),
    ``names`` their names in states (default: their indices). ``prefix`` keys the group: peers with the
    same prefix, averaging kind and rank average together, and publish their progress under
    ``f"{prefix}.progress"``. ``apply(fn)`` runs an optimizer step or a state load (the server passes a
    function that runs ``fn`` under its compute lock); never call ``accumulate``, ``round`` or
    ``load_state`` while holding that lock. ``fetch_state()`` gets the state of a peer ahead of this
    one (``None`` if none could be had)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], *, dht: DHT, prefix: str, target_batch_size: int,
                 optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
                 averaging: AveragingKind = "plain", rank: int = 4, aggregation: Aggregation = "mean",
                 tau: float = 1.0, clip_iterations: int = 20, matchmaking_time: float = 1.0,
                 averaging_timeout: float = 30.0, progress_period: float = 0.5,
                 apply: Callable[[Callable[[], None]], None] | None = None,
                 fetch_state: Callable[[], StageStateDict | None] | None = None, label: str = "",
                 names: Sequence[str] | None = None, **averager_kwargs):
        if target_batch_size <= 0:
            raise ValueError(f"target_batch_size must be positive, got {target_batch_size}")
        self.params = list(params)
        self.names = [str(i) for i in range(len(self.params))] if names is None else list(names)
        if len(self.names) != len(self.params) or len(set(self.names)) != len(self.names):
            raise ValueError("names must be unique, one per parameter")
        self.dht, self.prefix, self.target_batch_size = dht, prefix, target_batch_size
        self.averaging, self.label = averaging, label or prefix
        self.matchmaking_time, self.averaging_timeout = matchmaking_time, averaging_timeout
        self.progress_period = progress_period
        self.optimizer = optimizer(self.params)
        self._apply = apply or (lambda fn: fn())
        self._fetch_state = fetch_state

        self._lock = threading.Lock()
        """Guards the accumulators, ids, samples, epoch."""
        self._changed = threading.Condition(self._lock)
        """Notified when a round ends (the epoch may have moved)."""
        self._round_lock = threading.Lock()
        """One round at a time (the background loop and direct calls)."""
        self._state_lock = threading.Lock()
        """Parameters, optimizer and the averager's shared state change together under it."""
        self._grads: list[torch.Tensor] | None = None
        """The accumulators (float32 sums of samples × gradient), allocated at the first microbatch after
        a round took them: one copy of the span's gradients between rounds, never a spare one."""
        self._samples = 0
        self._ids: set[str] = set()
        self._taken: _Taken | None = None
        self._doubts: list[_Taken] = []
        """Rounds of this epoch whose all-reduce failed here after this peer's parts went out: a partner
        may have applied them. Kept apart from the accumulators until that is known: dropped when the
        stage's state says so, put back when it says not, and carried into the next round meanwhile."""
        self._spent: dict[int, list[str]] = {}
        """Per applied epoch (the last ``SPENT_EPOCHS``), the attempt tokens the group applied."""
        self.epoch = 0

        self.averager = make_averager(
            averaging, self.params, dht=dht, prefix=prefix, rank=rank, aggregation=aggregation, tau=tau,
            clip_iterations=clip_iterations, matchmaking_time=matchmaking_time,
            averaging_timeout=averaging_timeout, reuse_grad_buffers=True, **averager_kwargs)
        # (reuse_grad_buffers: the averager keeps no accumulators of its own; ours are fed to it directly)
        self._shared = [b.clone() for b in self.averager.shared_buffers()]
        """The averager's shared state as of the current epoch (a round changes the live one before it
        is applied or not), for ``state``."""
        self._peer = dht.peer_id.to_base58()
        self._progress_key = f"{prefix}.progress"
        self.rounds = 0
        """Rounds applied."""
        self.failed_rounds = 0
        self.last_round_seconds = 0.0
        """Wall time of the last applied round (matchmaking, all-reduce and the optimizer step)."""
        self.last_round_bytes = 0
        """Bytes this peer sent in the all-reduces of the last applied round (0 when it stepped alone)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- accumulation -------------------------------------------------------------------------

    @property
    def samples(self) -> int:
        """Samples this peer accumulated in the current epoch (a round in flight included)."""
        with self._lock:
            return self._samples + (self._taken.samples if self._taken else 0) + \
                sum(d.samples for d in self._doubts)

    def accumulate(self, mb_id: str, samples: int, grads: Sequence[torch.Tensor | None], epoch: int | None) -> bool:
        """Add a microbatch's weight gradients (of its mean loss; ``None``: zero), weighted by its
        ``samples``. False if ``mb_id`` was already counted this epoch. A bad gradient raises
        ``InvalidRequestError`` and changes nothing; ``epoch`` other than the stage's (``None``: any)
        raises ``StageEpochError``. With an explicit epoch while a round is in flight it waits for the
        round: the microbatch either belongs to the round's epoch, if it is not applied, or is refused."""
        if isinstance(samples, bool) or not isinstance(samples, int) or samples <= 0:
            raise InvalidRequestError(f"{self.label}: samples must be a positive integer, got {samples!r}")
        if len(grads) != len(self.params):
            raise InvalidRequestError(f"{self.label}: {len(grads)} gradients for {len(self.params)} parameters")
        for name, grad, param in zip(self.names, grads, self.params, strict=True):
            if grad is None:
                continue
            if not isinstance(grad, torch.Tensor) or grad.shape != param.shape:
                shape = tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__
                raise InvalidRequestError(f"{self.label}: gradient of {name} has shape {shape}, "
                                          f"expected {tuple(param.shape)}")
            if not grad.is_floating_point() or not bool(torch.isfinite(grad).all()):
                raise InvalidRequestError(f"{self.label}: gradient of {name} is not finite")
        with self._lock:
            while epoch is not None and self._taken is not None and epoch == self.epoch:
                self._changed.wait()
            if epoch is not None and epoch != self.epoch:
                raise StageEpochError(f"{self.label}: microbatch {mb_id} is for epoch {epoch}, the stage is at "
                                      f"{self.epoch}")
            if mb_id in self._ids or (self._taken is not None and mb_id in self._taken.ids) or \
                    any(mb_id in d.ids for d in self._doubts):
                return False
            if self._grads is None:
                self._grads = self._zeros()
            for acc, grad in zip(self._grads, grads, strict=True):
                if grad is not None:
                    acc.add_(grad.detach().to(acc.device, torch.float32), alpha=samples)
            self._ids.add(mb_id)
            self._samples += samples
            return True

    def _take(self) -> _Taken:
        """Move the accumulators out for a round; microbatches arriving meanwhile go to fresh ones."""
        with self._lock:
            taken = _Taken(self._grads if self._grads is not None else self._zeros(), self._samples, self._ids,
                           secrets.token_hex(8))
            self._grads = None
            self._samples, self._ids = 0, set()
            self._taken = taken
            return taken

    def _settle(self, taken: _Taken, applied: bool, doubtful: bool = False) -> None:
        """End a round: an applied round's gradients are spent (the doubts it carried too); a doubtful
        one's are kept apart; otherwise they join what arrived since."""
        with self._lock:
            if applied:  # spent: reused as the next accumulators unless microbatches came meanwhile
                self._doubts.clear()
                if self._grads is None:
                    for buffer in taken.grads:
                        buffer.zero_()
                    self._grads = taken.grads
            elif doubtful:
                self._doubts.append(taken)
                if len(self._doubts) > MAX_DOUBTS:
                    oldest = self._doubts.pop(0)
                    logger.warning("%s: %d rounds in doubt at epoch %d; the oldest goes back to the accumulators "
                                   "(its samples may count twice)", self.label, MAX_DOUBTS + 1, self.epoch)
                    self._restore(oldest)
            else:
                self._restore(taken)
            self._taken = None
            self._changed.notify_all()

    def _restore(self, taken: _Taken) -> None:
        """Put ``taken`` back into the accumulators (under ``_lock``)."""
        if self._grads is not None:
            for acc, grad in zip(taken.grads, self._grads, strict=True):
                acc.add_(grad)
        self._grads = taken.grads
        self._samples += taken.samples
        self._ids |= taken.ids

    # --- rounds -------------------------------------------------------------------------------

    def round(self) -> bool:
        """One attempt at a step (see the module doc); True if the group applied it (a peer whose own
        optimizer step then failed is behind its stage and loads the stage's state)."""
        with self._round_lock:
            started = time.monotonic()
            taken = self._take()
            applied = doubtful = False
            sent = 0
            try:
                applied, sent, doubtful = self._run_round(taken)
            except Exception:
                logger.warning("%s: round at epoch %d failed", self.label, self.epoch, exc_info=True)
            finally:
                self._settle(taken, applied, doubtful)
            if applied:
                self.rounds += 1
                self.last_round_seconds = time.monotonic() - started
                self.last_round_bytes = sent
            else:
                self.failed_rounds += 1
            return applied

    def _zeros(self) -> list[torch.Tensor]:
        return [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in self.params]

    def _run_round(self, taken: _Taken) -> tuple[bool, int, bool]:
        """(applied, bytes sent, whether a failed round is in doubt: a partner may have applied it)."""
        # no copy of the span's gradients is made here: the mean goes straight into the averager's
        # buffers, and a solo step divides the taken sums in place (an applied round spends them)
        self._publish()
        epochs = [epoch for peer, (epoch, _) in self._progress().items() if peer != self._peer]
        if any(epoch > self.epoch for epoch in epochs):
            return False, 0, False  # behind: stepping now would fork the stage; the state is loaded instead
        if self.epoch not in epochs:
            with self._lock:  # alone at this epoch: no partner applied the doubts, they step with the rest
                if taken.samples + sum(d.samples for d in self._doubts) < self.target_batch_size:
                    return False, 0, False
                for doubt in self._doubts:
                    for acc, grad in zip(taken.grads, doubt.grads, strict=True):
                        acc.add_(grad)
                    taken.samples += doubt.samples
                    taken.ids |= doubt.ids
                tokens = [taken.token, *(d.token for d in self._doubts)]
                self._doubts.clear()
            try:
                self._step([g.div_(taken.samples) for g in taken.grads], tokens)
            except BaseException:  # not applied: the sums go back to the accumulators
                for g in taken.grads:
                    g.mul_(taken.samples)
                raise
            return True, 0, False
        before = self.averager.bytes_sent
        averaged, spent, doubtful = self._average(taken)
        if averaged is None:
            return False, 0, doubtful
        try:
            self._step(averaged, spent)
        except Exception:
            # the group applied these microbatches (every member agreed): they are spent even though this
            # peer's own step failed; it is now behind its stage and loads the stage's state (``_tick``)
            logger.exception("%s: the group stepped at epoch %d but this peer's optimizer step failed; it "
                             "will load the stage's state", self.label, self.epoch)
        return True, self.averager.bytes_sent - before, False

    def _average(self, taken: _Taken) -> tuple[list[torch.Tensor] | None, list[str], bool]:
        """(the group's weighted mean gradients, written over ``taken.grads``, and the attempt tokens the
        group applied), or (None, [], doubtful) if the round must not be applied (``taken.grads`` and the
        averager's state are then as before the round). This peer's share: ``taken`` and the doubts of
        its epoch, under ``taken.token`` and theirs. ``doubtful``: the round failed here after this
        peer's parts went out, so a partner may have applied it."""
        averager = self.averager
        doubts = list(self._doubts)
        samples = taken.samples + sum(d.samples for d in doubts)
        saved = [b.clone() for b in averager.shared_buffers() + averager.local_buffers()]
        with averager.get_tensors() as buffers:
            for i, (buffer, grad) in enumerate(zip(buffers, taken.grads, strict=True)):
                buffer.copy_(grad)
                for doubt in doubts:
                    buffer.add_(doubt.grads[i])
                if samples > 0:
                    buffer.div_(samples)
                else:
                    buffer.zero_()
        gathered = control = None
        gather = dict(epoch=self.epoch, samples=samples, attempt=taken.token, carried=[d.token for d in doubts])
        try:  # not GradientAverager.step: it would load its own accumulators into the averaged tensors
            control = DecentralizedAverager.step(
                averager, gather=gather, weight=float(samples), timeout=self.averaging_timeout,
                allow_retries=False, wait=False)
            gathered = control.result(2 * self.averaging_timeout + self.matchmaking_time + 5)
        except Exception as e:
            if control is not None:
                control.cancel()
            logger.info("%s: no all-reduce at epoch %d: %r", self.label, self.epoch, e)
        agreed = gathered is not None and self._agreed(gathered)
        if not agreed:
            for live, old in zip(averager.shared_buffers() + averager.local_buffers(), saved, strict=True):
                live.copy_(old)
            # the gathered dict reaches every member alike, so a refusal is the group's; a failure is
            # in doubt once the all-reduce started
            doubtful = gathered is None and isinstance(averager, ExactAveraging) and averager.started(taken.token)
            if doubtful:
                logger.warning("%s: the all-reduce at epoch %d failed after this peer's parts went out; its "
                               "%d samples are kept apart until the stage's state says whether a partner "
                               "applied them", self.label, self.epoch, taken.samples)
            return None, [], doubtful
        with averager.get_tensors() as buffers:
            for grad, buffer in zip(taken.grads, buffers, strict=True):
                grad.copy_(buffer)
        return taken.grads, _attempts(gathered), False

    def _agreed(self, gathered: dict[PeerID, Any]) -> bool:
        """The group may apply: every member at this epoch, and the target batch among them."""
        total = 0
        for meta in gathered.values():
            if not isinstance(meta, dict) or meta.get("epoch") != self.epoch:
                logger.info("%s: a group member is at another epoch: %r", self.label, meta)
                return False
            samples = meta.get("samples")
            if not isinstance(samples, int) or samples < 0:
                return False
            total += samples
        if total < self.target_batch_size:
            logger.info("%s: the group holds %d of %d samples, not stepping", self.label, total,
                        self.target_batch_size)
            return False
        return True

    def _step(self, grads: list[torch.Tensor], spent: list[str]) -> None:
        """Apply averaged gradients: one optimizer step, the next epoch (through ``apply``); ``spent``:
        the attempt tokens the step applied, recorded with the epoch for peers that were in doubt."""
        def step() -> None:
            with self._state_lock:
                for param, grad in zip(self.params, grads, strict=True):
                    param.grad = grad.to(param.device, param.dtype)
                self.optimizer.step()
                for param in self.params:
                    param.grad = None
                self._shared = [b.clone() for b in self.averager.shared_buffers()]
                with self._lock:
                    self._spent[self.epoch] = spent
                    for old in [e for e in self._spent if e <= self.epoch - SPENT_EPOCHS]:
                        del self._spent[old]
                    self.epoch += 1
        self._apply(step)

    def suspects(self) -> list[str]:
        """Peers of the group this peer found Byzantine (``aggregation="centered_clip"``: clipped hardest
        in several consecutive rounds; their gradients are left out of what this peer reduces)."""
        return self.averager.suspects() if isinstance(self.averager, ExactAveraging) else []

    def wait_epoch(self, epoch: int, timeout: float) -> bool:
        """Wait until the stage reached ``epoch``; False on timeout."""
        with self._lock:
            return self._changed.wait_for(lambda: self.epoch >= epoch, timeout)

    # --- progress and the background loop ------------------------------------------------------

    def _publish(self) -> None:
        # keyed by the raw peer id, as hivemind's own averaging records are (a swarm's DHT accepts such
        # unsigned records only when they are short-lived: dht/node.py RecordPolicy)
        self.dht.store(self._progress_key, subkey=self.dht.peer_id.to_bytes(),
                       value=dict(epoch=self.epoch, samples=self.samples),
                       expiration_time=get_dht_time() + 4 * self.progress_period)

    def _progress(self) -> dict[str, tuple[int, int]]:
        """Fresh progress records of the stage's peers: {peer id: (epoch, samples)}."""
        found = self.dht.get(self._progress_key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return {}
        now, progress = get_dht_time(), {}
        for peer, item in found.value.items():
            value = getattr(item, "value", None)
            if getattr(item, "expiration_time", 0) < now or not isinstance(value, dict):
                continue
            epoch, samples = value.get("epoch"), value.get("samples")
            if isinstance(epoch, int) and isinstance(samples, int):
                progress[PeerID(peer).to_base58() if isinstance(peer, bytes) else str(peer)] = (epoch, samples)
        return progress

    def start(self) -> None:
        """Publish progress and run rounds (or catch up) in a background thread until ``shutdown``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"stage-averager {self.label}", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:
                logger.warning("%s: averaging loop", self.label, exc_info=True)
            self._stop.wait(self.progress_period)

    def progress(self) -> dict[str, tuple[int, int]]:
        """(epoch, samples) of the group's live peers, this one included (fresh progress records)."""
        return self._progress()

    def peers_ahead(self) -> list[tuple[int, str]]:
        """(epoch, peer id) of the group's peers at a higher epoch than this one, furthest ahead first
        (from their fresh progress records)."""
        return sorted(((epoch, peer) for peer, (epoch, _) in self._progress().items()
                       if peer != self._peer and epoch > self.epoch), reverse=True)

    def catch_up(self) -> bool:
        """Load the state of a peer ahead of this one (``fetch_state``, through ``apply``); True if one
        was loaded. Call it where ``round`` may be called."""
        if self._fetch_state is None:
            return False
        state = self._fetch_state()
        if state is None or state[0] <= self.epoch:  # never step backwards
            return False
        self._apply(lambda: self.load_state(*state))
        logger.info("%s: caught up with the stage at epoch %d", self.label, state[0])
        return True

    def _tick(self) -> None:
        self._publish()
        progress = self._progress()
        others = {peer: value for peer, value in progress.items() if peer != self._peer}
        ahead = max((epoch for epoch, _ in others.values()), default=-1)
        if ahead > self.epoch:
            self.catch_up()
            return
        total = self.samples + sum(samples for epoch, samples in others.values() if epoch == self.epoch)
        if total >= self.target_batch_size:
            self.round()

    # --- state ---------------------------------------------------------------------------------

    def state(self, optimizer: bool = True) -> StageStateDict:
        """(epoch, tensors, meta) of this peer: "param.<name>" (copies), and with ``optimizer`` the
        optimizer's tensors "optim.<i>.<key>" and the averager's shared state "averager.<i>"; meta holds
        the optimizer's param groups and non-tensor state."""
        with self._state_lock:
            tensors = {f"param.{name}": p.detach().clone() for name, p in zip(self.names, self.params, strict=True)}
            with self._lock:
                spent = {str(epoch): list(tokens) for epoch, tokens in self._spent.items()}
            meta: dict[str, Any] = dict(averaging=self.averaging, spent=spent)
            if optimizer:
                saved = self.optimizer.state_dict()
                scalars: dict[str, dict[str, Any]] = {}
                for index, values in saved["state"].items():
                    for key, value in values.items():
                        if isinstance(value, torch.Tensor):
                            tensors[f"optim.{index}.{key}"] = value.detach().clone()
                        else:
                            scalars.setdefault(str(index), {})[key] = value
                meta.update(param_groups=_plain(saved["param_groups"]), optimizer_state=scalars)
                tensors.update({f"averager.{i}": b.clone() for i, b in enumerate(self._shared)})
            return self.epoch, tensors, meta

    def load_state(self, epoch: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Become an exact copy of the peer whose ``state`` this is (optimizer and averager state too,
        if included). The accumulated gradients stay; rounds in doubt are settled by the state's record
        of what its epochs applied: dropped if the stage applied them, put back if not (dropped, with a
        warning, if the state's record does not reach back to this peer's epoch). It runs in the
        caller's thread, not through ``apply`` (a joiner loads before it serves; the background loop
        wraps it in ``apply``); call it neither during a ``round`` nor after ``start`` from another
        thread than ``apply``'s lock holder."""
        for name, param in zip(self.names, self.params, strict=True):
            value = tensors.get(f"param.{name}")
            if not isinstance(value, torch.Tensor) or value.shape != param.shape:
                raise InvalidRequestError(f"{self.label}: the state has no parameter {name} of shape "
                                          f"{tuple(param.shape)}")
        spent = _parse_spent(meta.get("spent", {}), self.label)
        shared = [tensors.get(f"averager.{i}") for i in range(len(self._shared))]
        with_optimizer = "param_groups" in meta
        if with_optimizer and any(t is None or t.shape != b.shape for t, b in zip(shared, self._shared, strict=True)):
            raise InvalidRequestError(f"{self.label}: the state's averager tensors do not match this averager")
        if with_optimizer:
            optimizer_state: dict[int, dict[str, Any]] = {}
            for index, values in meta.get("optimizer_state", {}).items():
                optimizer_state.setdefault(int(index), {}).update(values)
            for key, value in tensors.items():
                if key.startswith("optim."):
                    _, index, name = key.split(".", 2)
                    optimizer_state.setdefault(int(index), {})[name] = value.detach().clone()

        with self._state_lock:
            with torch.no_grad():
                for name, param in zip(self.names, self.params, strict=True):
                    param.copy_(tensors[f"param.{name}"])
            if with_optimizer:
                self.optimizer.load_state_dict(dict(state=optimizer_state, param_groups=meta["param_groups"]))
                for live, value in zip(self.averager.shared_buffers(), shared, strict=True):
                    live.copy_(value)
                self._shared = [b.clone() for b in self.averager.shared_buffers()]
            with self._lock:
                if epoch > self.epoch and self._doubts:
                    applied = spent.get(self.epoch)
                    for doubt in self._doubts:
                        if applied is None:
                            logger.warning("%s: %d samples in doubt at epoch %d dropped: the stage's state at epoch "
                                           "%d does not say whether they were applied", self.label,
                                           doubt.samples, self.epoch, epoch)
                        elif doubt.token not in applied:
                            self._restore(doubt)
                    logger.info("%s: settled %d rounds in doubt at epoch %d (%d applied by the stage)", self.label,
                                len(self._doubts), self.epoch,
                                sum(1 for d in self._doubts if applied is not None and d.token in applied))
                    self._doubts.clear()
                self._spent = spent
                self.epoch = epoch
                self._changed.notify_all()

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.averaging_timeout * 2 + self.matchmaking_time + 10)
        self.averager.shutdown()


def _attempts(gathered: dict[PeerID, Any]) -> list[str]:
    """Every attempt token the members of an applied round gathered (theirs and the doubts carried)."""
    tokens: list[str] = []
    for meta in gathered.values():
        if isinstance(meta, dict):
            for token in [meta.get("attempt"), *(meta.get("carried") or [])]:
                if isinstance(token, str) and token not in tokens:
                    tokens.append(token)
    return tokens


def _parse_spent(value: Any, label: str) -> dict[int, list[str]]:
    """A state's record of applied attempts ({epoch: [token]}), checked: a peer's word, bounded."""
    if not isinstance(value, dict) or len(value) > SPENT_EPOCHS:
        raise InvalidRequestError(f"{label}: the state's record of applied rounds is not a map of at most "
                                  f"{SPENT_EPOCHS} epochs")
    spent: dict[int, list[str]] = {}
    for key, tokens in value.items():
        if not (isinstance(key, str) and key.isdigit() and isinstance(tokens, list) and len(tokens) <= 4096
                and all(isinstance(t, str) and len(t) <= 64 for t in tokens)):
            raise InvalidRequestError(f"{label}: the state's record of applied rounds has a bad entry for {key!r}")
        spent[int(key)] = list(tokens)
    return spent


def _plain(value: Any) -> Any:
    """Param groups as plain data for the wire (tuples to lists, tensors to floats)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item()
    return value
