"""SWARM training from the trainer's side: the model's own weights train on ``--train`` servers.

A trainer holds the client parts (token embeddings, final norm, LM head; float32, trainable) and
averages their gradients with the other trainers in a ``StageAverager`` of its own (group
``{model}.trainers.{averaging}``). Training servers that host the same span form a **stage**; the
stages tile the model's blocks (``routing.stage_chain``).

A step (``SwarmTrainer.train_step``) splits the trainer's batch into microbatches that run
concurrently, each through its own randomized pipeline: for every stage a peer is drawn with
probability ∝ throughput / (1 + load) (``routing.draw_stage_peer``; load: the peer's announced
queue plus this trainer's microbatches in flight there). Forward opens a kept ``rpc_train``
stream per stage with the ``Microbatch`` (id ``{trainer}:{step}:{index}``, samples, the stage's
epoch in synchronous mode); the client computes the loss (mean token cross-entropy of the
microbatch) and its gradients, and backward walks the streams last to first. The stage peer that
runs a microbatch's backward adds its weight gradient to the stage's accumulators, once per id and
epoch; the client parts' gradients go to the trainers' averager once the whole microbatch is done.

**Exactly once.** Per stage, the trainer remembers which peer counted each of its microbatches in
the current epoch, with the hop's input and the gradient of its output. A peer failing:
- in forward: nothing was counted yet; the hop reruns on another peer of the stage.
- in backward (the kept stream broke): if the peer still answers a ping, the hop reruns *on the
  same peer* with the same id (it counts the microbatch only if it did not already); if not, on
  another peer of the stage. Only that stage's hop reruns, from the saved input with the saved
  output gradient; other stages are untouched.
- after counting, before its stage stepped (synchronous wait): a counting peer that fails two
  pings in a row took its accumulators with it, so the trainer reruns every microbatch that peer
  counted this epoch on another peer of the stage (``accumulate=True`` for that stage only).
A stage's epoch passing the one a microbatch was sent for means the stage stepped with it.

**Synchronous mode** (``sync=True``): microbatches carry each stage's epoch, and a step returns
once the trainers' group and every stage reached the next epoch (read from the stages' DHT
progress records and server records). Asynchronous: ``epoch=None``, no wait.

**Late and lagging trainers.** Each trainer serves the trainers' shared state (``rpc_trainer_state``
on its averaging peer); a trainer that starts while others trained, or falls behind them, loads it
from the one furthest ahead (``StageAverager.catch_up``).

**A trainer that leaves mid-step** leaves the stages and the trainers' group short of their
targets: a waiting trainer that sees no progress for ``top_up_after`` seconds runs more microbatches
of its own batch, each counted only where samples lack (``_top_up``).

Limits: a peer cut off but alive that counted a microbatch could be counted twice by the rerun.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time
from torch import nn

from stamen.client import loop
from stamen.client.config import ClientConfig
from stamen.client.retry import RetryBudget, backoff_delay, is_retryable
from stamen.client.routing import Candidate, draw_stage_peer, load_of, stage_chain
from stamen.client.swarm import Swarm
from stamen.client.train_config import TrainerConfig
from stamen.dht.node import owner_peer_id
from stamen.errors import (
    InvalidRequestError,
    RemoteCallError,
    ServerBusyError,
    ServerFullError,
    StageEpochError,
    SwarmNotReadyError,
)
from stamen.models import BlockConfig, load_client_parts, load_config, open_checkpoint
from stamen.models.llama import RMSNorm
from stamen.rpc import protocol
from stamen.rpc.calls import ping
from stamen.rpc.inputs import SpanInputs
from stamen.rpc.parts import CallRequests, call_server, read_all, reply_in_parts
from stamen.rpc.protocol import Response
from stamen.rpc.replies import error_response
from stamen.rpc.stage import fetch_trainer_state
from stamen.rpc.train import TrainStream
from stamen.types import ModelName, PeerIDStr, Span, default_dht_prefix
from stamen.wire.messages import Microbatch, StageState, decode_trainer_state_request
from stamen.wire.stream import serve

if TYPE_CHECKING:
    from stamen.train.averaging import StageStateDict

logger = logging.getLogger(__name__)

STATE_READ_TIMEOUT_S = 30.0
"""Most seconds a trainer waits for another's request for its state (one small message)."""
HELD_LOOK_S = 1.0
"""How often a synchronous wait reads what the stages and the trainers' group hold (for top-ups)."""
STATE_FETCH_TIMEOUT_S = 120.0
"""Most seconds a trainer takes to fetch the trainers' state from another (client parts and optimizer)."""

