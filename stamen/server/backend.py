"""The span backend: sessions with in-place KV caches, the cache budget, and compute on one worker.

Handlers validate requests into typed messages and call these methods; this module owns all state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from stamen import trace
from stamen.errors import (
    InvalidRequestError,
    ServerBusyError,
    ServerFullError,
    SessionClosedError,
    SessionLengthError,
    UnknownSessionError,
    WrongBlocksError,
)
from stamen.models.lora import BlockLoRA
from stamen.models.span import KVCache, SpanModel
from stamen.rpc.inputs import SpanGrads, SpanInputs, TensorLimits
from stamen.server.adapters import AdapterCache
from stamen.server.batching import StepBatcher, StepWork
from stamen.server.compute import in_fresh_thread
from stamen.server.limits import Limits
from stamen.types import Span
from stamen.wire.messages import AdapterMeta, AdapterRef, Microbatch, OpenSession, Step

logger = logging.getLogger(__name__)

INLINE_STEP_TOKENS = 8
"""Steps this small (decoding) run on the event loop itself: handing them to the compute thread
and back costs two thread wake-ups, which on a loaded machine can take longer than the step. Larger
work goes to the thread so the loop stays responsive."""
INLINE_BATCH_TOKENS = 32
"""Batched iterations of at most this many rows (decoding steps of up to 32 sequences) run inline
too; a decoding step of 32 sequences through a span costs about three of one (docs/benchmarks.md)."""
BUSY_RETRY_S = 1.0
"""The retry hint of a peer refused for its share of sessions or cache: sessions end, caches free."""


class CacheBudget:
    """KV cache accounting in block-tokens: a session of B sequences × L positions over k blocks
    takes B·L·k. Reserved when a session opens, returned when it closes."""

    def __init__(self, max_tokens: int, num_blocks: int):
        self.capacity = max_tokens * num_blocks
        self.num_blocks = num_blocks
        self.used = 0

    def reserve(self, tokens: int, blocks: int) -> int:
        need = tokens * blocks
        if self.used + need > self.capacity:
            raise ServerFullError(
                f"server full: the session needs {tokens} tokens of cache on {blocks} blocks, "
                f"{self.tokens_left} tokens are free"
            )
        self.used += need
        return need

    def release(self, amount: int) -> None:
        self.used -= amount

    @property
    def tokens_left(self) -> int:
        return max(0, self.capacity - self.used) // self.num_blocks  # old spans' sessions may overdraw after a move


class Replies(Protocol):
    """Where a session's replies go (the handler writes them to the client's stream)."""

    def put_nowait(self, response: Any) -> None: ...


class TrainingStage(Protocol):
    """What the handlers ask of a ``--train`` server's stage (``server/stage.py: Stage``)."""

    def check_epoch(self, epoch: int | None) -> None: ...

    async def accumulate(self, mb: Microbatch, grads: Sequence[torch.Tensor | None]) -> tuple[bool, int]: ...

    async def state(self, optimizer: bool = True) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]: ...


