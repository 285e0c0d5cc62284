"""The span RPCs. Each ``rpc_*`` handler (server side) sits next to its ``call_*``/client half,
so the contract reads in one place. Handlers decode a typed request, call the backend, encode the reply."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import astuple, dataclass
from typing import AsyncIterator  # noqa: UP035 (hivemind recognises stream RPCs by typing.AsyncIterator hints)

import torch
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2

from stamen import trace
from stamen.errors import (
    InvalidRequestError,
    RemoteCallError,
    RequestError,
    SessionClosedError,
    StamenError,
    UnknownSessionError,
    request_error_from_code,
)
from stamen.server.backend import SpanBackend
from stamen.types import Span
from stamen.wire.compression import Compression
from stamen.wire.messages import (
    HELD_REPLIES_MAX,
    AdapterMeta,
    AdapterRef,
    AdaptersStored,
    BackwardDone,
    BackwardRequest,
    Closed,
    CloseSession,
    ErrorReply,
    FlushReplies,
    ForwardDone,
    ForwardRequest,
    InfoReply,
    Opened,
    OpenSession,
    PushTarget,
    PutAdapters,
    SpanRef,
    Step,
    StepDone,
    TrainBackward,
    TrainForwardDone,
    TrainRequest,
    decode_backward_reply,
    decode_backward_request,
    decode_forward_reply,
    decode_forward_request,
    decode_inference_reply,
    decode_inference_request,
    decode_info_reply,
    decode_push_reply,
    decode_put_adapters,
    decode_put_adapters_reply,
    decode_step,
    decode_train_backward,
    decode_train_forward_reply,
    decode_train_request,
    encode,
)
from stamen.wire.stream import FrameStream, InvalidFrameError, StreamEnded, open_stream, serve
from stamen.wire.tensors import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    decode_tensor,
    encode_tensor,
    join_tensor_parts,
    split_tensors,
)

logger = logging.getLogger(__name__)

Request = runtime_pb2.ExpertRequest
Response = runtime_pb2.ExpertResponse

INFERENCE_PROTOCOL = "SpanHandler.inference"
"""Client <-> server inference sessions: a lean stream (``wire/stream.py``) of ``Request``/``Response``."""
PUSH_PROTOCOL = "SpanHandler.push"
"""Server -> next server step outputs, a lean stream; only errors come back."""
_MAX_WAITING_PUSHES = 64
_REPLY_DELAY_S = 0.002
"""How long a server that pushed its output waits before sending the client its copy: long enough
for the push to reach the next server and its compute to start, so that the copy (the client's
daemon and process waking up, decoding it) does not compete with the push for this machine's
cores. The client needs the copy only to recover from a later failure. On the development machine
(3 traced pairs of runs) the two server-to-server legs took 0.68-0.86 ms with the delay, 0.81-0.98
without. At most ``_REPLY_DELAY_SHARE`` of the step's own compute time: the client takes the
copies in route order, so a copy held longer than the rest of the route takes would delay the token."""
_REPLY_DELAY_SHARE = 0.25


def _send_quietly(stream: FrameStream, message, mark: str | None = None) -> None:
    """Send unless the peer is gone or stopped reading: its reader then sees the stream end (a
    lost reply or push is covered by the client's copies and retries)."""
    if stream.closing:
        return
    if mark is not None:
        trace.mark(mark)
    try:
        stream.send(message)
    except StreamEnded as e:
        logger.info("%s", e)


def _send_held(session) -> None:
    """Send the replies held for a session (``Step.hold_reply``), oldest first."""
    if not session.held:  # most calls, on every step's path
        return
    held, session.held = session.held, []
    for response in held:
        session.replies.put_nowait(response)


class _StreamReplies:
    """Where a session's replies go: the client's stream, written at once; dropped once it closed."""

    def __init__(self, stream: FrameStream):
        self.stream = stream

    def put_nowait(self, response: Response) -> None:
        _send_quietly(self.stream, response, "s.reply_out")


class _PushLink:
    """The push stream to one next server; pushes made while it opens wait, in order (a few)."""

    def __init__(self):
        self.stream: FrameStream | None = None
        self.waiting: list[Request] = []

    def send(self, request: Request) -> None:
        if self.stream is not None:
            _send_quietly(self.stream, request, "s.push_out")
        elif len(self.waiting) < _MAX_WAITING_PUSHES:
            self.waiting.append(request)

    def opened(self, stream: FrameStream) -> None:
        self.stream, waiting, self.waiting = stream, self.waiting, []
        for request in waiting:
            self.send(request)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


def _error(e: Exception, step_id: int | None = None) -> Response:
    if isinstance(e, RequestError):
        return Response(metadata=encode(ErrorReply(code=e.code, message=str(e), step_id=step_id)))
    logger.exception("internal error while serving a request")
    return Response(metadata=encode(ErrorReply(code="internal", message=f"internal server error: {e!r}",
                                               step_id=step_id)))


class SpanHandler(ServicerBase):
    def __init__(self, backend: SpanBackend, peer_id: str, version: str, session_timeout: float,
                 request_timeout: float, compression: Compression = "none"):
        self.backend, self.peer_id, self.version = backend, peer_id, version
        self.session_timeout, self.request_timeout = session_timeout, request_timeout
        self.compression: Compression = compression
        """Default for what this server sends: step outputs, pushes and forward outputs (a request's
        own ``compression`` overrides it; training replies are compressed only when asked)."""
        self._p2p: P2P | None = None
        self._pushes: set[asyncio.Task] = set()
        self._push_links: dict[str, _PushLink] = {}
        self.pushed_steps = 0
        self.push_messages = 0
        self.push_bytes = 0

    async def add_p2p_handlers(self, p2p: P2P, *args, **kwargs) -> None:
        self._p2p = p2p  # pushes go out through the same daemon
        await super().add_p2p_handlers(p2p, *args, **kwargs)
        await serve(p2p, INFERENCE_PROTOCOL, self._serve_inference)
        await serve(p2p, PUSH_PROTOCOL, self._serve_push)

    async def remove_p2p_handlers(self, p2p: P2P, *args, **kwargs) -> None:
        await super().remove_p2p_handlers(p2p, *args, **kwargs)
        for protocol in (INFERENCE_PROTOCOL, PUSH_PROTOCOL):
            await p2p.remove_binary_stream_handler(protocol)

    def _decode_inputs(self, protos: list[runtime_pb2.Tensor], has_mask: bool, has_positions: bool,
                       has_hypo_ids: bool = False):
        expected = 1 + has_mask + has_positions + has_hypo_ids
        if len(protos) != expected:
            raise InvalidRequestError(f"expected {expected} tensors, got {len(protos)}")
        limit = self.backend.max_step_tokens * self.backend.hidden_size
        hidden = decode_tensor(protos[0], "hidden_states", FLOAT_DTYPES, limit, compressed_ok=True)
        rest = iter(protos[1:])
        mask = decode_tensor(next(rest), "attention_mask", INDEX_DTYPES, limit) if has_mask else None
        positions = decode_tensor(next(rest), "position_ids", {"int64", "int32"}, limit) if has_positions else None
        hypo_ids = decode_tensor(next(rest), "hypo_ids", {"int64", "int32"}, limit) if has_hypo_ids else None
        return hidden, mask, positions, hypo_ids

    # --- info: a cheap unary call, also used as a ping ---

    async def rpc_info(self, request: Request, context: P2PContext) -> Response:
        reply = InfoReply(
            peer_id=self.peer_id,
            blocks=SpanRef.of(self.backend.span),
            dtype=self.backend.dtype_name,
            cache_tokens_left=self.backend.budget.tokens_left,
            version=self.version,
            pushed_steps=self.pushed_steps,
            kept_backwards=self.backend.kept_backwards,
            recomputed_backwards=self.backend.recomputed_backwards,
            train_graphs_held=self.backend.train_graphs_held,
            compression=self.compression,
            push_messages=self.push_messages,
            push_bytes=self.push_bytes,
        )
        return Response(metadata=encode(reply))

    # --- inference: one stream per client connection, sessions with KV caches ---
    # The decoding hot path: lean frames (``wire/stream.py``), read and answered in one coroutine.

    async def _serve_inference(self, stream: FrameStream) -> None:
        """Client messages are handled in order; replies (also those of steps that another server
        pushed into this stream's sessions) are written to the stream as soon as they exist."""
        replies = _StreamReplies(stream)
        opened: set[str] = set()
        try:
            while True:
                step_id = None
                try:
                    try:
                        async with asyncio.timeout(self.session_timeout):
                            request = await stream.recv(Request)
                    except TimeoutError:
                        logger.info("closing idle sessions %s of %s", sorted(opened), stream.peer)
                        replies.put_nowait(_error(SessionClosedError(
                            f"idle for {self.session_timeout:.0f} s: session closed")))
                        return
                    if request is None:
                        return
                    msg = decode_inference_request(request.metadata)
                    step_id = msg.step_id if isinstance(msg, Step) else None
                    trace.mark("s.recv", -1 if step_id is None else step_id)
                    reply = await self._inference_message(msg, request, replies, opened)
                except InvalidFrameError as e:  # the framing is lost: answer and end the stream
                    replies.put_nowait(_error(e))
                    return
                except Exception as e:  # a typed error (or a bug): reply and keep serving
                    reply = _error(e, step_id)
                if reply is not None:
                    replies.put_nowait(reply)
        finally:
            stream.end()
            for session_id in opened:
                self.backend.close(session_id)

    async def _inference_message(self, msg, request: Request, replies: asyncio.Queue,
                                 opened: set[str]) -> Response | None:
        if isinstance(msg, OpenSession):
            prompts = self._decode_prompts(list(request.tensors), msg.has_prompts, msg.max_length)
            session = self.backend.open(msg, replies, prompts)
            session.compression = msg.compression or self.compression
            opened.add(msg.session_id)
            return Response(metadata=encode(Opened(session_id=msg.session_id)))
        if isinstance(msg, CloseSession):
            self.backend.get(msg.session_id)
            self.backend.close(msg.session_id)
            trace.flush()  # a traced benchmark reads the servers' marks after its session
            opened.discard(msg.session_id)
            return Response(metadata=encode(Closed(session_id=msg.session_id)))
        if isinstance(msg, FlushReplies):
            _send_held(self.backend.get(msg.session_id))
            return None
        await self._step(msg, list(request.tensors))
        return None  # the step's reply went to the session's queue

    async def _step(self, msg: Step, tensors: list[runtime_pb2.Tensor], pushed: bool = False) -> None:
        """Run a step unless it is a duplicate, push the output on, and queue the reply to the client."""
        session = self.backend.get(msg.session_id)
        async with session.lock:
            if msg.step_id <= session.last_step_id:
                # already computed from the other copy (pushed or sent by the client); a client that
                # sends its copy did not get the reply in time: the held ones go out now
                _send_held(session)
                return
            hidden, mask, positions, hypo_ids = self._decode_inputs(
                tensors, msg.has_attention_mask, msg.has_position_ids, msg.has_hypo_ids
            )
            start = time.perf_counter()
            out = await self.backend.step(session, msg, hidden, mask, positions, hypo_ids)
            session.last_step_id = msg.step_id
            self.pushed_steps += pushed
        compute_ms = round(1000 * (time.perf_counter() - start), 3)
        encoded = encode_tensor(out, session.compression)  # one encoding for the reply and the push
        if msg.push_to:
            pushed = msg.model_copy(update=dict(session_id=msg.push_to[0].session_id, push_to=msg.push_to[1:]))
            self._push(msg.push_to[0].peer_id, pushed, [encoded, *tensors[1:]])
        reply = StepDone(session_id=msg.session_id, step_id=msg.step_id, position=session.cache.length,
                         compute_ms=compute_ms)
        response = Response(metadata=encode(reply), tensors=[encoded])
        if msg.push_to and msg.hold_reply:  # the client waits for the chain's last hop only
            session.held.append(response)
            if len(session.held) >= HELD_REPLIES_MAX:
                _send_held(session)
            return
        _send_held(session)
        if msg.push_to:  # the next server has the output: the client's copy can wait a little
            delay = min(_REPLY_DELAY_S, _REPLY_DELAY_SHARE * compute_ms / 1000)
            asyncio.get_running_loop().call_later(delay, session.replies.put_nowait, response)
        else:
            session.replies.put_nowait(response)

    # --- push: a server hands its output straight to the next server of the route ---
    # One long-lived stream per next server: a unary call would open a new libp2p stream per step.

    def _push(self, peer_id: str, msg: Step, tensors: list[runtime_pb2.Tensor]) -> None:
        """Best effort: if the push is lost, the client's own copy of the input still arrives."""
        if peer_id == self.peer_id:  # the next hop is another session here (a server that moved serves both)
            task = asyncio.create_task(self._push_local(msg, tensors))
            self._pushes.add(task)
            task.add_done_callback(self._pushes.discard)
            return
        link = self._push_links.get(peer_id)
        if link is None:
            link = self._push_links[peer_id] = _PushLink()
            task = asyncio.create_task(self._run_push_link(peer_id, link))
            self._pushes.add(task)
            task.add_done_callback(self._pushes.discard)
        request = Request(metadata=encode(msg), tensors=tensors)
        self.push_messages += 1
        self.push_bytes += request.ByteSize()
        link.send(request)

    async def _push_local(self, msg: Step, tensors: list[runtime_pb2.Tensor]) -> None:
        """libp2p cannot dial itself: a push to this server runs the step here."""
        try:
            await self._step(msg, tensors, pushed=True)
        except (UnknownSessionError, SessionClosedError):
            pass  # the client closed or moved its session
        except Exception as e:
            logger.info("local push into session %s failed: %r", msg.session_id, e)

    async def _run_push_link(self, peer_id: str, link: _PushLink) -> None:
        """Open the stream to the next server, send what was queued meanwhile, then log its error
        replies until it ends."""
        try:
            stream = await asyncio.wait_for(
                open_stream(self._p2p, PeerID.from_base58(peer_id), PUSH_PROTOCOL), self.request_timeout)
            link.opened(stream)
            while (response := await stream.recv(Response)) is not None:
                _raise_if_error(decode_push_reply(response.metadata))
        except Exception as e:
            logger.info("push stream to %s ended: %r", peer_id, e)
        finally:
            link.close()
            if self._push_links.get(peer_id) is link:
                del self._push_links[peer_id]

    async def _serve_push(self, stream: FrameStream) -> None:
        """Steps pushed by a previous server; only errors are answered (they are logged there)."""
        try:
            while (request := await stream.recv(Request)) is not None:
                try:
                    msg = decode_step(request.metadata)
                    trace.mark("s.recv_push", msg.step_id)
                    await self._step(msg, list(request.tensors), pushed=True)
                except (UnknownSessionError, SessionClosedError):
                    continue  # the client closed or moved its session: nothing to do
                except Exception as e:
                    _send_quietly(stream, _error(e))
        except InvalidFrameError as e:
            _send_quietly(stream, _error(e))
        finally:
            stream.end()

    # --- forward: stateless, tensors streamed in parts both ways ---

    async def rpc_forward(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        try:
            msg, protos = await self._read_stream(requests, decode_forward_request, grads=False)
            hidden, _, mask, positions, prompts = self._decode_span_tensors(protos, msg, grads=False)
            out = await asyncio.wait_for(
                self.backend.forward(msg.blocks.span, hidden, mask, positions, prompts, msg.adapter),
                self.request_timeout,
            )
        except Exception as e:
            yield _error(e)
            return
        compression = msg.compression or self.compression
        for response in _stream_reply(ForwardDone(), [out], counted=True, compression=compression):
            yield response

    # --- backward: stateless like forward; the span's activations are recomputed ---

    async def rpc_backward(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        try:
            msg, protos = await self._read_stream(requests, decode_backward_request, grads=True)
            hidden, grad_outputs, mask, positions, prompts = self._decode_span_tensors(protos, msg, grads=True)
            grad_inputs, grad_prompts, adapter_grads = await asyncio.wait_for(self.backend.backward(
                msg.blocks.span, hidden, grad_outputs, mask, positions, prompts, msg.adapter, msg.train_lora_a,
            ), self.request_timeout)
        except Exception as e:
            yield _error(e)
            return
        reply = BackwardDone(has_prompt_grads=grad_prompts is not None, num_adapter_grads=len(adapter_grads))
        tensors = [grad_inputs, *([grad_prompts] if grad_prompts is not None else []), *adapter_grads]
        for response in _stream_reply(reply, tensors, counted=True, compression=msg.compression or "none"):
            yield response

    # --- train: forward with autograd, then the backward on the kept graph, within one call ---

    async def rpc_train(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        """Message 1 (``TrainRequest``): run the span with autograd, reply with its outputs and keep the
        graph in this call's scope. Message 2 (``TrainBackward``): the gradient of the outputs; reply
        with ``BackwardDone`` (as ``rpc_backward``, without recomputing) and end. No message 2 within
        ``session_timeout``, or a closed stream, drops the graph. Nothing outlives the call."""
        try:
            msg, protos = await asyncio.wait_for(
                self._read_parts(requests, decode_train_request, grads=False), self.request_timeout)
            if msg is None:
                return
            hidden, _, mask, positions, prompts = self._decode_span_tensors(protos, msg, grads=False)
            graph = await asyncio.wait_for(self.backend.train_forward(
                msg.blocks.span, hidden, mask, positions, prompts, msg.adapter, msg.train_lora_a,
            ), self.request_timeout)
        except Exception as e:
            yield _error(e)
            await _client_end(requests)
            return
        try:
            out = graph.output()
            for response in _stream_reply(TrainForwardDone(parts=1), [out], counted=True,
                                          compression=msg.compression or "none"):
                yield response
            try:
                backward, protos = await asyncio.wait_for(
                    self._read_parts(requests, decode_train_backward, grads=True), self.session_timeout)
            except TimeoutError:
                logger.info("no backward from %s within %.0f s: training graph dropped", context.remote_id,
                            self.session_timeout)
                return
            if backward is None:
                return  # the client closed the stream: no backward wanted
            try:
                if len(protos) != 1:
                    raise InvalidRequestError(f"expected 1 tensor (grad_outputs), got {len(protos)}")
                limit = self.backend.max_step_tokens * self.backend.hidden_size
                grad_outputs = decode_tensor(protos[0], "grad_outputs", FLOAT_DTYPES, limit, compressed_ok=True)
                grad_inputs, grad_prompts, adapter_grads = await asyncio.wait_for(
                    self.backend.train_backward(graph, grad_outputs), self.request_timeout)
            except Exception as e:
                yield _error(e)
                await _client_end(requests)
                return
        finally:
            self.backend.release_graph(graph)
        reply = BackwardDone(has_prompt_grads=grad_prompts is not None, num_adapter_grads=len(adapter_grads))
        tensors = [grad_inputs, *([grad_prompts] if grad_prompts is not None else []), *adapter_grads]
        for response in _stream_reply(reply, tensors, counted=True, compression=msg.compression or "none"):
            yield response
        await _client_end(requests)

    async def _read_parts(self, requests: AsyncIterator[Request], decode, grads: bool):
        """One message of a multi-message stream: typed metadata with ``parts``, then that many stream
        messages of tensor parts, joined. (None, []) when the stream ends before it."""
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            return None, []
        msg = decode(first.metadata)
        parts = list(first.tensors)
        total_bytes = sum(len(p.buffer) for p in first.tensors)
        step_bytes = self.backend.max_step_tokens * self.backend.hidden_size * 4
        limit = (3 + grads + self.backend.span.length) * step_bytes
        for _ in range(msg.parts - 1):
            try:
                request = await anext(requests)
            except StopAsyncIteration:
                raise InvalidRequestError(f"the stream ended before all {msg.parts} parts arrived") from None
            if request.metadata:
                raise InvalidRequestError("a new message started before all parts of the last arrived")
            parts.extend(request.tensors)
            total_bytes += sum(len(p.buffer) for p in request.tensors)
            if total_bytes > limit:
                raise InvalidRequestError(f"request exceeds {limit} bytes")
        return msg, join_tensor_parts(parts)

    # --- adapters: uploaded once per version of the weights, then named by content hash ---

    async def rpc_put_adapters(self, requests: AsyncIterator[Request],
                               context: P2PContext) -> AsyncIterator[Response]:
        try:
            msg, protos = await self._read_stream(requests, decode_put_adapters, grads=False)
            limit = self.backend.adapters.max_bytes
            tensors = [decode_tensor(p, f"adapter tensor {i}", FLOAT_DTYPES, limit) for i, p in enumerate(protos)]
            stored = self.backend.put_adapters(msg.adapters, tensors)
        except Exception as e:
            yield _error(e)
            return
        yield Response(metadata=encode(AdaptersStored(hashes=stored)))

    # --- shared decoding of streamed requests ---

    async def _read_stream(self, requests: AsyncIterator[Request], decode, grads: bool):
        """The first message's typed metadata and all tensors, joined from their parts. Size cap: a
        (B, T, H) float32 tensor at most per hidden, gradient, mask and positions, one per block of
        deep prompts, and the adapter cache (for uploads)."""
        msg, parts, total_bytes = None, [], 0
        step_bytes = self.backend.max_step_tokens * self.backend.hidden_size * 4
        limit = (3 + grads + self.backend.span.length) * step_bytes + self.backend.adapters.max_bytes
        async for request in requests:
            if msg is None:
                msg = decode(request.metadata)
            parts.extend(request.tensors)
            total_bytes += sum(len(p.buffer) for p in request.tensors)
            if total_bytes > limit:
                raise InvalidRequestError(f"request exceeds {limit} bytes")
        if msg is None:
            raise InvalidRequestError("empty request")
        return msg, join_tensor_parts(parts)

    def _decode_span_tensors(self, protos: list[runtime_pb2.Tensor], msg, grads: bool):
        """hidden, grad_outputs (if ``grads``), attention_mask, position_ids, prompts (as flagged; None if absent)."""
        flags = (grads, msg.has_attention_mask, msg.has_position_ids, msg.has_prompts)
        expected = 1 + sum(flags)
        if len(protos) != expected:
            raise InvalidRequestError(f"expected {expected} tensors, got {len(protos)}")
        limit = self.backend.max_step_tokens * self.backend.hidden_size
        rest = iter(protos)
        hidden = decode_tensor(next(rest), "hidden_states", FLOAT_DTYPES, limit, compressed_ok=True)
        grad = decode_tensor(next(rest), "grad_outputs", FLOAT_DTYPES, limit, compressed_ok=True) if grads else None
        mask = decode_tensor(next(rest), "attention_mask", INDEX_DTYPES, limit) if msg.has_attention_mask else None
        positions = decode_tensor(next(rest), "position_ids", {"int64", "int32"}, limit) if msg.has_position_ids \
            else None
        prompts = decode_tensor(next(rest), "prompts", FLOAT_DTYPES, limit * self.backend.span.length) \
            if msg.has_prompts else None
        return hidden, grad, mask, positions, prompts

    def _decode_prompts(self, protos: list[runtime_pb2.Tensor], has_prompts: bool, max_length: int):
        if len(protos) != has_prompts:
            raise InvalidRequestError(f"expected {int(has_prompts)} tensors, got {len(protos)}")
        if not has_prompts:
            return None
        return decode_tensor(protos[0], "prompts", FLOAT_DTYPES,
                             min(max_length, self.backend.max_step_tokens) * self.backend.hidden_size
                             * self.backend.span.length)


async def _client_end(requests: AsyncIterator[Request], timeout: float = 10.0) -> None:
    """Wait (bounded) for the client to end its half of a stream before this handler returns and
    closes ours. The client writes its end-of-stream marker right after its last message; if that
    write reaches a stream the server already closed, the client's libp2p daemon drops the whole
    connection and the client loses the replies it had not read yet (a BrokenPipeError)."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):
            async for _ in requests:
                pass


def _stream_reply(reply, tensors: list[torch.Tensor], counted: bool = False,
                  compression: Compression = "none") -> list[Response]:
    """A reply whose tensors go in parts of at most STREAM_PART_BYTES (the metadata rides on the first);
    ``counted``: the reply's ``parts`` field is set to the number of parts. ``compression`` applies to
    the first tensor only (the outputs or grad_inputs; never prompt or LoRA gradients)."""
    parts = list(split_tensors(encode_tensor(t, compression if i == 0 else "none") for i, t in enumerate(tensors)))
    if counted:
        reply = reply.model_copy(update=dict(parts=max(1, len(parts))))
    return [Response(metadata=encode(reply) if i == 0 else b"", tensors=[part]) for i, part in enumerate(parts)] \
        or [Response(metadata=encode(reply))]


# ---------------------------------------------------------------------------------------------
# Client halves
# ---------------------------------------------------------------------------------------------


def _encode_all(tensors: list[torch.Tensor], compression: Compression | None,
                activations: int) -> list[runtime_pb2.Tensor]:
    """Encode ``tensors``; the first ``activations`` of them (hidden states, gradients) with ``compression``."""
    return [encode_tensor(t, (compression or "none") if i < activations else "none") for i, t in enumerate(tensors)]


@dataclass
class WireCounter:
    """Messages and their serialized bytes (protobuf ``ByteSize``: metadata and tensors, without the
    few bytes of libp2p framing) that a client sent and received on one connection."""

    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0

    def sent(self, message: Request) -> None:
        self.messages_sent += 1
        self.bytes_sent += message.ByteSize()

    def received(self, message: Response) -> None:
        self.messages_received += 1
        self.bytes_received += message.ByteSize()

    def __add__(self, other: WireCounter) -> WireCounter:
        return WireCounter(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def __sub__(self, other: WireCounter) -> WireCounter:
        return WireCounter(*(a - b for a, b in zip(astuple(self), astuple(other), strict=True)))


def _mark_retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _check_complete(peer: PeerID, what: str, messages: int, expected: int) -> None:
    """A counted reply whose stream ended early (the transport cut it) is a network fault, retried
    like one, never a tensor decoded from some of its parts."""
    if messages < expected:
        raise RemoteCallError(f"the {what} reply from {peer} ended after {messages} of {expected} messages")


def _raise_if_error(reply) -> None:
    if isinstance(reply, ErrorReply):
        raise request_error_from_code(reply.code, reply.message)


async def call_info(p2p: P2P, peer: PeerID, timeout: float) -> InfoReply:
    stub = SpanHandler.get_stub(p2p, peer)
    try:
        response = await stub.rpc_info(Request(metadata=b"{}"), timeout=timeout)
    except Exception as e:
        raise RemoteCallError(f"info call to {peer} failed: {e!r}") from e
    return decode_info_reply(response.metadata)


async def ping(p2p: P2P, peer: PeerID, timeout: float) -> float | None:
    """Round-trip seconds of an info call, or None if the server did not answer."""
    start = time.perf_counter()
    try:
        await call_info(p2p, peer, timeout)
    except Exception:
        return None
    return time.perf_counter() - start


async def call_forward(
    p2p: P2P,
    peer: PeerID,
    blocks: Span,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    timeout: float,
    prompts: torch.Tensor | None = None,
    adapter: AdapterRef | None = None,
    compression: Compression | None = None,
) -> torch.Tensor:
    """The span's outputs; ``compression``: how hidden goes and how the outputs come back (None:
    hidden uncompressed, outputs as the server's default)."""
    msg = ForwardRequest(
        blocks=SpanRef.of(blocks),
        has_attention_mask=attention_mask is not None,
        has_position_ids=position_ids is not None,
        has_prompts=prompts is not None,
        adapter=adapter,
        compression=compression,
    )
    tensors = [t for t in (hidden, attention_mask, position_ids, prompts) if t is not None]

    async def requests() -> AsyncIterator[Request]:
        for i, part in enumerate(split_tensors(_encode_all(tensors, compression, 1))):
            yield Request(metadata=encode(msg) if i == 0 else b"", tensors=[part])

    async def call() -> torch.Tensor:
        stub = SpanHandler.get_stub(p2p, peer)
        parts, messages, expected = [], 0, 1
        async for response in await stub.rpc_forward(requests()):
            messages += 1
            if response.metadata:
                reply = decode_forward_reply(response.metadata)
                _raise_if_error(reply)
                expected = reply.parts
            parts.extend(response.tensors)
        _check_complete(peer, "forward", messages, expected)
        joined = join_tensor_parts(parts)
        if len(joined) != 1:
            raise RemoteCallError(f"forward reply from {peer} carried {len(joined)} tensors")
        return decode_tensor(joined[0], "output", FLOAT_DTYPES, hidden.numel(), compressed_ok=True)

    try:
        return await asyncio.wait_for(call(), timeout)
    except StamenError:
        raise
    except Exception as e:
        raise RemoteCallError(f"forward call to {peer} for blocks {blocks} failed: {e!r}") from e


async def _call_stream(p2p: P2P, peer: PeerID, method: str, msg, tensors: list[torch.Tensor], decode_reply,
                       timeout: float, what: str, compression: Compression | None = None, activations: int = 0):
    """Send ``msg`` with ``tensors`` in parts over a stream RPC (the first ``activations`` of them with
    ``compression``); the typed reply and its joined tensors."""

    async def requests() -> AsyncIterator[Request]:
        parts = list(split_tensors(_encode_all(tensors, compression, activations))) or [None]
        for i, part in enumerate(parts):
            yield Request(metadata=encode(msg) if i == 0 else b"", tensors=[part] if part is not None else [])

    async def call():
        stub = SpanHandler.get_stub(p2p, peer)
        reply, parts, messages = None, [], 0
        async for response in await getattr(stub, method)(requests()):
            messages += 1
            if response.metadata:
                reply = decode_reply(response.metadata)
                _raise_if_error(reply)
            parts.extend(response.tensors)
        if reply is None:
            raise RemoteCallError(f"{what} call to {peer} ended without a reply")
        _check_complete(peer, what, messages, getattr(reply, "parts", messages))
        return reply, join_tensor_parts(parts)

    try:
        return await asyncio.wait_for(call(), timeout)
    except StamenError:
        raise
    except Exception as e:
        raise RemoteCallError(f"{what} call to {peer} failed: {e!r}") from e


async def call_backward(
    p2p: P2P,
    peer: PeerID,
    blocks: Span,
    hidden: torch.Tensor,
    grad_outputs: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    timeout: float,
    prompts: torch.Tensor | None = None,
    adapter: AdapterRef | None = None,
    train_lora_a: bool = True,
    compression: Compression | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """Gradients of the span's inputs, of its deep prompts (if sent) and of its LoRA weights.
    ``compression`` applies to hidden, grad_outputs and grad_inputs only."""
    msg = BackwardRequest(
        blocks=SpanRef.of(blocks),
        has_attention_mask=attention_mask is not None,
        has_position_ids=position_ids is not None,
        has_prompts=prompts is not None,
        adapter=adapter,
        train_lora_a=train_lora_a,
        compression=compression,
    )
    tensors = [t for t in (hidden, grad_outputs, attention_mask, position_ids, prompts) if t is not None]
    reply, protos = await _call_stream(p2p, peer, "rpc_backward", msg, tensors, decode_backward_reply, timeout,
                                       f"backward over blocks {blocks}", compression, activations=2)
    if not isinstance(reply, BackwardDone) or len(protos) != 1 + reply.has_prompt_grads + reply.num_adapter_grads:
        raise RemoteCallError(f"backward reply from {peer} carried {len(protos)} tensors for {reply!r}")
    limit = max(hidden.numel(), 0 if prompts is None else prompts.numel())
    grads = [decode_tensor(p, "gradient", FLOAT_DTYPES, max(limit, 1 << 26), compressed_ok=i == 0)
             for i, p in enumerate(protos)]
    grad_prompts = grads[1] if reply.has_prompt_grads else None
    return grads[0], grad_prompts, grads[1 + reply.has_prompt_grads:]


async def call_put_adapters(p2p: P2P, peer: PeerID, metas: list[AdapterMeta], tensors: list[torch.Tensor],
                            timeout: float) -> list[str]:
    """Upload block adapters (A and B of every target, in order) into the server's cache."""
    reply, _ = await _call_stream(p2p, peer, "rpc_put_adapters", PutAdapters(adapters=metas), tensors,
                                  decode_put_adapters_reply, timeout, "adapter upload")
    return reply.hashes


class TrainStream:
    """The client half of ``rpc_train``: a span's forward whose graph the server keeps until
    ``backward`` sends the gradient of its outputs (or ``close`` drops it)."""

    def __init__(self, peer: PeerID, blocks: Span, timeout: float, compression: Compression | None = None):
        self.peer, self.blocks, self.timeout, self.compression = peer, blocks, timeout, compression
        self._outbox: asyncio.Queue[Request | None] = asyncio.Queue()
        self._replies: AsyncIterator[Response] | None = None
        self.used = False
        """``backward`` was called (a kept graph serves one backward)."""

    async def _requests(self) -> AsyncIterator[Request]:
        while (request := await self._outbox.get()) is not None:
            yield request

    def _send(self, make_msg, tensors: list[torch.Tensor]) -> None:
        parts = list(split_tensors(_encode_all(tensors, self.compression, 1)))
        for i, part in enumerate(parts):
            self._outbox.put_nowait(Request(metadata=encode(make_msg(len(parts))) if i == 0 else b"", tensors=[part]))

    async def _read_counted(self, decode):
        response = await anext(self._replies)
        reply = decode(response.metadata)
        _raise_if_error(reply)
        parts = list(response.tensors)
        for _ in range(reply.parts - 1):
            parts.extend((await anext(self._replies)).tensors)
        return reply, join_tensor_parts(parts)

    def close(self) -> None:
        """End the call (the server drops a graph still held). Idempotent; call on the client loop."""
        self._outbox.put_nowait(None)

    @classmethod
    async def open(cls, p2p: P2P, peer: PeerID, blocks: Span, hidden: torch.Tensor,
                   attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, timeout: float,
                   prompts: torch.Tensor | None = None, adapter: AdapterRef | None = None,
                   train_lora_a: bool = True,
                   compression: Compression | None = None) -> tuple[TrainStream, torch.Tensor]:
        """Run the span forward on a server that keeps its graph; the stream and the span's outputs.
        ``ServerFullError``: the server holds as many graphs as it may (use ``call_forward``).
        ``compression`` applies to hidden, the outputs and both gradients."""
        self = cls(peer, blocks, timeout, compression)
        tensors = [t for t in (hidden, attention_mask, position_ids, prompts) if t is not None]
        self._send(lambda n: TrainRequest(
            blocks=SpanRef.of(blocks), parts=n, has_attention_mask=attention_mask is not None,
            has_position_ids=position_ids is not None, has_prompts=prompts is not None, adapter=adapter,
            train_lora_a=train_lora_a, compression=compression), tensors)

        async def call():
            stub = SpanHandler.get_stub(p2p, peer)
            self._replies = (await stub.rpc_train(self._requests())).__aiter__()
            _, protos = await self._read_counted(decode_train_forward_reply)
            if len(protos) != 1:
                raise RemoteCallError(f"train reply from {peer} carried {len(protos)} tensors")
            return decode_tensor(protos[0], "output", FLOAT_DTYPES, hidden.numel(), compressed_ok=True)

        try:
            return self, await asyncio.wait_for(call(), timeout)
        except BaseException as e:
            self.close()
            if isinstance(e, StamenError) or not isinstance(e, Exception):
                raise
            raise RemoteCallError(f"train forward call to {peer} for blocks {blocks} failed: {e!r}") from e

    async def backward(self, grad_outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                   list[torch.Tensor]]:
        """The gradients ``call_backward`` returns, from the kept graph; the call then ends."""
        if self.used:
            raise RemoteCallError(f"the training graph on {self.peer} was already used")
        self.used = True
        self._send(lambda n: TrainBackward(parts=n), [grad_outputs])
        self.close()  # nothing more to send (hivemind's reader waits for the request stream to end)

        async def call():
            reply, parts = None, []
            async for response in self._replies:
                if response.metadata:
                    reply = decode_backward_reply(response.metadata)
                    _raise_if_error(reply)
                parts.extend(response.tensors)
            if not isinstance(reply, BackwardDone):
                raise RemoteCallError(f"train call to {self.peer} ended without gradients")
            protos = join_tensor_parts(parts)
            if len(protos) != 1 + reply.has_prompt_grads + reply.num_adapter_grads:
                raise RemoteCallError(f"train reply from {self.peer} carried {len(protos)} tensors for {reply!r}")
            limit = max(grad_outputs.numel(), 1 << 26)
            grads = [decode_tensor(p, "gradient", FLOAT_DTYPES, limit, compressed_ok=i == 0)
                     for i, p in enumerate(protos)]
            return grads[0], grads[1] if reply.has_prompt_grads else None, grads[1 + reply.has_prompt_grads:]

        try:
            return await asyncio.wait_for(call(), self.timeout)
        except StamenError:
            raise
        except Exception as e:
            raise RemoteCallError(f"train backward call to {self.peer} for blocks {self.blocks} failed: "
                                  f"{e!r}") from e
        finally:
            self.close()


_live_readers: set[asyncio.Task] = set()
"""Reader tasks of inference streams, held until their stream ends (also after the client closed it)."""
_CLOSE_GRACE_S = 30.0
"""Seconds a closed stream's reader waits for the server to end the stream before it is cancelled."""


class InferenceStream:
    """The client half of ``_serve_inference``: one open session on one server.

    A reader task matches replies to steps by ``step_id`` (a step may be answered without the
    client's request when a previous server pushed its input), and other replies (open, close,
    errors without a step) to the one pending control call."""

    def __init__(self, peer: PeerID, blocks: Span, session_id: str, timeout: float,
                 compression: Compression | None = None):
        self.peer, self.blocks, self.session_id, self.timeout = peer, blocks, session_id, timeout
        self.compression = compression
        """How this client sends hidden states and asks for outputs (None: uncompressed / the server's default)."""
        self.counter = WireCounter()
        """Messages and bytes this stream sent and received."""
        self._stream: FrameStream | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._control: asyncio.Future | None = None
        self._reader: asyncio.Task | None = None
        self._next_step_id = 0
        self.closed = False
        self.server_compute_ms = 0.0
        """Total compute time the server reported for this session's steps."""
        self._sent_mark, self._received_mark = f"c.out{blocks.start}", f"c.recv{blocks.start}"  # stamen/trace.py

    def _send(self, request: Request) -> None:
        """Write a request now; raises ``RemoteCallError`` (``StreamEnded``) if the stream is closed."""
        if self._stream is None:
            raise StreamEnded(f"the stream to {self.peer} is not open")
        trace.mark(self._sent_mark)
        self._stream.send(request)
        self.counter.sent(request)

    async def _read(self, stream: FrameStream) -> None:
        failure: Exception = RemoteCallError(f"{self.peer} closed the stream of session {self.session_id}")
        try:
            while (response := await stream.recv(Response)) is not None:
                trace.mark(self._received_mark)
                self.counter.received(response)
                self._dispatch(response)
        except Exception as e:
            failure = RemoteCallError(f"inference stream to {self.peer} failed: {e!r}")
        finally:
            stream.close()
        for future in [*self._pending.values(), self._control]:
            if future is not None and not future.done():
                future.set_exception(failure)

    def _dispatch(self, response: Response) -> None:
        try:
            reply = decode_inference_reply(response.metadata)
        except StamenError as e:
            reply = ErrorReply(code="internal", message=f"undecodable reply: {e}")
        step_id = getattr(reply, "step_id", None)
        future = self._pending.get(step_id) if step_id is not None else None
        if future is None:
            future = self._control
        if future is None or future.done():
            if isinstance(reply, ErrorReply):  # an error for no one in particular fails everything
                for pending in self._pending.values():
                    if not pending.done():
                        pending.set_exception(request_error_from_code(reply.code, reply.message))
            return
        if isinstance(reply, ErrorReply):
            future.set_exception(request_error_from_code(reply.code, reply.message))
        else:
            future.set_result((reply, response))

    async def _await(self, future: asyncio.Future):
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except TimeoutError:
            raise RemoteCallError(f"{self.peer} did not answer within {self.timeout} s") from None

    async def control(self, request: Request):
        """Send a non-step request (open, close, or anything malformed) and await its reply."""
        if self._reader is None or self._reader.done():
            raise RemoteCallError(f"the stream to {self.peer} is not open")
        self._control = asyncio.get_running_loop().create_future()
        self._control.add_done_callback(_mark_retrieved)
        self._send(request)
        return await self._await(self._control)

    @classmethod
    async def open(cls, p2p: P2P, peer: PeerID, blocks: Span, session_id: str, max_length: int, batch_size: int,
                   timeout: float, prompts: torch.Tensor | None = None,
                   adapter: AdapterRef | None = None, compression: Compression | None = None) -> InferenceStream:
        """Open a session; deep ``prompts`` (n_blocks, P, H) and LoRA ``adapter`` apply to all its steps;
        ``compression``: how hidden states go and how outputs come back and are pushed on."""
        self = cls(peer, blocks, session_id, timeout, compression)
        try:
            self._stream = await asyncio.wait_for(open_stream(p2p, peer, INFERENCE_PROTOCOL), timeout)
        except Exception as e:
            raise RemoteCallError(f"cannot open a stream to {peer}: {e!r}") from e
        self._reader = asyncio.create_task(self._read(self._stream))
        _live_readers.add(self._reader)  # the loop keeps tasks only weakly: a dropped session's
        self._reader.add_done_callback(_live_readers.discard)  # reader would be collected (on any thread)
        msg = OpenSession(session_id=session_id, blocks=SpanRef.of(blocks), max_length=max_length,
                          batch_size=batch_size, has_prompts=prompts is not None, adapter=adapter,
                          compression=compression)
        tensors = [encode_tensor(prompts)] if prompts is not None else []
        try:
            await self.control(Request(metadata=encode(msg), tensors=tensors))
        except BaseException:
            self._stream.end()
            asyncio.get_running_loop().call_later(_CLOSE_GRACE_S, self._reader.cancel)
            raise
        return self

    def new_step_id(self) -> int:
        self._next_step_id += 1
        return self._next_step_id - 1

    def expect(self, step_id: int) -> asyncio.Future:
        """The future of a step's output (created before sending, so a pushed reply is not missed)."""
        if step_id not in self._pending:
            future = self._pending[step_id] = asyncio.get_running_loop().create_future()
            future.add_done_callback(_mark_retrieved)  # a failed stream fails steps nobody awaits
        return self._pending[step_id]

    def send_step(self, step_id: int, hidden: torch.Tensor, position: int, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None, push_to: list[PushTarget] | None = None,
                  hypo_ids: torch.Tensor | None = None, hold_reply: bool = False) -> None:
        """``hold_reply``: servers of the push chain but the last may hold their replies (``Step``)."""
        self.expect(step_id)
        self._next_step_id = max(self._next_step_id, step_id + 1)
        msg = Step(session_id=self.session_id, step_id=step_id, position=position,
                   has_attention_mask=attention_mask is not None, has_position_ids=position_ids is not None,
                   has_hypo_ids=hypo_ids is not None, push_to=push_to or [], hold_reply=hold_reply and bool(push_to))
        tensors = [t for t in (hidden, attention_mask, position_ids, hypo_ids) if t is not None]
        self._send(Request(metadata=encode(msg), tensors=_encode_all(tensors, self.compression, 1)))

    def flush(self) -> None:
        """Ask the server for the replies it holds (``FlushReplies``); best effort: a closed
        stream fails the steps still awaited anyway."""
        try:
            self._send(Request(metadata=encode(FlushReplies(session_id=self.session_id))))
        except StamenError as e:
            logger.debug("flushing session %s on %s: %s", self.session_id, self.peer, e)

    def has_reply(self, step_id: int) -> bool:
        """Whether the step's reply (or error) is in."""
        future = self._pending.get(step_id)
        return future is not None and future.done()

    async def answered_within(self, step_id: int, seconds: float) -> bool:
        """Whether the step's reply (or error) arrives within ``seconds``, without consuming it."""
        future = self.expect(step_id)
        if not future.done():
            await asyncio.wait([future], timeout=seconds)
        return future.done()

    async def result(self, step_id: int, num_elements: int) -> torch.Tensor:
        """Await a step's output hidden states."""
        try:
            reply, response = await self._await(self.expect(step_id))
        finally:
            if self._pending.get(step_id) is not None and self._pending[step_id].done():
                del self._pending[step_id]
        if not isinstance(reply, StepDone) or len(response.tensors) != 1:
            raise RemoteCallError(f"unexpected reply from {self.peer}: {reply!r}")
        self.server_compute_ms += reply.compute_ms
        return decode_tensor(response.tensors[0], "output", FLOAT_DTYPES, num_elements, compressed_ok=True)

    async def step(self, hidden: torch.Tensor, position: int, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One step on this server alone (no push), with the next step id."""
        step_id = self.new_step_id()
        self.send_step(step_id, hidden, position, attention_mask, position_ids)
        return await self.result(step_id, hidden.numel())

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self.control(Request(metadata=encode(CloseSession(session_id=self.session_id))))
        except StamenError as e:
            logger.debug("closing session %s on %s: %s", self.session_id, self.peer, e)
        finally:
            if self._stream is not None:
                self._stream.end()
            if self._reader is not None and not self._reader.done():  # a server that never ends the stream
                asyncio.get_running_loop().call_later(_CLOSE_GRACE_S, self._reader.cancel)
