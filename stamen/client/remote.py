"""Calls through every remote block, differentiable: ``loss.backward()`` flows through the swarm.

A batch is split into sub-batches (``ClientConfig.sub_batch_tokens``); each draws its own chain of
servers (``sample_route``, by throughput) and all run concurrently on the client loop, so servers
work on different sub-batches at once. Forward keeps, per sub-batch, each hop's input and, when
gradients are needed (``ClientConfig.train_streams``), the hop's open ``rpc_train`` stream: that
server holds the hop's autograd graph inside the call, and backward sends the gradient of the
hop's output through it and gets the gradient of its input, of its deep prompts and of its LoRA
weights. Without a kept stream (a server over its budget of graphs, ``train_streams=False``)
backward sends the hop's input with the gradient over stateless ``rpc_backward`` and the server
recomputes its activations. A server that fails during forward is replaced from the failed hop's
first block on; one that fails during backward (kept stream or not) is replaced by a new chain over
exactly its blocks: the new chain is run forward from the saved input (stateless, to get its own
hops' inputs), then backward.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from stamen.client import loop
from stamen.client.retry import RetryBudget, backoff_delay, is_retryable
from stamen.client.routing import Hop
from stamen.client.swarm import Swarm
from stamen.client.tuning import ClientLoRA
from stamen.errors import ServerFullError, UnknownAdapterError
from stamen.models.lora import BlockLoRA
from stamen.rpc.calls import call_backward, call_forward, call_put_adapters
from stamen.rpc.inputs import SpanGrads, SpanInputs
from stamen.rpc.train import TrainStream
from stamen.types import PeerIDStr, Span
from stamen.wire.messages import AdapterMeta, AdapterRef

logger = logging.getLogger(__name__)


class AdapterUploader:
    """Uploads each version of a block's adapter to a server once; requests then name it by hash.
    Concurrent requests to one server share one upload. A server that lost an adapter (evicted
    from its cache, restarted) answers ``unknown_adapter``: ``forget`` it and upload again."""

    def __init__(self, swarm: Swarm, remember: int = 4096):
        self.swarm, self.remember = swarm, remember
        self._known: dict[PeerIDStr, OrderedDict[str, None]] = {}
        self._inflight: dict[tuple[PeerIDStr, str], asyncio.Future] = {}
        self.uploads = 0
        """Adapters uploaded so far (for tests and logs)."""

    def forget(self, peer_id: PeerIDStr) -> None:
        self._known.pop(peer_id, None)

    async def ensure(self, peer_id: PeerIDStr, adapters: dict[str, BlockLoRA]) -> None:
        """Make sure the server holds every adapter of ``adapters`` (hash -> weights)."""
        known = self._known.setdefault(peer_id, OrderedDict())
        missing = [h for h in adapters if h not in known]
        new = [h for h in missing if (peer_id, h) not in self._inflight]
        if new:
            task = asyncio.ensure_future(self._upload(peer_id, {h: adapters[h] for h in new}))
            for h in new:
                self._inflight[(peer_id, h)] = task
        if missing:
            await asyncio.gather(*{self._inflight[(peer_id, h)] for h in missing})

    async def _upload(self, peer_id: PeerIDStr, adapters: dict[str, BlockLoRA]) -> None:
        try:
            metas = [AdapterMeta(hash=h, targets=a.targets, rank=a.rank, scaling=a.scaling)
                     for h, a in adapters.items()]
            tensors = [t for a in adapters.values() for t in a.tensors()]
            await call_put_adapters(self.swarm.p2p, self.swarm.peer(peer_id), metas, tensors,
                                    self.swarm.config.request_timeout)
            known = self._known.setdefault(peer_id, OrderedDict())
            for h in adapters:
                known[h] = None
            while len(known) > self.remember:
                known.popitem(last=False)
            self.uploads += len(adapters)
        finally:
            for h in adapters:
                self._inflight.pop((peer_id, h), None)


@dataclass
class Tuning:
    """What servers apply besides the frozen blocks: deep prompts (num_blocks, P, H) and a LoRA adapter."""

    prompts: torch.Tensor | None = None
    lora: ClientLoRA | None = None
    _hashes: list[str] = field(default_factory=list, init=False)
    _blocks: list[BlockLoRA] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.lora is not None:  # snapshot: forward and backward of one call use the same version
            self._hashes = [self.lora.block_hash(i) for i in range(len(self.lora.layers))]
            self._blocks = [self.lora.block(i).clone() for i in range(len(self.lora.layers))]

    @property
    def active(self) -> bool:
        return self.prompts is not None or self.lora is not None

    def prompts_for(self, blocks: Span) -> torch.Tensor | None:
        return None if self.prompts is None else self.prompts[blocks.start : blocks.end].detach()

    def adapter_for(self, blocks: Span) -> AdapterRef | None:
        return None if self.lora is None else AdapterRef(hashes=self._hashes[blocks.start : blocks.end])

    def adapters_for(self, blocks: Span) -> dict[str, BlockLoRA]:
        return {self._hashes[b]: self._blocks[b] for b in range(blocks.start, blocks.end)} \
            if self.lora is not None else {}


@dataclass
class _Grads:
    """Gradients summed over sub-batches and hops."""

    prompts: torch.Tensor | None
    lora: list[list[torch.Tensor | None]]
    """Per block: the LoRA gradients in wire order (per target: A if trained, then B)."""

    def add(self, blocks: Span, received: SpanGrads) -> None:
        grad_prompts, lora_grads = received.prompts, received.adapters
        if self.prompts is not None and grad_prompts is not None:
            self.prompts[blocks.start : blocks.end] += grad_prompts.to(self.prompts.dtype)
        if lora_grads:
            per_block = len(lora_grads) // blocks.length
            for i, b in enumerate(range(blocks.start, blocks.end)):
                for j, g in enumerate(lora_grads[i * per_block : (i + 1) * per_block]):
                    g = g.float()
                    self.lora[b][j] = g if self.lora[b][j] is None else self.lora[b][j] + g


class RemoteBlocks:
    """Runs hidden states through every block of the model on the swarm (stateless calls)."""

    def __init__(self, swarm: Swarm):
        self.swarm = swarm
        self.uploader = AdapterUploader(swarm)

    def __call__(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, prompts: torch.Tensor | None = None,
                 lora: ClientLoRA | None = None) -> torch.Tensor:
        """hidden (B, T, H) -> (B, T, H); differentiable in hidden, deep prompts and LoRA weights."""
        run = _ChainRun(self, attention_mask, position_ids, Tuning(prompts, lora))
        lora_tensors = lora.tensors() if lora is not None else []
        needs_grad = torch.is_grad_enabled() and (
            hidden.requires_grad or (prompts is not None and prompts.requires_grad)
            or any(t.requires_grad for t in lora_tensors))
        if not needs_grad:
            return run.forward(hidden.detach())
        run.train = self.swarm.config.train_streams
        run.needs_grad = True
        placeholder = prompts if prompts is not None else hidden.new_zeros(0)
        return _RemoteChain.apply(run, hidden, placeholder, *lora_tensors)


class _RemoteChain(torch.autograd.Function):
    """Autograd over the remote chain: inputs hidden, deep prompts (or an empty placeholder) and
    every LoRA weight; backward asks the servers for the gradients."""

    @staticmethod
    def forward(ctx, run: _ChainRun, hidden: torch.Tensor, prompts: torch.Tensor, *lora_tensors: torch.Tensor):
        ctx.run = run
        return run.forward(hidden.detach())

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        run: _ChainRun = ctx.run
        grad_hidden, grad_prompts, lora_grads = run.backward(grad_output)
        return (None, grad_hidden, grad_prompts, *lora_grads)


class _ChainRun:
    """One forward (and its backward) of a batch through the chain, sub-batched."""

    def __init__(self, remote: RemoteBlocks, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor | None, tuning: Tuning):
        self.remote, self.swarm, self.tuning = remote, remote.swarm, tuning
        self.attention_mask, self.position_ids = attention_mask, position_ids
        self.num_blocks = remote.swarm.num_blocks
        self.traces: list[tuple[slice, list[_Trace]]] = []
        self.dtype = torch.float32
        self.train = False
        """Forward over ``rpc_train`` streams, kept for backward."""
        self.needs_grad = False
        """A backward may follow (training: compressed only with ``train_compression``)."""

    def __del__(self) -> None:  # no backward came (e.g. the loss was never backpropagated)
        streams = [hop.stream for _, trace in self.traces for hop in trace
                   if hop.stream is not None and not hop.stream.used]
        client_loop = loop._loop
        if streams and client_loop is not None:
            try:
                client_loop.call_soon_threadsafe(lambda: [s.close() for s in streams])
            except RuntimeError:
                pass  # the client loop is closed

    def _rows(self, batch: int, length: int) -> list[slice]:
        per = max(1, self.swarm.config.sub_batch_tokens // max(1, length))
        n = math.ceil(batch / per)
        per = math.ceil(batch / n)  # even sub-batches
        return [slice(i, min(batch, i + per)) for i in range(0, batch, per)]

    def _inputs(self, blocks: Span, x: torch.Tensor, rows: slice) -> SpanInputs:
        """What a hop over ``blocks`` carries for the sub-batch ``rows`` with hidden states ``x``."""
        return SpanInputs(
            x,
            attention_mask=None if self.attention_mask is None else self.attention_mask[rows],
            position_ids=None if self.position_ids is None else self.position_ids[rows],
            prompts=self.tuning.prompts_for(blocks),
            adapter=self.tuning.adapter_for(blocks),
        )

    @property
    def _train_lora_a(self) -> bool:
        lora = self.tuning.lora
        return lora.train_a if lora is not None else True

    # --- forward ---

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.dtype = hidden.dtype
        rows = self._rows(hidden.shape[0], hidden.shape[1])
        results = loop.run(self._forward_all(hidden, rows))
        self.traces = [(r, trace) for r, (_, trace) in zip(rows, results, strict=True)]
        return torch.cat([out.to(hidden.dtype) for out, _ in results], dim=0)

    async def _forward_all(self, hidden: torch.Tensor, rows: list[slice]):
        budget = self.swarm.config.max_retries
        return await asyncio.gather(*(
            self._forward_span(Span(0, self.num_blocks), hidden[r], r, RetryBudget(budget), self.train) for r in rows
        ))

    async def _forward_span(self, blocks: Span, x: torch.Tensor, rows: slice, budget: RetryBudget,
                            train: bool = False) -> tuple[torch.Tensor, list[_Trace]]:
        """Run ``x`` through ``blocks``; returns the output and each hop with its input (and its kept
        ``rpc_train`` stream when ``train``)."""
        trace: list[_Trace] = []
        block = blocks.start
        while block < blocks.end:
            route = await asyncio.to_thread(self.swarm.forward_route, Span(block, blocks.end))
            for hop in route:
                try:
                    out, stream = await self._forward_hop(hop, x, rows, budget, train)
                except Exception as e:
                    if not is_retryable(e):
                        raise
                    budget.spend(e)
                    if not isinstance(e, ServerFullError):  # full is load, not a fault: back off, draw again
                        self.swarm.ban(hop.peer_id, f"forward over blocks {hop.blocks} failed: {e}")
                    await asyncio.sleep(backoff_delay(budget.used))
                    break  # a new route from this block on
                trace.append(_Trace(hop, x, stream))
                x, block = out, hop.blocks.end
        return x, trace

    @property
    def _compression(self):
        """How activations travel: the client's choice, for training only with ``train_compression``."""
        config = self.swarm.config
        return config.compression if not self.needs_grad or config.train_compression else None

    async def _forward_hop(self, hop: Hop, x: torch.Tensor, rows: slice, budget: RetryBudget,
                           train: bool) -> tuple[torch.Tensor, TrainStream | None]:
        inputs = self._inputs(hop.blocks, x, rows)
        peer, timeout = self.swarm.peer(hop.peer_id), self.swarm.config.request_timeout
        while True:
            await self.remote.uploader.ensure(hop.peer_id, self.tuning.adapters_for(hop.blocks))
            try:
                if train:
                    try:
                        stream, out = await TrainStream.open(self.swarm.p2p, peer, hop.blocks, inputs, timeout=timeout,
                                                             train_lora_a=self._train_lora_a,
                                                             compression=self._compression)
                        return out, stream
                    except ServerFullError:  # the server holds all the graphs it may: stateless for this hop
                        train = False
                out = await call_forward(self.swarm.p2p, peer, hop.blocks, inputs, timeout=timeout,
                                         compression=self._compression)
                return out, None
            except UnknownAdapterError as e:  # evicted or restarted: upload again
                budget.spend(e)
                self.remote.uploader.forget(hop.peer_id)

    # --- backward ---

    def backward(self, grad_output: torch.Tensor):
        prompts = self.tuning.prompts
        lora = self.tuning.lora
        grads = _Grads(
            prompts=None if prompts is None else torch.zeros_like(prompts, dtype=torch.float32),
            lora=[[None] * (len(layer) * (1 + lora.train_a)) for layer in lora.layers] if lora is not None else [],
        )
        grad_hidden = loop.run(self._backward_all(grad_output, grads))
        return grad_hidden.to(self.dtype), self._prompt_grad(grads), self._lora_grads(grads)

    async def _backward_all(self, grad_output: torch.Tensor, grads: _Grads) -> torch.Tensor:
        budget = self.swarm.config.max_retries
        results = await asyncio.gather(*(
            self._backward_trace(trace, grad_output[rows], rows, grads, RetryBudget(budget))
            for rows, trace in self.traces
        ))
        return torch.cat(results, dim=0)

    async def _backward_trace(self, trace: list[_Trace], grad: torch.Tensor, rows: slice,
                              grads: _Grads, budget: RetryBudget) -> torch.Tensor:
        for step in reversed(trace):
            grad = await self._backward_hop(step, grad, rows, grads, budget)
        return grad

    async def _backward_hop(self, step: _Trace, grad: torch.Tensor, rows: slice, grads: _Grads,
                            budget: RetryBudget) -> torch.Tensor:
        hop, x, stream = step.hop, step.input, step.stream
        if stream is not None and not stream.used:  # the server kept this hop's graph
            try:
                received = await stream.backward(grad)
                grads.add(hop.blocks, received)
                return received.inputs.to(grad.dtype)
            except Exception as e:
                if not is_retryable(e):
                    raise
                # The graph is gone (its call broke or timed out), not necessarily the server: ask the
                # same server for a stateless backward first; the loop below reroutes if that fails too.
                budget.spend(e)
                logger.info("kept graph for blocks %s on %s lost (%s): stateless backward", hop.blocks,
                            hop.peer_id, e)
        inputs = self._inputs(hop.blocks, x, rows)
        while True:
            try:
                await self.remote.uploader.ensure(hop.peer_id, self.tuning.adapters_for(hop.blocks))
                received = await call_backward(
                    self.swarm.p2p, self.swarm.peer(hop.peer_id), hop.blocks, inputs, grad,
                    timeout=self.swarm.config.request_timeout, train_lora_a=self._train_lora_a,
                    compression=self._compression)
            except UnknownAdapterError as e:
                budget.spend(e)
                self.remote.uploader.forget(hop.peer_id)
                continue
            except Exception as e:
                if not is_retryable(e):
                    raise
                return await self._reroute_backward(hop, x, grad, rows, grads, budget, e)
            grads.add(hop.blocks, received)
            return received.inputs.to(grad.dtype)

    async def _reroute_backward(self, hop: Hop, x: torch.Tensor, grad: torch.Tensor, rows: slice, grads: _Grads,
                                budget: RetryBudget, error: Exception) -> torch.Tensor:
        """Ban the failed server, run a new chain over its blocks forward from the saved input
        (stateless, for the new hops' inputs), then backward through it."""
        budget.spend(error)
        if not isinstance(error, ServerFullError):  # full is load, not a fault
            self.swarm.ban(hop.peer_id, f"backward over blocks {hop.blocks} failed: {error}")
        logger.warning("backward over blocks %s failed on %s (%s): rerouting", hop.blocks, hop.peer_id, error)
        await asyncio.sleep(backoff_delay(budget.used))
        _, trace = await self._forward_span(hop.blocks, x, rows, budget)  # inputs of the new hops
        return await self._backward_trace(trace, grad, rows, grads, budget)

    def _prompt_grad(self, grads: _Grads) -> torch.Tensor | None:
        prompts = self.tuning.prompts
        if prompts is None or not prompts.requires_grad:
            return None
        return grads.prompts.to(prompts.dtype)

    def _lora_grads(self, grads: _Grads) -> list[torch.Tensor | None]:
        lora = self.tuning.lora
        if lora is None:
            return []
        out: list[torch.Tensor | None] = []
        for b, layer in enumerate(lora.layers):
            received = iter(grads.lora[b])
            for pair in layer.values():
                grad_a = next(received) if lora.train_a else None
                grad_b = next(received)
                out.append(_zeros_if_none(grad_a, pair.lora_A) if pair.lora_A.requires_grad else None)
                out.append(_zeros_if_none(grad_b, pair.lora_B) if pair.lora_B.requires_grad else None)
        return out


@dataclass
class _Trace:
    """One hop of a sub-batch's forward: its input and, if the server keeps its graph, the open stream."""

    hop: Hop
    input: torch.Tensor
    stream: TrainStream | None = None


def _zeros_if_none(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad.to(like.dtype)