@dataclass
class Session:
    id: str
    blocks: Span
    cache: KVCache
    reserved: int
    replies: Replies
    """Replies for the client's stream that owns this session (pushed steps answer there too)."""
    last_step_id: int = -1
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Steps of one session run one at a time (a push and the client's copy may race)."""
    last_used: float = field(default_factory=time.monotonic)
    prompts: torch.Tensor | None = None
    """Deep prompts (n_blocks, P, H) added at positions [0, P) of every block's input."""
    adapters: list[BlockLoRA] | None = None
    """LoRA adapters, one per block of the session."""
    model: SpanModel | None = None
    """Set when the server moved: the span the session was opened on, kept until it closes."""
    compression: str = "none"
    """How step outputs travel back and on (``stamen.wire.compression``): the client's choice or the server's."""
    held: list = field(default_factory=list)
    """Replies to steps pushed on with ``hold_reply``, not yet sent to the client (``FlushReplies``)."""
    owner: str | None = None
    """The peer that opened the session: only it may step, flush or close it on its inference
    streams (None: anyone, for in-process use). Its shares of this server are counted per owner."""
    out_bursts: tuple = (None, None)
    """(push, reply) ``Burst`` of the last step's output: the outputs of its iteration that went the same way."""
    closed: bool = False
    """Closed: no step runs from then on; a step that held it meanwhile drops its result and frees the cache."""


@dataclass
class _Checked:
    """A span call's inputs, validated, on the compute device, with the adapters resolved."""

    blocks: Span
    hidden: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    prompts: torch.Tensor | None
    adapters: list[BlockLoRA] | None


class TrainGraph:
    """A span's output with the autograd graph back to the leaves whose gradients are wanted (and,
    on a training server, to the span's own weights ``params``)."""

    def __init__(self, out: torch.Tensor, wanted: list[torch.Tensor], has_prompts: bool,
                 params: list[torch.Tensor] | None = None):
        self.out, self.wanted, self.has_prompts = out, wanted, has_prompts
        self.params = params or []
        self.weight_grads: list[torch.Tensor | None] = []
        """Set by ``grads``: the gradient of each of ``params`` (None: unused by the blocks run)."""

    def output(self) -> torch.Tensor:
        return self.out.detach()

    def grads(self, grad_outputs: torch.Tensor) -> SpanGrads:
        """Input gradient, prompt gradient (if any) and LoRA gradients (and ``weight_grads``); frees the graph."""
        out, wanted, params = self.out, self.wanted, self.params
        if out is None:
            raise SessionClosedError("the training graph was dropped (used, or dropped for a weight update)")
        self.drop()
        with torch.enable_grad():
            grads = torch.autograd.grad(out, wanted + params, grad_outputs, allow_unused=True)
        self.weight_grads = list(grads[len(wanted):])
        grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads[:len(wanted)], wanted, strict=True)]
        return SpanGrads(grads[0], grads[1] if self.has_prompts else None, grads[1 + self.has_prompts:])

    def drop(self) -> None:
        self.out, self.wanted, self.params = None, [], []  # type: ignore[assignment]


class RecomputedGraph(TrainGraph):
    """A training call with activation recomputation: the forward ran without autograd and only the
    inputs are kept; the gradient's arrival runs the span again with autograd, then the backward."""

    def __init__(self, out: torch.Tensor, rebuild):
        super().__init__(out, [], False)
        self._rebuild = rebuild

    def grads(self, grad_outputs: torch.Tensor) -> SpanGrads:
        if self.out is None:
            raise SessionClosedError("the training graph was dropped (used, or dropped for a weight update)")
        graph = self._rebuild()
        self.drop()
        result = graph.grads(grad_outputs)
        self.weight_grads = graph.weight_grads
        return result

    def drop(self) -> None:
        super().drop()
        self._rebuild = None


class GraphGate:
    """Kept training graphs against in-place updates of the weights they reach (a training stage's
    optimizer step, or a load of its state): autograd refuses a backward through a tensor changed
    since the forward. An update (``closed``) holds new graphs back and waits until none is held; a
    graph still held after ``timeout`` is dropped (its backward is refused: ``SessionClosedError``)."""

    def __init__(self) -> None:
        self.held: set[TrainGraph | _Pending] = set()
        self._open = asyncio.Event()
        self._open.set()
        self._empty = asyncio.Event()
        self._empty.set()

    async def enter(self, timeout: float) -> _Pending:
        """Wait while an update runs; the caller holds a slot from then (``release`` it)."""
        if not self._open.is_set():
            try:
                await asyncio.wait_for(self._open.wait(), timeout)
            except TimeoutError:
                raise ServerBusyError("server busy: the stage's weights are being updated",
                                      retry_after=BUSY_RETRY_S) from None
        pending = _Pending()
        self.hold(pending)
        return pending

    def hold(self, graph: TrainGraph | _Pending) -> None:
        self.held.add(graph)
        self._empty.clear()

    def release(self, graph: TrainGraph | _Pending | None) -> None:
        self.held.discard(graph)
        if not self.held:
            self._empty.set()

    @contextlib.asynccontextmanager
    async def closed(self, timeout: float) -> AsyncIterator[None]:
        self._open.clear()
        try:
            try:
                await asyncio.wait_for(self._empty.wait(), timeout)
            except TimeoutError:
                logger.warning("%d training graphs still held after %.0f s: dropped for a weight update",
                               len(self.held), timeout)
                for graph in list(self.held):
                    graph.drop()
                    self.release(graph)
            yield
        finally:
            self._open.set()


