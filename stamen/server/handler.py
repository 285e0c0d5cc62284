"""The span server's RPC handlers (declared in ``stamen/rpc/protocol.py``): each decodes a typed
request, calls the backend and encodes the reply. Inference sessions and pushes are served by the
inference engine (``server/inference.py``).

Stream calls (forward, backward, training, adapter uploads, bandwidth probes) carry hivemind's
protobuf stream frames, read here by the server's own bounded reader (``CallRequests``) rather than
hivemind's handler, which reads any frame length and waits for it forever, with no deadline and no
count of the bytes it holds. Every call ends with a typed reply, then reads (and drops) what the
client still sends, for a bounded time, before the stream closes (``_serve_call``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator  # noqa: UP035 (the handlers' stream types, as hivemind declares them)

from hivemind.p2p import P2P, P2PContext, PeerID

from stamen.errors import InvalidRequestError, NotTrainingError, SessionClosedError, WrongBlocksError
from stamen.rpc import protocol
from stamen.rpc.inputs import SpanInputs, decode_received
from stamen.rpc.parts import CallRequests, NoMessageError, call_server, read_all, read_counted, reply_in_parts
from stamen.rpc.protocol import Request, Response
from stamen.rpc.replies import error_response
from stamen.server.backend import SpanBackend, TrainingStage
from stamen.server.inference import InferenceEngine
from stamen.server.limits import Limits, PeerSlots
from stamen.server.metrics import ServerMetrics
from stamen.types import Compression
from stamen.wire.messages import (
    AdaptersStored,
    BandwidthDone,
    ForwardDone,
    InfoReply,
    SpanRef,
    StageState,
    TrainForwardDone,
    decode_backward_request,
    decode_forward_request,
    decode_put_adapters,
    decode_stage_state_request,
    decode_train_backward,
    decode_train_request,
    encode,
)
from stamen.wire.stream import ByteBudget, serve
from stamen.wire.tensors import FLOAT_DTYPES

logger = logging.getLogger(__name__)

BANDWIDTH_MAX_BYTES = 64 << 20
"""Most bytes a bandwidth probe may stream (joining servers send 4 MiB)."""


class SpanHandler:
    def __init__(self, backend: SpanBackend, peer_id: str, version: str, session_timeout: float,
                 request_timeout: float, compression: Compression = "none", limits: Limits | None = None,
                 metrics: ServerMetrics | None = None):
        self.backend, self.peer_id, self.version = backend, peer_id, version
        self.session_timeout, self.request_timeout = session_timeout, request_timeout
        self.compression: Compression = compression
        """Default for what this server sends: step outputs, pushes and forward outputs (a request's
        own ``compression`` overrides it; training replies are compressed only when asked)."""
        self.limits = limits or Limits.default()
        self.budget = ByteBudget(self.limits.max_request_bytes)
        """Request bytes held at once, over stream calls, inference and push streams."""
        self._calls = PeerSlots(self.limits.max_peer_calls, "stream calls")
        self.metrics = metrics or ServerMetrics(peer_id)
        self.engine = InferenceEngine(backend, peer_id, session_timeout, request_timeout, compression,
                                      self.limits, self.budget, self.metrics)

    def _handlers(self) -> dict:
        return {protocol.INFO: self.rpc_info, protocol.FORWARD: self.rpc_forward,
                protocol.BACKWARD: self.rpc_backward, protocol.TRAIN: self.rpc_train,
                protocol.PUT_ADAPTERS: self.rpc_put_adapters, protocol.INFERENCE: self.engine.serve_inference,
                protocol.PUSH: self.engine.serve_push, protocol.BANDWIDTH: self.rpc_bandwidth,
                protocol.STAGE_STATE: self.rpc_stage_state}

    async def add_p2p_handlers(self, p2p: P2P) -> None:
        self.engine.p2p = p2p  # pushes go out through the same daemon
        handlers = self._handlers()
        for rpc in protocol.SPAN_SERVICE:
            if rpc.stream_input:  # hivemind's protobuf stream frames, read by our bounded reader
                await serve(p2p, rpc.name, self._serve_call(handlers[rpc]))
            else:
                await protocol.register(p2p, rpc, handlers[rpc])

    async def remove_p2p_handlers(self, p2p: P2P) -> None:
        for rpc in protocol.SPAN_SERVICE:
            await protocol.unregister(p2p, rpc)

    def _serve_call(self, handler):
        """Serve one stream call with ``handler(requests, peer)`` within the peer's call slots and the
        server's byte budget (``rpc.parts.call_server``)."""
        return call_server(handler, self.limits.read_timeout, self.budget, self._calls.hold)

    @contextlib.contextmanager
    def _timed(self, kind: str, inputs: SpanInputs):
        """Count a call that completes, with its tokens and compute time (``ServerMetrics``)."""
        start = time.perf_counter()
        yield
        self.metrics.served(kind, inputs.hidden.shape[0] * inputs.hidden.shape[1], time.perf_counter() - start)

    def _check_call(self, msg) -> None:
        """What a span call's metadata alone can refuse, before its tensors are read."""
        self.backend.check_blocks(msg.blocks.span)
        self.backend.get_adapters(msg.adapter, msg.blocks.span)

    def _request_bytes(self, grads: bool) -> int:
        """Most bytes a span call's request may carry: a (B, T, H) float32 tensor per hidden state,
        gradient, mask and positions, and one per block of deep prompts."""
        b = self.backend
        return (3 + grads + b.span.length) * b.max_step_tokens * b.hidden_size * 4

    def _stream_bytes(self, grads: bool) -> int:
        """Most bytes a one-message request stream may carry: a span call's, or an adapter upload."""
        return self._request_bytes(grads) + self.backend.adapters.max_bytes

    # --- info: a cheap unary call, also used as a ping ---

    async def rpc_info(self, request: Request, context: P2PContext) -> Response:
        b, engine = self.backend, self.engine
        return Response(metadata=encode(InfoReply(
            peer_id=self.peer_id, blocks=SpanRef.of(b.span), dtype=b.dtype_name,
            cache_tokens_left=b.budget.tokens_left, version=self.version, pushed_steps=engine.pushed_steps,
            kept_backwards=b.kept_backwards, recomputed_backwards=b.recomputed_backwards,
            train_graphs_held=b.train_graphs_held, compression=self.compression,
            push_messages=engine.push_messages, push_bytes=engine.push_bytes, **self._batch_info(),
        )))

    def _batch_info(self) -> dict:
        batcher = self.backend.batcher
        if batcher is None:
            return {}
        stats = batcher.stats
        return dict(batching=True, batch_iterations=stats.iterations, batch_steps=stats.steps,
                    batch_chunks=stats.chunks, burst_waits=stats.burst_waits, burst_misses=stats.burst_misses)

    # --- forward and backward: stateless, tensors streamed in parts both ways ---

    async def rpc_forward(self, requests: CallRequests, peer: PeerID) -> AsyncIterator[Response]:
        try:
            msg, protos = await read_all(requests, decode_forward_request, self._stream_bytes(grads=False),
                                         self.limits.request_read_timeout, self._check_call)
            inputs = SpanInputs.unpack(msg, protos, self.backend.tensor_limits())
            with self._timed("forward", inputs):
                out = await asyncio.wait_for(self.backend.forward(msg.blocks.span, inputs), self.request_timeout)
        except Exception as e:
            yield error_response(e)
            return
        for response in reply_in_parts(ForwardDone(), [out], msg.compression or self.compression):
            yield response

    async def rpc_backward(self, requests: CallRequests, peer: PeerID) -> AsyncIterator[Response]:
        """The span's activations are recomputed; nothing outlives the call."""
        try:
            msg, protos = await read_all(requests, decode_backward_request, self._stream_bytes(grads=True),
                                         self.limits.request_read_timeout, self._check_call)
            inputs, grad_outputs = SpanInputs.unpack_with_grad(msg, protos, self.backend.tensor_limits())
            with self._timed("backward", inputs):
                grads = await asyncio.wait_for(self.backend.backward(msg.blocks.span, inputs, grad_outputs,
                                                                     msg.train_lora_a), self.request_timeout)
        except Exception as e:
            yield error_response(e)
            return
        for response in reply_in_parts(grads.reply(), grads.tensors(), msg.compression):
            yield response

    # --- train: forward with autograd, then the backward on the kept graph, within one call ---

    async def rpc_train(self, requests: CallRequests, peer: PeerID) -> AsyncIterator[Response]:
        """Message 1 (``TrainRequest``): run the span with autograd, reply with its outputs and keep the
        graph (``SpanBackend.train_graph``). Message 2 (``TrainBackward``): the gradient of the outputs;
        reply with the gradients (as ``rpc_backward``, without recomputing) and end. No message 2
        within ``session_timeout`` (an error reply), or a closed stream, drops the graph. Nothing
        outlives the call."""
        try:
            msg, protos = await read_counted(requests, decode_train_request, self._request_bytes(grads=False),
                                             timeout=self.limits.request_read_timeout)
            if msg is None:
                return
            inputs = SpanInputs.unpack(msg, protos, self.backend.tensor_limits())
            mb = msg.microbatch
            stage = self._stage() if mb is not None else None
            if stage is not None and mb.accumulate:
                stage.check_epoch(mb.epoch)  # before the forward: a peer behind fails fast
            async with self.backend.train_graph(msg.blocks.span, inputs, msg.train_lora_a, self.request_timeout,
                                                weights=stage is not None and mb.accumulate,
                                                recompute=msg.recompute) as graph:
                for response in reply_in_parts(TrainForwardDone(parts=1), [graph.output()], msg.compression):
                    yield response
                grad_outputs = await self._grad_outputs(requests)
                if grad_outputs is None:
                    return
                with self._timed("train", inputs):
                    grads = await asyncio.wait_for(self.backend.train_backward(graph, grad_outputs),
                                                   self.request_timeout)
                reply = grads.reply()
                if stage is not None and mb.accumulate:
                    accumulated, epoch = await stage.accumulate(mb, graph.weight_grads)
                    reply = reply.model_copy(update=dict(accumulated=accumulated, stage_epoch=epoch))
        except Exception as e:
            yield error_response(e)
            return
        for response in reply_in_parts(reply, grads.tensors(), msg.compression):
            yield response

    def _stage(self) -> TrainingStage:
        stage = self.backend.stage
        if stage is None:
            raise NotTrainingError("this server's blocks do not train (started without --train)")
        return stage

    async def _grad_outputs(self, requests: CallRequests):
        """Message 2 of ``rpc_train``: the gradient of the outputs, or None when the client ended the
        call. None within ``session_timeout`` drops the graph: ``SessionClosedError``, on which clients
        fall back to a stateless backward."""
        try:
            backward, protos = await read_counted(requests, decode_train_backward, self._request_bytes(grads=True),
                                                  timeout=self.limits.request_read_timeout, wait=self.session_timeout)
        except NoMessageError:
            logger.info("no backward from %s within %.0f s: training graph dropped", requests.stream.peer,
                        self.session_timeout)
            raise SessionClosedError(f"no backward within {self.session_timeout:.0f} s: the training graph "
                                     f"was dropped") from None
        if backward is not None and len(protos) != 1:
            raise InvalidRequestError(f"expected 1 tensor (grad_outputs), got {len(protos)}")
        return None if backward is None else decode_received(
            protos[0], "grad_outputs", FLOAT_DTYPES, self.backend.tensor_limits().elements, compressed_ok=True)

    # --- a training stage's state, for joining peers and exports ---

    async def rpc_stage_state(self, requests: CallRequests, peer: PeerID) -> AsyncIterator[Response]:
        """The stage's parameters (and optimizer and averager state) at its current epoch, uncompressed."""
        try:
            msg, _ = await read_all(requests, decode_stage_state_request, 0, self.limits.request_read_timeout)
            stage = self._stage()
            if msg.blocks.span != self.backend.span:
                raise WrongBlocksError(f"this stage trains blocks {self.backend.span}, not {msg.blocks.span}")
            epoch, tensors, meta = await stage.state(msg.optimizer)
        except Exception as e:
            yield error_response(e)
            return
        reply = StageState(epoch=epoch, names=list(tensors), optimizer_meta=meta)
        for response in reply_in_parts(reply, list(tensors.values()), "none"):
            yield response

    # --- adapters: uploaded once per version of the weights, then named by content hash ---

    async def rpc_put_adapters(self, requests: CallRequests, peer: PeerID) -> AsyncIterator[Response]:
        try:
            msg, protos = await read_all(requests, decode_put_adapters, self._stream_bytes(grads=False),
                                         self.limits.request_read_timeout)
            limit = self.backend.adapters.max_bytes
            tensors = [decode_received(p, f"adapter tensor {i}", FLOAT_DTYPES, limit) for i, p in enumerate(protos)]
            stored = self.backend.put_adapters(msg.adapters, tensors)
        except Exception as e:
            yield error_response(e)
            return
        yield Response(metadata=encode(AdaptersStored(hashes=stored)))

    # --- bandwidth: a joining server streams bytes here to measure its link ---

    async def rpc_bandwidth(self, requests: CallRequests, peer: PeerID) -> AsyncIterator[Response]:
        """Count what arrives (at most ``BANDWIDTH_MAX_BYTES``, within the request deadline), keep nothing."""
        received = 0
        try:
            async with asyncio.timeout(self.limits.request_read_timeout):
                async for request in requests:
                    received += sum(len(t.buffer) for t in request.tensors)
                    requests.stream.release()
                    if received > BANDWIDTH_MAX_BYTES:
                        raise InvalidRequestError(f"a bandwidth probe of over {BANDWIDTH_MAX_BYTES} bytes")
        except TimeoutError:
            raise InvalidRequestError(
                f"the probe did not arrive within {self.limits.request_read_timeout:.3g} s") from None
        yield Response(metadata=encode(BandwidthDone(received=received)))