def _peer_of_subkey(subkey: Any) -> str:
    """The peer of an unsigned progress record: its subkey is the raw peer id (as hivemind keys its own)."""
    if isinstance(subkey, bytes):
        try:
            return PeerID(subkey).to_base58()
        except Exception:  # not a peer id: kept as text, it matches no peer
            return subkey.decode(errors="replace")
    return str(subkey)


@dataclass
class _Stage:
    """A training stage as the trainer sees it: its span and its live peers with their epochs."""

    span: Span
    averaging: str
    target_batch_size: int
    peers: dict[PeerIDStr, Candidate]
    epochs: dict[PeerIDStr, int]

    @property
    def epoch(self) -> int:
        return max(self.epochs.values(), default=0)


@dataclass
class _Counted:
    """A microbatch a stage peer counted: what a rerun of the stage's hop needs."""

    mb: Microbatch
    peer: PeerIDStr
    hidden: torch.Tensor
    """The hop's input."""
    grad: torch.Tensor
    """The gradient of the hop's output."""


@dataclass
class _Hop:
    stage: Span
    peer: PeerIDStr
    hidden: torch.Tensor
    stream: TrainStream


@dataclass
class StepResult:
    loss: float
    """Mean over the step's microbatches of their mean token cross-entropy."""
    tokens: int
    seconds: float
    reruns: int
    """Stage hops rerun this step (failed peers)."""


@dataclass
class TrainerStats:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    reruns: int = 0
    top_ups: int = 0
    """Microbatches run to fill what a stage or the trainers' group lacked after a stall."""
    lacked: dict[str, int] = field(default_factory=dict)
    """Samples lacking at the last top-up, by stage ("[0:2)") and "trainers"."""
    losses: list[float] = field(default_factory=list)