class _Pending:
    """A graph slot whose forward is still computing (dropping it drops the graph once it exists)."""

    def __init__(self) -> None:
        self.graph: TrainGraph | None = None
        self.dropped = False

    def drop(self) -> None:
        self.dropped = True
        if self.graph is not None:
            self.graph.drop()


class SpanBackend:
    def __init__(self, model: SpanModel, dtype: torch.dtype, device: torch.device, max_cache_tokens: int,
                 max_step_tokens: int, adapter_cache_bytes: int = 256 << 20, max_train_graphs: int = 8,
                 inline_compute: bool = False, long_threads: int | None = None, limits: Limits | None = None,
                 batching: bool = False, max_batch_tokens: int = 256):
        self.model, self.dtype, self.device = model, dtype, device
        self.limits = limits or Limits.default()
        self.span = model.span
        self.hidden_size = model.config.hidden_size
        self.max_step_tokens = max_step_tokens
        self.budget = CacheBudget(max_cache_tokens, self.span.length)
        self.sessions: dict[str, Session] = {}
        self._closed: OrderedDict[str, None] = OrderedDict()  # recently closed ids, for clear errors
        self._inline = inline_compute
        """Servers: decoding steps inline on the loop, longer work on a short-lived thread, one at a
        time (``server/compute.py``). Otherwise (tests, in-process use): one worker thread, with
        decoding steps inline."""
        self.long_threads = long_threads
        """torch threads of long work on its own thread (None: torch's default for a new thread)."""
        self._pool = None if inline_compute else ThreadPoolExecutor(max_workers=1, thread_name_prefix="stamen-compute")
        self._compute_lock = asyncio.Lock()
        self.adapters = AdapterCache(model.config, adapter_cache_bytes, dtype, device)
        """LoRA adapters by content hash: the only state kept between training calls."""
        self.max_train_graphs = max_train_graphs
        """Most ``rpc_train`` graphs held at once (each lives only inside its call); 0 turns them off."""
        self.train_graphs_held = 0
        self.kept_backwards = 0
        self.recomputed_backwards = 0
        self.batcher = StepBatcher(self, max_batch_tokens, INLINE_BATCH_TOKENS, self.limits.max_peer_queued_steps) \
            if batching else None
        """Inference steps of concurrent sessions computed together (``server/batching.py``); None:
        each on its own."""
        self._tensor_limits = self._limits_of_span()
        self.gate = GraphGate()
        """Kept graphs against in-place weight updates (training servers only ever close it)."""
        self.stage: TrainingStage | None = None
        """The training stage of a ``--train`` server (``server/stage.py``); None: frozen weights."""
        self.train_autocast: torch.dtype | None = None
        """Autocast dtype of training graphs through the trainable weights (``--compute-dtype bfloat16``)."""

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def busy(self) -> bool:
        """Whether a computation runs or waits (the compute lock is held)."""
        return self._compute_lock.locked()

    # --- sessions ---

    def check_blocks(self, blocks: Span) -> None:
        if not self.span.covers(blocks):
            raise WrongBlocksError(f"this server hosts blocks {self.span}, not {blocks}")

    def open(self, msg: OpenSession, replies: Replies, prompts: torch.Tensor | None = None,
             owner: str | None = None) -> Session:
        blocks = msg.blocks.span
        self.check_blocks(blocks)
        prompts = self.check_prompts(prompts, blocks, msg.max_length)
        adapters = self.get_adapters(msg.adapter, blocks)
        if msg.session_id in self.sessions:
            raise InvalidRequestError(f"session {msg.session_id} is already open")
        if msg.batch_size * msg.max_length > self.budget.capacity // self.budget.num_blocks:
            raise ServerFullError(
                f"server full: {msg.batch_size}×{msg.max_length} tokens exceed the cache budget of "
                f"{self.budget.capacity // self.budget.num_blocks} tokens"
            )
        if owner is not None:
            self._check_share(owner, msg.batch_size * msg.max_length * blocks.length)
        reserved = self.budget.reserve(msg.batch_size * msg.max_length, blocks.length)
        try:
            cache = KVCache(self.model.config, blocks.length, msg.batch_size, msg.max_length, self.dtype, self.device)
        except RuntimeError as e:  # the allocator refused despite the budget
            self.budget.release(reserved)
            raise ServerFullError(f"server full: cannot allocate the cache: {e}") from None
        session = Session(msg.session_id, blocks, cache, reserved, replies, prompts=prompts, adapters=adapters,
                          owner=owner)
        self.sessions[msg.session_id] = session
        return session

    def _check_share(self, owner: str, need: int) -> None:
        """Refuse a peer over its share of this server (``ServerBusyError``): ``max_peer_sessions``,
        and its share of the cache while other peers hold sessions (``Limits.peer_cache_limit``)."""
        mine = [s for s in self.sessions.values() if s.owner == owner]
        if len(mine) >= self.limits.max_peer_sessions:
            raise ServerBusyError(f"server busy: {owner[-6:]} holds {len(mine)} sessions here, at most "
                                  f"{self.limits.max_peer_sessions}", retry_after=BUSY_RETRY_S)
        peers = len({s.owner for s in self.sessions.values()} | {owner})
        if peers == 1:
            return  # alone, a peer may take all the cache (the budget refuses what does not fit)
        limit = self.limits.peer_cache_limit(self.budget.capacity, peers)
        held = sum(s.reserved for s in mine)
        if held + need > limit:
            n = self.budget.num_blocks
            raise ServerBusyError(f"server busy: {owner[-6:]} holds {held // n} tokens of cache and asks for "
                                  f"{need // n} more; its share beside {peers - 1} other peers is {limit // n}",
                                  retry_after=BUSY_RETRY_S)

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            if session_id in self._closed:
                raise SessionClosedError(f"session {session_id} is closed")
            raise UnknownSessionError(f"unknown session {session_id}")
        return session

    def close(self, session_id: str, only: Session | None = None) -> None:
        """Close the session (``only``: if it is still that one). A step that holds it (``stepping``)
        is not interrupted: its result is dropped, and the cache is freed when it ends."""
        session = self.sessions.get(session_id)
        if session is None or (only is not None and session is not only):
            return
        del self.sessions[session_id]
        session.closed = True
        if not session.lock.locked():
            self._free(session)
        self._closed[session_id] = None
        while len(self._closed) > 4096:
            self._closed.popitem(last=False)

    def _free(self, session: Session) -> None:
        if session.cache is not None:
            self.budget.release(session.reserved)
            session.cache = None  # type: ignore[assignment]  # drop the memory now

    @contextlib.asynccontextmanager
    async def stepping(self, session: Session) -> AsyncIterator[None]:
        """Hold the session for one step: its steps run one at a time. A session closed before the
        step holds it is refused (``SessionClosedError``); one closed meanwhile is freed when the
        step ends (``step`` then refuses to hand out its result)."""
        async with session.lock:
            try:
                if session.closed:
                    raise SessionClosedError(f"session {session.id} is closed")
                yield
            finally:
                if session.closed:
                    self._free(session)

    # --- validation ---

    def check_hidden(self, hidden: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        if hidden.ndim != 3 or hidden.shape[-1] != self.hidden_size:
            raise InvalidRequestError(
                f"hidden states must have shape (batch, tokens, {self.hidden_size}), got {tuple(hidden.shape)}"
            )
        if batch_size is not None and hidden.shape[0] != batch_size:
            raise InvalidRequestError(f"batch size {hidden.shape[0]} differs from the session's {batch_size}")
        if hidden.shape[0] * hidden.shape[1] > self.max_step_tokens or min(hidden.shape[:2]) == 0:
            raise InvalidRequestError(
                f"a request carries 1 to {self.max_step_tokens} tokens (batch × length), got "
                f"{hidden.shape[0]}×{hidden.shape[1]}"
            )
        if not torch.isfinite(hidden).all():
            raise InvalidRequestError("hidden states contain NaN or infinity")
        return hidden.to(self.device, self.dtype)

    def check_prompts(self, prompts: torch.Tensor | None, blocks: Span, max_positions: int) -> torch.Tensor | None:
        """Deep prompts must be (n_blocks, P, H) with 1 <= P <= the request's positions, finite."""
        if prompts is None:
            return None
        expected = (blocks.length, self.hidden_size)
        if prompts.ndim != 3 or (prompts.shape[0], prompts.shape[2]) != expected or not \
                1 <= prompts.shape[1] <= max_positions:
            raise InvalidRequestError(
                f"prompts must have shape ({blocks.length}, P, {self.hidden_size}) with 1 <= P <= {max_positions}, "
                f"got {tuple(prompts.shape)}"
            )
        if not torch.isfinite(prompts).all():
            raise InvalidRequestError("prompts contain NaN or infinity")
        return prompts.to(self.device, self.dtype)

    def get_adapters(self, ref: AdapterRef | None, blocks: Span) -> list[BlockLoRA] | None:
        if ref is None:
            return None
        if len(ref.hashes) != blocks.length:
            raise InvalidRequestError(f"{len(ref.hashes)} adapter hashes for {blocks.length} blocks")
        return self.adapters.get_many(ref.hashes)

    def put_adapters(self, metas: list[AdapterMeta], tensors: list[torch.Tensor]) -> list[str]:
        expected = sum(2 * len(m.targets) for m in metas)
        if len(tensors) != expected:
            raise InvalidRequestError(f"expected {expected} adapter tensors, got {len(tensors)}")
        rest = iter(tensors)
        for meta in metas:
            self.adapters.put(meta, [next(rest) for _ in range(2 * len(meta.targets))])
        return [m.hash for m in metas]

    @staticmethod
    def check_aux(tensor: torch.Tensor | None, hidden: torch.Tensor, name: str) -> torch.Tensor | None:
        if tensor is not None and tuple(tensor.shape) != tuple(hidden.shape[:2]):
            raise InvalidRequestError(f"{name} must have shape {tuple(hidden.shape[:2])}, got {tuple(tensor.shape)}")
        return tensor if tensor is None else tensor.to(hidden.device)

    def checked(self, blocks: Span, inputs: SpanInputs) -> _Checked:
        """A forward's, backward's or training call's inputs, validated and on the compute device."""
        self.check_blocks(blocks)
        hidden = self.check_hidden(inputs.hidden)
        return _Checked(blocks, hidden, self.check_aux(inputs.attention_mask, hidden, "attention_mask"),
                        self.check_aux(inputs.position_ids, hidden, "position_ids"),
                        self.check_prompts(inputs.prompts, blocks, hidden.shape[1]),
                        self.get_adapters(inputs.adapter, blocks))

    def check_grad(self, grad_outputs: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if tuple(grad_outputs.shape) != shape:
            raise InvalidRequestError(
                f"grad_outputs must have the shape of the outputs {shape}, got {tuple(grad_outputs.shape)}")
        if not torch.isfinite(grad_outputs).all():
            raise InvalidRequestError("grad_outputs contain NaN or infinity")
        return grad_outputs.to(self.device, self.dtype)

    def tensor_limits(self) -> TensorLimits:
        """What a request's tensors may hold: one step's tokens per hidden state, gradient, mask or
        ids, and that per block of the span for deep prompts."""
        return self._tensor_limits

    def _limits_of_span(self) -> TensorLimits:
        elements = self.max_step_tokens * self.hidden_size
        return TensorLimits(elements, elements * self.span.length)

    # --- compute ---

    async def step(self, session: Session, msg: Step, inputs: SpanInputs, sender: str = "") -> torch.Tensor:
        """One inference step of ``session`` (``sender``: the peer it came from, the owner or the
        server that pushed it)."""
        cache = session.cache
        hidden = self.check_hidden(inputs.hidden, cache.batch_size)
        hypo_ids = inputs.hypo_ids
        if hypo_ids is not None:
            if tuple(hypo_ids.shape) != (cache.batch_size,) or not bool(
                    ((hypo_ids >= 0) & (hypo_ids < cache.batch_size)).all()):
                raise InvalidRequestError(f"hypo_ids must be {cache.batch_size} indices in [0, {cache.batch_size})")
        attention_mask = self.check_aux(inputs.attention_mask, hidden, "attention_mask")
        position_ids = self.check_aux(inputs.position_ids, hidden, "position_ids")
        if msg.position > cache.length:
            raise SessionLengthError(f"step at position {msg.position}, but the server holds {cache.length} positions")
        if msg.position + hidden.shape[1] > cache.max_length:
            raise SessionLengthError(
                f"step to position {msg.position + hidden.shape[1]} exceeds the session's max length {cache.max_length}"
            )
        cache.length = msg.position  # a position below the current length rolls back
        if hypo_ids is not None:
            hypo_ids = hypo_ids.to(cache.tensor.device)
        session.last_used = time.monotonic()
        if self.batcher is not None:
            future = asyncio.get_running_loop().create_future()
            out = await self.batcher.run(StepWork(
                session, hidden, attention_mask, position_ids, hypo_ids, session.owner or "", future, msg.burst,
                msg.push_to[0].peer_id if msg.push_to else None, sender))
            if session.closed:
                raise SessionClosedError(f"session {session.id} was closed during the step")
            return out
        args = session, hidden, attention_mask, position_ids, hypo_ids
        if hidden.shape[0] * hidden.shape[1] <= INLINE_STEP_TOKENS:  # decoding: a thread handoff costs more
            if not self._inline:
                out = self._step(*args)
            else:
                async with self._compute_lock:
                    out = self._step(*args)
        else:
            out = await self.run_long(self._step, *args)
        if session.closed:  # closed while it computed: the result goes nowhere
            raise SessionClosedError(f"session {session.id} was closed during the step")
        return out

    def _step(self, session: Session, hidden, attention_mask, position_ids, hypo_ids) -> torch.Tensor:
        if session.closed:  # closed while the step waited for compute
            raise SessionClosedError(f"session {session.id} was closed before the step ran")
        trace.mark("s.c0")
        with torch.inference_mode():  # the cache's padding mask is made in inference mode: reorder it there
            if hypo_ids is not None:
                session.cache.reorder(hypo_ids)
            out = (session.model or self.model).step(hidden, session.cache, attention_mask, position_ids,
                                                     session.blocks, session.prompts, session.adapters)
        trace.mark("s.c1")
        return out

    async def forward(self, blocks: Span, inputs: SpanInputs) -> torch.Tensor:
        return await self.run_long(self._forward, self.checked(blocks, inputs))

    def _forward(self, x: _Checked) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(x.hidden, x.attention_mask, x.position_ids, x.blocks, x.prompts, x.adapters)

    async def backward(self, blocks: Span, inputs: SpanInputs, grad_outputs: torch.Tensor,
                       train_lora_a: bool) -> SpanGrads:
        """Gradients of the span's inputs, deep prompts and LoRA weights (per block, per target: A if
        ``train_lora_a``, then B), recomputing the span's activations; nothing is kept afterwards."""
        x = self.checked(blocks, inputs)
        grad_outputs = self.check_grad(grad_outputs, tuple(x.hidden.shape))
        return await self.run_long(self._backward, x, grad_outputs, train_lora_a)

    def _backward(self, x: _Checked, grad_outputs: torch.Tensor, train_lora_a: bool) -> SpanGrads:
        graph = self._graph(x, train_lora_a)
        self.recomputed_backwards += 1
        return graph.grads(grad_outputs)

    def _graph(self, x: _Checked, train_lora_a: bool, weights: bool = False, grad: bool = True) -> TrainGraph:
        """The span run with autograd: fresh leaves for the inputs, deep prompts and LoRA; weights frozen,
        or (``weights``, a training server's microbatch) the span's own parameters among the leaves.
        ``grad=False``: the same computation without autograd (the first forward of a recomputation)."""
        with torch.enable_grad() if grad else torch.no_grad():
            hidden = x.hidden.detach().requires_grad_()
            wanted = [hidden]
            prompts = x.prompts
            if prompts is not None:
                prompts = prompts.detach().requires_grad_()
                wanted.append(prompts)
            leaf_adapters = []
            for adapter in x.adapters or []:
                leaf_adapter, leaves = adapter.leaves(train_lora_a)
                leaf_adapters.append(leaf_adapter)
                wanted.extend(leaves)
            params = [p for p in self.model.parameters() if p.requires_grad] if weights else []
            autocast = self.train_autocast if weights else None
            with torch.autocast(self.device.type, dtype=autocast) if autocast else contextlib.nullcontext():
                out = self.model(hidden, x.attention_mask, x.position_ids, x.blocks, prompts, leaf_adapters or None)
            out = out.to(x.hidden.dtype)
        return TrainGraph(out, wanted, prompts is not None, params)

    def _recomputed(self, x: _Checked, train_lora_a: bool, weights: bool = False) -> RecomputedGraph:
        out = self._graph(x, train_lora_a, weights, grad=False).out
        return RecomputedGraph(out, lambda: self._graph(x, train_lora_a, weights))

    # --- training graphs kept within one rpc_train call ---

    @contextlib.asynccontextmanager
    async def train_graph(self, blocks: Span, inputs: SpanInputs, train_lora_a: bool,
                          timeout: float, weights: bool = False, recompute: bool = False) -> AsyncIterator[TrainGraph]:
        """The span run with autograd (within ``timeout`` seconds), its graph held until the block
        ends: one of ``max_train_graphs`` slots (``ServerFullError`` when none is free). ``weights``:
        the graph reaches the span's trainable parameters (``TrainGraph.weight_grads``). ``recompute``:
        run without autograd now and again with it at the backward (``RecomputedGraph``)."""
        x = self.checked(blocks, inputs)
        if self.train_graphs_held >= self.max_train_graphs:
            raise ServerFullError(f"server full: {self.train_graphs_held} of {self.max_train_graphs} training "
                                  f"graphs held; use stateless forward and backward")
        self.train_graphs_held += 1
        graph, pending = None, None
        try:
            pending = await self.gate.enter(timeout)
            build = self._recomputed if recompute else self._graph
            graph = await asyncio.wait_for(self.run_long(build, x, train_lora_a, weights), timeout)
            self.gate.release(pending)
            if pending.dropped:
                raise SessionClosedError("the training graph was dropped for a weight update")
            pending = None
            self.gate.hold(graph)
            yield graph
        finally:
            self.gate.release(pending)
            if graph is not None:
                graph.drop()
                self.gate.release(graph)
            self.train_graphs_held -= 1

    async def train_backward(self, graph: TrainGraph, grad_outputs: torch.Tensor) -> SpanGrads:
        """``backward``'s gradients from a kept graph (no recomputation); the graph is consumed (and
        no longer holds back weight updates)."""
        if graph.out is None:
            raise SessionClosedError("the training graph was dropped for a weight update")
        grad_outputs = self.check_grad(grad_outputs, tuple(graph.out.shape))
        try:
            result = await self.run_long(graph.grads, grad_outputs)
        finally:
            self.gate.release(graph)
        self.kept_backwards += 1
        return result

    async def run_inline(self, fn, *args):
        """Short work (batched decoding steps) on the loop's own thread, after the computation
        before it (``server/compute.py``)."""
        if not self._inline:
            return fn(*args)
        async with self._compute_lock:
            return fn(*args)

    async def run_long(self, fn, *args):
        """Longer work (prefills, forwards, backwards, loading): after the computation before it, on
        a short-lived thread, so that the loop keeps answering meanwhile (``server/compute.py``)."""
        if not self._inline:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        async with self._compute_lock:
            return await in_fresh_thread(fn, *args, threads=self.long_threads)

    def swap_model(self, model: SpanModel) -> None:
        """Serve ``model`` (a new span) from now on. Open sessions keep the span they were opened on
        until they close; their caches count against the new span's budget meanwhile."""
        for session in self.sessions.values():
            if session.model is None:
                session.model = self.model
        max_tokens = self.budget.capacity // self.budget.num_blocks
        self.model, self.span = model, model.span
        self.budget.capacity, self.budget.num_blocks = max_tokens * model.span.length, model.span.length
        self._tensor_limits = self._limits_of_span()

    def sessions_on_old_spans(self) -> list[str]:
        """Sessions still computing on a span this server moved away from."""
        return [s.id for s in self.sessions.values() if s.model is not None and s.model is not self.model]

    def shutdown(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        for session_id in list(self.sessions):
            self.close(session_id)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
