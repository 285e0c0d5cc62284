"""The span RPCs. Each ``rpc_*`` handler (server side) sits next to its ``call_*``/client half,
so the contract reads in one place. Handlers decode a typed request, call the backend, encode the reply."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator  # noqa: UP035 (hivemind recognises stream RPCs by typing.AsyncIterator hints)

import torch
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2

from stamen.errors import (
    InvalidRequestError,
    RemoteCallError,
    RequestError,
    SessionClosedError,
    StamenError,
    request_error_from_code,
)
from stamen.server.backend import SpanBackend
from stamen.types import Span
from stamen.wire.messages import (
    Closed,
    CloseSession,
    ErrorReply,
    ForwardDone,
    ForwardRequest,
    InfoReply,
    Opened,
    OpenSession,
    SpanRef,
    Step,
    StepDone,
    decode_forward_reply,
    decode_forward_request,
    decode_inference_reply,
    decode_inference_request,
    decode_info_reply,
    encode,
)
from stamen.wire.tensors import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    STREAM_PART_BYTES,
    decode_tensor,
    encode_tensor,
    join_tensor_parts,
    split_tensors,
)

logger = logging.getLogger(__name__)

Request = runtime_pb2.ExpertRequest
Response = runtime_pb2.ExpertResponse


def _error(e: Exception) -> Response:
    if isinstance(e, RequestError):
        return Response(metadata=encode(ErrorReply(code=e.code, message=str(e))))
    logger.exception("internal error while serving a request")
    return Response(metadata=encode(ErrorReply(code="internal", message=f"internal server error: {e!r}")))


class SpanHandler(ServicerBase):
    def __init__(self, backend: SpanBackend, peer_id: str, version: str, session_timeout: float,
                 request_timeout: float):
        self.backend, self.peer_id, self.version = backend, peer_id, version
        self.session_timeout, self.request_timeout = session_timeout, request_timeout

    def _decode_inputs(self, protos: list[runtime_pb2.Tensor], has_mask: bool, has_positions: bool):
        expected = 1 + has_mask + has_positions
        if len(protos) != expected:
            raise InvalidRequestError(f"expected {expected} tensors, got {len(protos)}")
        limit = self.backend.max_step_tokens * self.backend.hidden_size
        hidden = decode_tensor(protos[0], "hidden_states", FLOAT_DTYPES, limit)
        rest = iter(protos[1:])
        mask = decode_tensor(next(rest), "attention_mask", INDEX_DTYPES, limit) if has_mask else None
        positions = decode_tensor(next(rest), "position_ids", {"int64", "int32"}, limit) if has_positions else None
        return hidden, mask, positions

    # --- info: a cheap unary call, also used as a ping ---

    async def rpc_info(self, request: Request, context: P2PContext) -> Response:
        reply = InfoReply(
            peer_id=self.peer_id,
            blocks=SpanRef.of(self.backend.span),
            dtype=self.backend.dtype_name,
            cache_tokens_left=self.backend.budget.tokens_left,
            version=self.version,
        )
        return Response(metadata=encode(reply))

    # --- inference: one stream per client connection, sessions with KV caches ---

    async def rpc_inference(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        opened: set[str] = set()
        try:
            while True:
                try:
                    request = await asyncio.wait_for(anext(requests), self.session_timeout)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    logger.info("closing idle sessions %s of %s", sorted(opened), context.remote_id)
                    yield _error(SessionClosedError(f"idle for {self.session_timeout:.0f} s: session closed"))
                    return
                try:
                    yield await self._inference_message(request, opened)
                except Exception as e:  # a typed error (or a bug): reply and keep serving
                    yield _error(e)
        finally:
            for session_id in opened:
                self.backend.close(session_id)

    async def _inference_message(self, request: Request, opened: set[str]) -> Response:
        msg = decode_inference_request(request.metadata)
        if isinstance(msg, OpenSession):
            self.backend.open(msg)
            opened.add(msg.session_id)
            return Response(metadata=encode(Opened(session_id=msg.session_id)))
        if isinstance(msg, CloseSession):
            self.backend.get(msg.session_id)
            self.backend.close(msg.session_id)
            opened.discard(msg.session_id)
            return Response(metadata=encode(Closed(session_id=msg.session_id)))
        return await self._step(msg, request)

    async def _step(self, msg: Step, request: Request) -> Response:
        session = self.backend.get(msg.session_id)
        hidden, mask, positions = self._decode_inputs(
            list(request.tensors), msg.has_attention_mask, msg.has_position_ids
        )
        start = time.perf_counter()
        out = await self.backend.step(session, msg, hidden, mask, positions)
        reply = StepDone(session_id=msg.session_id, position=session.cache.length,
                         compute_ms=1000 * (time.perf_counter() - start))
        return Response(metadata=encode(reply), tensors=[encode_tensor(out)])

    # --- forward: stateless, tensors streamed in parts both ways ---

    async def rpc_forward(self, requests: AsyncIterator[Request], context: P2PContext) -> AsyncIterator[Response]:
        try:
            msg, parts = None, []
            total_bytes, limit = 0, 4 * self.backend.max_step_tokens * self.backend.hidden_size * 2 + (1 << 20)
            async for request in requests:
                if msg is None:
                    msg = decode_forward_request(request.metadata)
                parts.extend(request.tensors)
                total_bytes += sum(len(p.buffer) for p in request.tensors)
                if total_bytes > limit:
                    raise InvalidRequestError(f"request exceeds {limit} bytes")
            if msg is None:
                raise InvalidRequestError("empty forward request")
            hidden, mask, positions = self._decode_inputs(
                join_tensor_parts(parts), msg.has_attention_mask, msg.has_position_ids
            )
            out = await asyncio.wait_for(
                self.backend.forward(msg.blocks.span, hidden, mask, positions), self.request_timeout
            )
        except Exception as e:
            yield _error(e)
            return
        for i, part in enumerate(split_tensors([encode_tensor(out)])):
            yield Response(metadata=encode(ForwardDone()) if i == 0 else b"", tensors=[part])


# ---------------------------------------------------------------------------------------------
# Client halves
# ---------------------------------------------------------------------------------------------


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


async def call_forward(
    p2p: P2P,
    peer: PeerID,
    blocks: Span,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    timeout: float,
) -> torch.Tensor:
    msg = ForwardRequest(
        blocks=SpanRef.of(blocks),
        has_attention_mask=attention_mask is not None,
        has_position_ids=position_ids is not None,
    )
    tensors = [t for t in (hidden, attention_mask, position_ids) if t is not None]

    async def requests() -> AsyncIterator[Request]:
        for i, part in enumerate(split_tensors(encode_tensor(t) for t in tensors)):
            yield Request(metadata=encode(msg) if i == 0 else b"", tensors=[part])

    async def call() -> torch.Tensor:
        stub = SpanHandler.get_stub(p2p, peer)
        parts = []
        async for response in await stub.rpc_forward(requests()):
            if response.metadata:
                _raise_if_error(decode_forward_reply(response.metadata))
            parts.extend(response.tensors)
        joined = join_tensor_parts(parts)
        if len(joined) != 1:
            raise RemoteCallError(f"forward reply from {peer} carried {len(joined)} tensors")
        return decode_tensor(joined[0], "output", FLOAT_DTYPES, hidden.numel())

    try:
        return await asyncio.wait_for(call(), timeout)
    except StamenError:
        raise
    except Exception as e:
        raise RemoteCallError(f"forward call to {peer} for blocks {blocks} failed: {e!r}") from e


class InferenceStream:
    """The client half of ``rpc_inference``: one open session on one server."""

    def __init__(self, peer: PeerID, blocks: Span, session_id: str, timeout: float):
        self.peer, self.blocks, self.session_id, self.timeout = peer, blocks, session_id, timeout
        self._outbox: asyncio.Queue[Request | None] = asyncio.Queue()
        self._replies: AsyncIterator[Response] | None = None
        self.closed = False
        self.server_compute_ms = 0.0
        """Total compute time the server reported for this session's steps."""

    async def _requests(self) -> AsyncIterator[Request]:
        while (request := await self._outbox.get()) is not None:
            yield request

    async def _exchange(self, request: Request) -> Response:
        if self._replies is None:
            raise RemoteCallError("stream is not open")
        self._outbox.put_nowait(request)
        try:
            response = await asyncio.wait_for(anext(self._replies), self.timeout)
        except StopAsyncIteration:
            raise RemoteCallError(f"{self.peer} closed the stream of session {self.session_id}") from None
        except TimeoutError:
            raise RemoteCallError(f"{self.peer} did not answer within {self.timeout} s") from None
        except Exception as e:
            raise RemoteCallError(f"inference stream to {self.peer} failed: {e!r}") from e
        return response

    @classmethod
    async def open(cls, p2p: P2P, peer: PeerID, blocks: Span, session_id: str, max_length: int, batch_size: int,
                   timeout: float) -> InferenceStream:
        self = cls(peer, blocks, session_id, timeout)
        stub = SpanHandler.get_stub(p2p, peer)
        try:
            self._replies = await asyncio.wait_for(stub.rpc_inference(self._requests()), timeout)
        except Exception as e:
            raise RemoteCallError(f"cannot open a stream to {peer}: {e!r}") from e
        msg = OpenSession(session_id=session_id, blocks=SpanRef.of(blocks), max_length=max_length,
                          batch_size=batch_size)
        try:
            reply = decode_inference_reply((await self._exchange(Request(metadata=encode(msg)))).metadata)
            _raise_if_error(reply)
        except BaseException:
            self._outbox.put_nowait(None)
            raise
        return self

    async def step(self, hidden: torch.Tensor, position: int, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Send hidden (B, T, H) at ``position``; long inputs go in several messages under the size cap."""
        B, T, H = hidden.shape
        chunk = max(1, STREAM_PART_BYTES * 2 // (B * H * hidden.element_size()))
        outputs = []
        for start in range(0, T, chunk):
            end = min(T, start + chunk)
            outputs.append(await self._step_once(
                hidden[:, start:end], position + start,
                None if attention_mask is None else attention_mask[:, start:end],
                None if position_ids is None else position_ids[:, start:end],
            ))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    async def _step_once(self, hidden, position, attention_mask, position_ids) -> torch.Tensor:
        msg = Step(session_id=self.session_id, position=position, has_attention_mask=attention_mask is not None,
                   has_position_ids=position_ids is not None)
        tensors = [encode_tensor(t) for t in (hidden, attention_mask, position_ids) if t is not None]
        response = await self._exchange(Request(metadata=encode(msg), tensors=tensors))
        reply = decode_inference_reply(response.metadata)
        _raise_if_error(reply)
        if not isinstance(reply, StepDone) or len(response.tensors) != 1:
            raise RemoteCallError(f"unexpected reply from {self.peer}: {reply!r}")
        self.server_compute_ms += reply.compute_ms
        return decode_tensor(response.tensors[0], "output", FLOAT_DTYPES, hidden.numel())

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self._exchange(Request(metadata=encode(CloseSession(session_id=self.session_id))))
        except StamenError as e:
            logger.debug("closing session %s on %s: %s", self.session_id, self.peer, e)
        finally:
            self._outbox.put_nowait(None)
