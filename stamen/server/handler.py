"""The span server's RPC handlers (declared in ``stamen/rpc/protocol.py``): each decodes a typed
request, calls the backend and encodes the reply. Inference sessions and pushes are served by the
inference engine (``server/inference.py``)."""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator  # noqa: UP035 (the handlers' stream types, as hivemind declares them)

from hivemind.p2p import P2P, P2PContext

from stamen.errors import InvalidRequestError
from stamen.rpc import protocol
from stamen.rpc.inputs import SpanInputs
from stamen.rpc.parts import read_all, read_counted, reply_in_parts, wait_for_end
from stamen.rpc.protocol import Request, Response
from stamen.rpc.replies import error_response
from stamen.server.backend import SpanBackend
from stamen.server.inference import InferenceEngine
from stamen.types import Compression
from stamen.wire.messages import (
    AdaptersStored,
    BandwidthDone,
    ForwardDone,
    InfoReply,
    SpanRef,
    TrainForwardDone,
    decode_backward_request,
    decode_forward_request,
    decode_put_adapters,
    decode_train_backward,
    decode_train_request,
    encode,
)
from stamen.wire.tensors import FLOAT_DTYPES, decode_tensor

logger = logging.getLogger(__name__)


class SpanHandler:
    def __init__(self, backend: SpanBackend, peer_id: str, version: str, session_timeout: float,
                 request_timeout: float, compression: Compression = "none"):
        self.backend, self.peer_id, self.version = backend, peer_id, version
        self.session_timeout, self.request_timeout = session_timeout, request_timeout
        self.compression: Compression = compression
        """Default for what this server sends: step outputs, pushes and forward outputs (a request's
        own ``compression`` overrides it; training replies are compressed only when asked)."""
        self.engine = InferenceEngine(backend, peer_id, session_timeout, request_timeout, compression)

    def _handlers(self) -> dict:
        return {protocol.INFO: self.rpc_info, protocol.FORWARD: self.rpc_forward,
                protocol.BACKWARD: self.rpc_backward, protocol.TRAIN: self.rpc_train,
                protocol.PUT_ADAPTERS: self.rpc_put_adapters, protocol.INFERENCE: self.engine.serve_inference,
                protocol.PUSH: self.engine.serve_push, protocol.BANDWIDTH: self.rpc_bandwidth}

    async def add_p2p_handlers(self, p2p: P2P) -> None:
        self.engine.p2p = p2p  # pushes go out through the same daemon
        handlers = self._handlers()
        for rpc in protocol.SPAN_SERVICE:
            await protocol.register(p2p, rpc, handlers[rpc])

    async def remove_p2p_handlers(self, p2p: P2P) -> None:
        for rpc in protocol.SPAN_SERVICE:
            await protocol.unregister(p2p, rpc)

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
            push_messages=engine.push_messages, push_bytes=engine.push_bytes,
        )))

    # --- forward and backward: stateless, tensors streamed in parts both ways ---

    async def rpc_forward(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        try:
            msg, protos = await read_all(requests, decode_forward_request, self._stream_bytes(grads=False))
            inputs = SpanInputs.unpack(msg, protos, self.backend.tensor_limits())
            out = await asyncio.wait_for(self.backend.forward(msg.blocks.span, inputs), self.request_timeout)
        except Exception as e:
            yield error_response(e)
            return
        for response in reply_in_parts(ForwardDone(), [out], msg.compression or self.compression):
            yield response

    async def rpc_backward(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        """The span's activations are recomputed; nothing outlives the call."""
        try:
            msg, protos = await read_all(requests, decode_backward_request, self._stream_bytes(grads=True))
            inputs, grad_outputs = SpanInputs.unpack_with_grad(msg, protos, self.backend.tensor_limits())
            grads = await asyncio.wait_for(
                self.backend.backward(msg.blocks.span, inputs, grad_outputs, msg.train_lora_a), self.request_timeout)
        except Exception as e:
            yield error_response(e)
            return
        for response in reply_in_parts(grads.reply(), grads.tensors(), msg.compression):
            yield response

    # --- train: forward with autograd, then the backward on the kept graph, within one call ---

    async def rpc_train(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        """Message 1 (``TrainRequest``): run the span with autograd, reply with its outputs and keep the
        graph (``SpanBackend.train_graph``). Message 2 (``TrainBackward``): the gradient of the outputs;
        reply with the gradients (as ``rpc_backward``, without recomputing) and end. No message 2
        within ``session_timeout``, or a closed stream, drops the graph. Nothing outlives the call."""
        try:
            msg, protos = await asyncio.wait_for(
                read_counted(requests, decode_train_request, self._request_bytes(grads=False)), self.request_timeout)
            if msg is None:
                return
            inputs = SpanInputs.unpack(msg, protos, self.backend.tensor_limits())
            async with self.backend.train_graph(msg.blocks.span, inputs, msg.train_lora_a,
                                                self.request_timeout) as graph:
                for response in reply_in_parts(TrainForwardDone(parts=1), [graph.output()], msg.compression):
                    yield response
                grad_outputs = await self._grad_outputs(requests, context)
                if grad_outputs is None:
                    return
                grads = await asyncio.wait_for(self.backend.train_backward(graph, grad_outputs), self.request_timeout)
        except Exception as e:
            yield error_response(e)
            await wait_for_end(requests)
            return
        for response in reply_in_parts(grads.reply(), grads.tensors(), msg.compression):
            yield response
        await wait_for_end(requests)

    async def _grad_outputs(self, requests: AsyncIterator[Request], context: P2PContext):
        """Message 2 of ``rpc_train``: the gradient of the outputs, or None when the client closed the
        call or sent nothing within ``session_timeout`` (the graph is then dropped)."""
        try:
            backward, protos = await asyncio.wait_for(
                read_counted(requests, decode_train_backward, self._request_bytes(grads=True)), self.session_timeout)
        except TimeoutError:
            logger.info("no backward from %s within %.0f s: training graph dropped", context.remote_id,
                        self.session_timeout)
            return None
        if backward is not None and len(protos) != 1:
            raise InvalidRequestError(f"expected 1 tensor (grad_outputs), got {len(protos)}")
        return None if backward is None else decode_tensor(
            protos[0], "grad_outputs", FLOAT_DTYPES, self.backend.tensor_limits().elements, compressed_ok=True)

    # --- adapters: uploaded once per version of the weights, then named by content hash ---

    async def rpc_put_adapters(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        try:
            msg, protos = await read_all(requests, decode_put_adapters, self._stream_bytes(grads=False))
            limit = self.backend.adapters.max_bytes
            tensors = [decode_tensor(p, f"adapter tensor {i}", FLOAT_DTYPES, limit) for i, p in enumerate(protos)]
            stored = self.backend.put_adapters(msg.adapters, tensors)
        except Exception as e:
            yield error_response(e)
            return
        yield Response(metadata=encode(AdaptersStored(hashes=stored)))

    # --- bandwidth: a joining server streams bytes here to measure its link ---

    async def rpc_bandwidth(self, requests: AsyncIterator[Request], context: P2PContext) -> Response:
        received = 0
        async for request in requests:
            received += sum(len(t.buffer) for t in request.tensors)
        return Response(metadata=encode(BandwidthDone(received=received)))