class SwarmTrainer:
    """Trains a model's blocks on the swarm's training stages and its client parts locally (see module doc)."""

    def __init__(self, model: str, initial_peers: Sequence[str], *, dht_prefix: str | None = None,
                 trainer: TrainerConfig | None = None, wait_for_servers: bool = True, **kwargs):
        """``kwargs``: ``TrainerConfig`` fields, then ``ClientConfig`` fields (swarm options)."""
        from stamen.dht.node import create_dht
        from stamen.process import children_die_with_me
        from stamen.train.averaging import StageAverager

        trainer_fields = {k: kwargs.pop(k) for k in list(kwargs) if k in TrainerConfig.model_fields}
        self.config = trainer or TrainerConfig(**trainer_fields)
        client = ClientConfig(initial_peers=list(initial_peers), dht_prefix=dht_prefix, **kwargs)
        self.model_path = str(model)
        self.hf_config = load_config(self.model_path)
        self.block_config = BlockConfig.from_hf(self.hf_config)
        parts = load_client_parts(open_checkpoint(self.model_path), self.block_config)
        self.model_name = ModelName(client.dht_prefix or default_dht_prefix(self.model_path))
        self.num_blocks = self.block_config.num_blocks
        self._rng = random.Random()
        self._lock = threading.Lock()
        """Held while the client parts compute or step (the averager applies steps under it)."""
        self._inflight: dict[PeerIDStr, int] = {}
        self._counted: dict[Span, dict[str, _Counted]] = {}
        self._step = 0
        self.stats = TrainerStats()
        self.swarm = Swarm(self.model_name, self.num_blocks, client)
        self._averager = None
        self._avg_dht = None
        self._avg_p2p = None
        self._sending_state = False
        try:
            self._build_parts(parts)
            if wait_for_servers:
                self.wait_for_stages(client.connect_timeout)
            target = self.config.target_batch_size or self._stages_target()
            self.target_batch_size = target
            with children_die_with_me():
                self._avg_dht = create_dht(list(initial_peers), host=self.config.host)
            self.peer_id = PeerIDStr(self._avg_dht.peer_id.to_base58())
            self._avg_p2p = loop.run(self._avg_dht.replicate_p2p())
            loop.run(serve(self._avg_p2p, protocol.TRAINER_STATE.name,  # read with bounds, as servers read
                           call_server(self._rpc_trainer_state, STATE_READ_TIMEOUT_S)))
            names = ["embed_tokens.weight", "norm.weight"] + ([] if len(self.params) == 2 else ["lm_head.weight"])
            self._averager = StageAverager(
                self.params, dht=self._avg_dht, prefix=f"{self.model_name}.trainers.{self.config.averaging}",
                target_batch_size=target, optimizer=self._optimizer_factory(), averaging=self.config.averaging,
                rank=self.config.rank, aggregation=self.config.aggregation, tau=self.config.tau,
                clip_iterations=self.config.clip_iterations, matchmaking_time=self.config.matchmaking_time,
                averaging_timeout=self.config.averaging_timeout, apply=self._apply,
                fetch_state=self._fetch_trainer_state, label="trainers", names=names)
            if self._averager.catch_up():  # a late trainer starts from the trainers' current state
                logger.info("trainer %s joined the trainers at epoch %d", self.peer_id[-6:], self._averager.epoch)
            self._averager.start()
        except BaseException:
            self.shutdown()
            raise

    # --- client parts ---

    def _build_parts(self, parts) -> None:
        c = self.block_config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        with torch.no_grad():
            self.embed_tokens.weight.copy_(parts.embed_tokens.float())
            self.norm.weight.copy_(parts.norm.float())
            if c.tie_word_embeddings:
                self.lm_head.weight = self.embed_tokens.weight
            else:
                self.lm_head.weight.copy_(parts.lm_head.float())
        self.params: list[nn.Parameter] = [self.embed_tokens.weight, self.norm.weight]
        if not c.tie_word_embeddings:
            self.params.append(self.lm_head.weight)
        """The trained client parameters, in the trainers' group order (tied embeddings counted once)."""

    def _optimizer_factory(self) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
        lr, wd = self.config.lr, self.config.weight_decay
        if self.config.optimizer == "sgd":
            return lambda params: torch.optim.SGD(params, lr=lr, weight_decay=wd)
        return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=wd)

    def _apply(self, step: Callable[[], None]) -> None:
        with self._lock:
            step()

    @property
    def averager(self):
        """The trainers' group ``StageAverager`` (client parts)."""
        return self._averager

    # --- the trainers' shared state, for a trainer that fell behind or joined late ---

    async def _rpc_trainer_state(self, requests: CallRequests, peer: PeerID) -> AsyncIterator[Response]:
        """Serve this trainer's state of the trainers' group (one request at a time: a state is a copy
        of the client parts and their optimizer state)."""
        try:
            msg, _ = await read_all(requests, decode_trainer_state_request, 0, STATE_READ_TIMEOUT_S)
            if msg.model != self.model_name:
                raise InvalidRequestError(f"this trainer trains {self.model_name}, not {msg.model}")
            averager = self._averager
            if averager is None:
                raise InvalidRequestError("this trainer is starting or shutting down")
            if self._sending_state:
                raise ServerBusyError("this trainer is sending its state to another trainer", retry_after=1.0)
            self._sending_state = True
            try:
                epoch, tensors, meta = await asyncio.to_thread(averager.state, msg.optimizer)
            finally:
                self._sending_state = False
        except Exception as e:
            yield error_response(e)
            return
        for response in reply_in_parts(StageState(epoch=epoch, names=list(tensors), optimizer_meta=meta),
                                       list(tensors.values()), "none"):
            yield response

    def _fetch_trainer_state(self) -> StageStateDict | None:
        """The state of a trainer ahead of this one (the furthest ahead first), or None."""
        averager = self._averager
        if averager is None or self._avg_p2p is None:
            return None
        for epoch, peer in averager.peers_ahead()[:3]:
            try:
                state = loop.run(fetch_trainer_state(self._avg_p2p, PeerID.from_base58(peer), self.model_name,
                                                     timeout=STATE_FETCH_TIMEOUT_S))
            except Exception as e:
                logger.info("trainer %s: could not load the trainers' state (epoch %d) from %s: %s",
                            self.peer_id[-6:], epoch, peer[-6:], e)
                continue
            logger.info("trainer %s: loaded the trainers' state at epoch %d from %s", self.peer_id[-6:], state[0],
                        peer[-6:])
            return state
        return None

    # --- the swarm's stages ---

    def stages(self, refresh: bool = True) -> dict[Span, _Stage]:
        """Every training stage with its live peers (online, allowed, ``record.stage`` set) and epochs."""
        servers = self.swarm.servers(refresh=refresh)
        stages: dict[Span, _Stage] = {}
        for s in servers:
            info = s.record.stage
            if info is None:
                continue
            stage = stages.setdefault(s.span, _Stage(s.span, info.averaging, info.target_batch_size, {}, {}))
            stage.peers[s.peer_id] = Candidate(s.peer_id, s.span, s.record.throughput,
                                               load=load_of(s.record.sessions, s.record.queued_steps))
            stage.epochs[s.peer_id] = info.epoch
        for stage in stages.values():
            for peer, epoch in self._progress_epochs(stage).items():
                if peer in stage.epochs:
                    stage.epochs[peer] = max(stage.epochs[peer], epoch)
        return stages

    def _progress_epochs(self, stage: _Stage) -> dict[PeerIDStr, int]:
        """Epochs of the stage's peers from their averagers' progress records (fresher than server records)."""
        return {peer: epoch for peer, (epoch, _) in self._stage_progress(stage).items()}

    def _stage_progress(self, stage: _Stage) -> dict[PeerIDStr, tuple[int, int]]:
        """(epoch, samples) of the stage's peers from their averagers' fresh progress records."""
        key = f"{self.model_name}.stage.{stage.span.start}-{stage.span.end}.{stage.averaging}.progress"
        try:
            found = self.swarm.dht.get(key, latest=True)
        except Exception as e:  # the server records' epochs stand
            logger.debug("could not read %s: %r", key, e)
            return {}
        out: dict[PeerIDStr, tuple[int, int]] = {}
        if found is None or not isinstance(found.value, dict):
            return out
        now = get_dht_time()
        for subkey, item in found.value.items():
            value = getattr(item, "value", None)
            if getattr(item, "expiration_time", 0) < now:  # a peer that stopped publishing
                continue
            epoch = value.get("epoch") if isinstance(value, dict) else getattr(value, "epoch", None)
            samples = value.get("samples") if isinstance(value, dict) else getattr(value, "samples", None)
            owner = owner_peer_id(subkey)  # a signed record: its owner subkey names the peer
            peer = owner or _peer_of_subkey(subkey)
            if isinstance(epoch, int):
                out[PeerIDStr(peer)] = (epoch, samples if isinstance(samples, int) and samples >= 0 else 0)
        return out

    def chain(self, stages: dict[Span, _Stage]) -> list[Span]:
        chain = stage_chain(list(stages), Span(0, self.num_blocks))
        if chain is None:
            raise SwarmNotReadyError(f"the training stages of {self.model_name} do not cover its "
                                     f"{self.num_blocks} blocks: {sorted(stages)}", [])
        return chain

    def wait_for_stages(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            stages = self.stages()
            if stage_chain(list(stages), Span(0, self.num_blocks)) is not None:
                return
            if time.monotonic() > deadline:
                self.chain(stages)  # raises, naming the stages
            time.sleep(0.5)

    def _stages_target(self) -> int:
        stages = self.stages(refresh=False)
        return max(s.target_batch_size for s in stages.values())

    # --- a step ---

    def train_step(self, input_ids: torch.Tensor) -> StepResult:
        """One step on ``input_ids`` (B, T): microbatches of ``config.microbatch`` sequences through
        the stages; the client parts' gradients go to the trainers' group. In synchronous mode,
        returns once the trainers and every stage stepped."""
        start = time.perf_counter()
        input_ids = input_ids.to(torch.int64)
        stages = self.stages()
        chain = self.chain(stages)
        epochs = {span: stages[span].epoch for span in chain} if self.config.sync else {}
        trainer_epoch = self._averager.epoch
        self._counted = {span: {} for span in chain}
        reruns_before = self.stats.reruns
        rows = input_ids.shape[0]
        size = self.config.microbatch
        mbs = [(Microbatch(id=f"{self.peer_id}:{self._step}:{i}", samples=min(size, rows - r), epoch=None),
                input_ids[r : r + size]) for i, r in enumerate(range(0, rows, size))]
        losses = loop.run(self._run_all(mbs, chain, stages, epochs, trainer_epoch))
        if self.config.sync:
            self._wait_step(chain, epochs, trainer_epoch, input_ids)
        self._step += 1
        seconds = time.perf_counter() - start
        loss = sum(losses) / len(losses)
        tokens = input_ids.numel()
        self.stats.steps += 1
        self.stats.tokens += tokens
        self.stats.seconds += seconds
        self.stats.losses.append(loss)
        return StepResult(loss, tokens, seconds, self.stats.reruns - reruns_before)

    async def _run_all(self, mbs, chain, stages, epochs, trainer_epoch,
                       plan: dict[str, tuple[set[Span], bool]] | None = None) -> list[float]:
        """Run ``mbs``; ``plan`` (top-ups): per microbatch id, the stages that count it and whether
        the trainers' group does (default: all of them)."""
        gate = asyncio.Semaphore(self.config.max_inflight)

        async def one(mb: Microbatch, ids: torch.Tensor) -> float:
            only, count = plan[mb.id] if plan is not None else (None, True)
            async with gate:
                loss, grads = await self._microbatch(mb, ids, chain, stages, epochs, only)
            if count:
                epoch = trainer_epoch if self.config.sync else None
                try:
                    await asyncio.to_thread(self._averager.accumulate, mb.id, mb.samples, grads, epoch)
                except StageEpochError as e:  # other trainers filled the batch (top-ups) and stepped
                    logger.warning("trainers stepped without microbatch %s: %s", mb.id, e)
            return loss

        return await asyncio.gather(*(one(mb, ids) for mb, ids in mbs))

    async def _microbatch(self, mb: Microbatch, ids: torch.Tensor, chain: list[Span], stages: dict[Span, _Stage],
                          epochs: dict[Span, int], only: set[Span] | None = None) -> tuple[float, list[torch.Tensor]]:
        """Loss and client-part gradients of one microbatch through ``chain``; counted by every stage, or
        by ``only`` those (the others run it without counting)."""
        budget = RetryBudget(self.swarm.config.max_retries)
        x = await asyncio.to_thread(self._embed, ids)  # (b, T, H)
        hops: list[_Hop] = []

        def at(span: Span) -> Microbatch:
            if only is not None and span not in only:
                return mb.model_copy(update=dict(epoch=None, accumulate=False))
            return mb.model_copy(update=dict(epoch=epochs.get(span)))

        try:
            for span in chain:
                stage_mb = at(span)
                peer, stream, out = await self._open(span, x, stage_mb, stages, budget)
                hops.append(_Hop(span, peer, x, stream))
                x = out.float()
            loss, grad, client_grads = await asyncio.to_thread(self._head_step, x, ids)
            for hop in reversed(hops):
                stage_mb = at(hop.stage)
                grad = await self._backward(hop, grad, stage_mb, stages, budget)
        finally:
            for hop in hops:
                hop.stream.close()
                self._inflight[hop.peer] = self._inflight.get(hop.peer, 1) - 1
        embed_grad = torch.zeros_like(self.embed_tokens.weight).index_add_(
            0, ids.flatten(), grad.flatten(0, 1).to(self.embed_tokens.weight.dtype))
        client_grads[0] = embed_grad if client_grads[0] is None else client_grads[0] + embed_grad
        return loss, client_grads

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        with self._lock:
            return F.embedding(ids, self.embed_tokens.weight).detach()

    def _head_step(self, hidden: torch.Tensor, ids: torch.Tensor) -> tuple[float, torch.Tensor, list]:
        """The loss of a microbatch from the last stage's outputs; its gradient in those outputs and in
        the client parameters (the embeddings' from the head only, when tied)."""
        with self._lock, torch.enable_grad():
            h = hidden.detach().requires_grad_(True)
            logits = self.lm_head(self.norm(h))  # (b, T, vocab)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            wanted = [h, self.norm.weight, self.lm_head.weight]
            grad_h, grad_norm, grad_head = torch.autograd.grad(loss, wanted)
        tied = self.block_config.tie_word_embeddings
        client = [grad_head if tied else None, grad_norm] + ([] if tied else [grad_head])
        return loss.item(), grad_h, client

    # --- hops ---

    def _draw(self, span: Span, stages: dict[Span, _Stage], exclude: set[PeerIDStr]) -> PeerIDStr:
        stage = stages.get(span)
        allowed = {s.peer_id for s in self.swarm.covering(span)}
        peers = [c for c in (stage.peers.values() if stage else []) if c.peer_id in allowed]
        chosen = draw_stage_peer(peers, span, self._rng, self._inflight, exclude)
        if chosen is None:
            raise SwarmNotReadyError(f"no live peer of stage {span} of {self.model_name}"
                                     + (f" besides {', '.join(p[-6:] for p in exclude)}" if exclude else ""), [])
        return chosen.peer_id

    async def _refresh(self, stages: dict[Span, _Stage]) -> None:
        """Re-read the stages in place (after a failure: a peer may have joined or left)."""
        fresh = await asyncio.to_thread(self.stages, True)
        stages.clear()
        stages.update(fresh)

    async def _open(self, span: Span, x: torch.Tensor, mb: Microbatch, stages: dict[Span, _Stage],
                    budget: RetryBudget, prefer: PeerIDStr | None = None,
                    exclude: set[PeerIDStr] | None = None) -> tuple[PeerIDStr, TrainStream, torch.Tensor]:
        """Run the stage forward on one of its peers (``prefer`` first), keeping the graph."""
        exclude = set(exclude or ())
        full = 0
        while True:
            try:
                peer = prefer if prefer is not None else self._draw(span, stages, exclude)
            except SwarmNotReadyError as e:
                budget.spend(e)
                await asyncio.sleep(backoff_delay(budget.used))
                await self._refresh(stages)
                exclude.clear()
                continue
            prefer = None
            self._inflight[peer] = self._inflight.get(peer, 0) + 1
            try:
                stream, out = await TrainStream.open(
                    self.swarm.p2p, self.swarm.peer(peer), span, SpanInputs(x),
                    timeout=self.swarm.config.request_timeout, microbatch=mb,
                    # ClientConfig's switches, as for fine-tuning: no kept graphs = recomputation on the
                    # server; compressed activations between stages when asked for training too
                    recompute=not self.swarm.config.train_streams,
                    compression=self.swarm.config.compression if self.swarm.config.train_compression else None)
                return peer, stream, out
            except Exception as e:
                self._inflight[peer] -= 1
                if isinstance(e, ServerFullError):
                    full += 1
                    if full > self.config.full_retries:
                        raise
                    exclude.add(peer)
                    if not [p for p in stages[span].peers if p not in exclude]:
                        exclude.clear()
                    await asyncio.sleep(backoff_delay(min(full, 4)))
                    continue
                if isinstance(e, StageEpochError):
                    budget.spend(e)
                    mb = await self._on_epoch_error(span, peer, mb, stages, exclude, e)
                    continue
                if not is_retryable(e):
                    raise
                budget.spend(e)
                self.swarm.ban(peer, f"training forward over stage {span} failed: {e}")
                exclude.add(peer)
                logger.warning("stage %s: forward of %s failed on %s (%s): another peer", span, mb.id, peer, e)
                await asyncio.sleep(backoff_delay(budget.used))

    async def _on_epoch_error(self, span: Span, peer: PeerIDStr, mb: Microbatch, stages: dict[Span, _Stage],
                              exclude: set[PeerIDStr], error: Exception) -> Microbatch:
        """A peer refused the microbatch's epoch: a peer behind (loading the stage's state) is left
        out; a stage that stepped past it gets the microbatch without counting it (synchronous
        mode: its gradient for that epoch is moot)."""
        await self._refresh(stages)
        stage = stages.get(span)
        if stage is not None and mb.epoch is not None and stage.epoch > mb.epoch:
            logger.warning("stage %s is at epoch %d, past microbatch %s's %d: not counted there (%s)",
                           span, stage.epoch, mb.id, mb.epoch, error)
            return mb.model_copy(update=dict(epoch=None, accumulate=False))
        exclude.add(peer)
        return mb

    async def _backward(self, hop: _Hop, grad: torch.Tensor, mb: Microbatch, stages: dict[Span, _Stage],
                        budget: RetryBudget) -> torch.Tensor:
        try:
            received = await hop.stream.backward(grad)
        except Exception as e:
            if not is_retryable(e) and not isinstance(e, StageEpochError):
                raise
            budget.spend(e)
            return await self._rerun(hop.stage, hop.hidden, grad, mb, stages, budget, failed=hop.peer, error=e)
        self._record(hop.stage, hop.peer, mb, hop.hidden, grad, received)
        return received.inputs.float()

    async def _rerun(self, span: Span, hidden: torch.Tensor, grad: torch.Tensor, mb: Microbatch,
                     stages: dict[Span, _Stage], budget: RetryBudget, failed: PeerIDStr | None,
                     error: Exception | None) -> torch.Tensor:
        """Run one stage's hop again (forward from the saved input, backward with the saved output
        gradient): on ``failed`` itself if it answers a ping (it counts the id at most once), else on
        another peer of the stage. The gradient of the hop's input."""
        self.stats.reruns += 1
        prefer, exclude = None, set()
        if failed is not None:
            alive = await ping(self.swarm.p2p, self.swarm.peer(failed), timeout=2.0) is not None
            if alive:
                prefer = failed
            else:
                self.swarm.ban(failed, f"training stage {span} failed: {error}")
                exclude.add(failed)
            logger.warning("stage %s: rerunning %s on %s (%s)", span, mb.id,
                           "the same peer" if alive else "another peer", error)
        while True:
            peer, stream, _ = await self._open(span, hidden, mb, stages, budget, prefer=prefer, exclude=exclude)
            prefer = None
            try:
                received = await stream.backward(grad)
            except Exception as e:
                if not is_retryable(e) and not isinstance(e, StageEpochError):
                    raise
                budget.spend(e)
                exclude.add(peer)
                continue
            finally:
                stream.close()
                self._inflight[peer] = self._inflight.get(peer, 1) - 1
            self._record(span, peer, mb, hidden, grad, received)
            return received.inputs.float()

    def _record(self, span: Span, peer: PeerIDStr, mb: Microbatch, hidden: torch.Tensor, grad: torch.Tensor,
                received) -> None:
        """Remember who holds the microbatch's gradient for this stage (whether this call added it or
        the peer already held it from an earlier try)."""
        if mb.accumulate:
            self._counted.setdefault(span, {})[mb.id] = _Counted(mb, peer, hidden, grad)

    # --- the synchronous wait ---

    def _wait_step(self, chain: list[Span], epochs: dict[Span, int], trainer_epoch: int,
                   input_ids: torch.Tensor) -> None:
        """Until the trainers' group and every stage passed the step's epochs: watch the stage peers
        that counted this trainer's microbatches and rerun what a dead one held; after
        ``top_up_after`` seconds without progress, fill what the stages and trainers lack."""
        deadline = time.monotonic() + self.config.epoch_timeout
        misses: dict[PeerIDStr, int] = {}
        delay = 0.05
        seen, since, looked = None, time.monotonic(), time.monotonic()
        while True:
            stages = self.stages()
            pending = [span for span in chain if span not in stages or stages[span].epoch <= epochs[span]]
            if not pending and self._averager.epoch > trainer_epoch:
                return
            if self.config.top_up_after is not None and time.monotonic() - looked >= HELD_LOOK_S:
                looked = time.monotonic()
                held = self._held(pending, stages, epochs, trainer_epoch)
                if held != seen:
                    seen, since = held, looked
                elif looked - since > self.config.top_up_after:
                    self._top_up(chain, stages, epochs, trainer_epoch, input_ids, held)
                    since = time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(f"step {self._step}: not stepped after {self.config.epoch_timeout} s: "
                                   f"stages {[str(s) for s in pending]}, trainers at epoch {self._averager.epoch} "
                                   f"(waiting for {trainer_epoch + 1})")
            for span in pending:
                holders = {c.peer for c in self._counted.get(span, {}).values()}
                for peer in holders:
                    if loop.run(ping(self.swarm.p2p, self.swarm.peer(peer), timeout=2.0)) is None:
                        misses[peer] = misses.get(peer, 0) + 1
                    else:
                        misses[peer] = 0
                    if misses[peer] >= 2:
                        misses.pop(peer)
                        self._rerun_lost(span, peer, stages)
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _held(self, pending: list[Span], stages: dict[Span, _Stage], epochs: dict[Span, int],
              trainer_epoch: int) -> dict[Span | None, int]:
        """Samples the step's pending stages (and, under None, the trainers' group) hold at the step's
        epochs, from their live peers' progress records: what a stall is measured on."""
        held: dict[Span | None, int] = {}
        for span in pending:
            stage = stages.get(span)
            if stage is not None:
                held[span] = sum(samples for peer, (epoch, samples) in self._stage_progress(stage).items()
                                 if epoch == epochs[span] and peer in stage.peers)
        if self._averager.epoch == trainer_epoch:
            held[None] = sum(samples for epoch, samples in self._averager.progress().values() if epoch == trainer_epoch)
        return held

    def _top_up(self, chain: list[Span], stages: dict[Span, _Stage], epochs: dict[Span, int], trainer_epoch: int,
                input_ids: torch.Tensor, held: dict[Span | None, int]) -> None:
        """Nothing moved for ``top_up_after`` s: a trainer left mid-step with its share of the batch.
        Run more microbatches of this step's batch (under new ids), each counted only where samples
        are still lacking, until every pending stage and the trainers' group hold their targets."""
        lacking = {span: stages[span].target_batch_size - n for span, n in held.items() if span is not None}
        if None in held:
            lacking[None] = self.target_batch_size - held[None]
        lacking = {span: n for span, n in lacking.items() if n > 0}
        if not lacking:
            return  # everything is there: a round is on its way (or failing, and retried by the averagers)
        rows, size = input_ids.shape[0], self.config.microbatch
        mbs, plan, k = [], {}, 0
        remaining = dict(lacking)
        while any(n > 0 for n in remaining.values()):
            r = (k * size) % rows
            ids = input_ids[r : r + size]
            mb = Microbatch(id=f"{self.peer_id}:{self._step}:fill{self.stats.top_ups + k}", samples=ids.shape[0],
                            epoch=None)
            only = {span for span, n in remaining.items() if span is not None and n > 0}
            plan[mb.id] = (only, remaining.get(None, 0) > 0)
            for span in remaining:
                remaining[span] -= ids.shape[0]
            mbs.append((mb, ids))
            k += 1
        logger.warning("step %d: no progress for %.0f s, short of %s: a trainer left mid-step? running %d more "
                       "microbatches of this batch", self._step, self.config.top_up_after,
                       ", ".join(f"{'trainers' if s is None else s}: {n} samples" for s, n in lacking.items()),
                       len(mbs))
        self.stats.top_ups += len(mbs)
        self.stats.lacked = {"trainers" if span is None else str(span): n for span, n in lacking.items()}
        loop.run(self._run_all(mbs, chain, stages, epochs, trainer_epoch, plan))

    def _rerun_lost(self, span: Span, dead: PeerIDStr, stages: dict[Span, _Stage]) -> None:
        """``dead`` held microbatches of this step for ``span`` and died before its stage stepped: run
        them again on the stage's other peers (counted there; no other stage is touched)."""
        lost = [c for c in self._counted.get(span, {}).values() if c.peer == dead]
        logger.warning("stage %s: peer %s died holding %d microbatches of this step: rerunning them",
                       span, dead, len(lost))
        self.swarm.ban(dead, f"stage {span} peer died before its stage stepped")

        async def rerun(c: _Counted) -> None:
            budget = RetryBudget(self.swarm.config.max_retries)
            try:
                await self._rerun(span, c.hidden, c.grad, c.mb, stages, budget, failed=None, error=None)
            except StageEpochError:
                pass  # the stage stepped meanwhile: the microbatch was in it

        async def rerun_all() -> None:
            await asyncio.gather(*(rerun(c) for c in lost))

        loop.run(rerun_all())

    # --- results ---

    def fetch_stage_params(self) -> dict[int, dict[str, torch.Tensor]]:
        """Every block's parameters (our layout), fetched from one live peer of each stage."""
        from stamen.models.export import split_span_state
        from stamen.rpc.stage import fetch_stage_state

        stages = self.stages()
        blocks: dict[int, dict[str, torch.Tensor]] = {}
        for span in self.chain(stages):
            errors = []
            for peer in sorted(stages[span].peers, key=lambda p: -stages[span].epochs.get(p, 0)):
                try:
                    _, tensors, _ = loop.run(fetch_stage_state(
                        self.swarm.p2p, self.swarm.peer(peer), span, optimizer=False,
                        timeout=self.swarm.config.request_timeout))
                except Exception as e:
                    if not is_retryable(e):
                        raise
                    errors.append(e)
                    continue
                params = {name.removeprefix("param."): t for name, t in tensors.items() if name.startswith("param.")}
                blocks.update(split_span_state(params, span.start))
                break
            else:
                raise RemoteCallError(f"no peer of stage {span} gave its state: {errors}")
        return blocks

    def save(self, out: str | Path) -> Path:
        """Write the trained model as a Hugging Face directory (stages' parameters fetched from their peers)."""
        from stamen.models.export import save_hf_model

        blocks = self.fetch_stage_params()
        with self._lock:
            tied = self.block_config.tie_word_embeddings
            return save_hf_model(out, self.model_path, self.block_config, blocks, self.embed_tokens.weight,
                                 self.norm.weight, None if tied else self.lm_head.weight)

    def shutdown(self) -> None:
        if self._averager is not None:
            self._averager.shutdown()
            self._averager = None
        if self._avg_p2p is not None:  # the replica's client tasks live on the client loop: closed there
            with contextlib.suppress(Exception):
                loop.run(self._avg_p2p.remove_binary_stream_handler(protocol.TRAINER_STATE.name), timeout=10)
                loop.run(self._avg_p2p.shutdown(), timeout=10)
            self._avg_p2p = None
        if self._avg_dht is not None:
            self._avg_dht.shutdown()
            self._avg_dht = None
        self.swarm.shutdown()

    def __enter__(self) -> SwarmTrainer:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
