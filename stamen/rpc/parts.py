"""Multi-part messages of the stream RPCs: a typed message whose tensors travel in parts of at
most ``STREAM_PART_BYTES`` (hivemind caps one protobuf message at 4 MiB), the metadata on the
first part. Counted messages say in ``parts`` how many stream messages they take, so a stream
cut by the transport is never mistaken for a complete message. Servers read a call's requests
through ``CallRequests``: bounded frames, each within a deadline, their bytes counted in the
server's ``ByteBudget``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import torch
from hivemind.proto import runtime_pb2

from stamen.errors import InvalidRequestError, RemoteCallError, StamenError
from stamen.rpc.protocol import Request, Response
from stamen.rpc.replies import check_complete, error_response, raise_if_error
from stamen.types import Compression
from stamen.wire.messages import encode
from stamen.wire.stream import ByteBudget, FrameStream, PeerFailedError, StreamEnded
from stamen.wire.tensors import encode_tensor, join_tensor_parts, split_tensors


def encode_all(tensors: Iterable[torch.Tensor], compression: Compression | None,
               activations: int) -> list[runtime_pb2.Tensor]:
    """Encode ``tensors``; the first ``activations`` of them (hidden states, gradients) with ``compression``."""
    return [encode_tensor(t, (compression or "none") if i < activations else "none") for i, t in enumerate(tensors)]


def in_parts(kind: type[Request] | type[Response], msg, protos: list[runtime_pb2.Tensor],
             counted: bool = False) -> list:
    """``msg`` with its encoded tensors as stream messages of ``kind``; ``counted``: ``msg.parts``
    is set to their number."""
    parts = list(split_tensors(protos))
    if counted:
        msg = msg.model_copy(update=dict(parts=max(1, len(parts))))
    return [kind(metadata=encode(msg) if i == 0 else b"", tensors=[part]) for i, part in enumerate(parts)] \
        or [kind(metadata=encode(msg))]


def reply_in_parts(reply, tensors: list[torch.Tensor], compression: Compression | None = None) -> list[Response]:
    """A counted reply; ``compression`` applies to the first tensor only (the outputs or the input
    gradient, never prompt or LoRA gradients)."""
    return in_parts(Response, reply, encode_all(tensors, compression, 1), counted=True)


MAX_PART_BYTES = 16 << 20
"""Largest message a server reads in a stream call's request (clients send parts of at most
``STREAM_PART_BYTES`` of tensors plus metadata; hivemind's own client caps a message at 4 MiB)."""


class NoMessageError(InvalidRequestError):
    """No message of a stream call began within its wait."""


class CallRequests:
    """The request half of one stream call as its server reads it (what hivemind's protobuf
    handlers get as their request iterator, with bounds): messages of at most ``MAX_PART_BYTES``,
    each within ``timeout`` seconds (``InvalidRequestError`` past it), their bytes taken from the
    stream's budget and held until the call ends. A client's error frame ends the request there,
    as hivemind reads it."""

    def __init__(self, stream: FrameStream, timeout: float):
        self.stream, self.timeout = stream, timeout
        self.ended = False
        """The client ended its half (or failed it, or left)."""

    def __aiter__(self) -> CallRequests:
        return self

    async def __anext__(self) -> Request:
        request = await self.next()
        if request is None:
            raise StopAsyncIteration
        return request

    async def next(self, wait: float | None = None) -> Request | None:
        """The next message, or None at the end of the request; ``wait``: seconds for it to begin
        (default: ``timeout``)."""
        if self.ended:
            return None
        wait = self.timeout if wait is None else wait
        try:
            request = await self.stream.recv(Request, idle=wait, timeout=self.timeout, max_bytes=MAX_PART_BYTES)
        except TimeoutError:
            raise NoMessageError(f"no message arrived within {wait:.3g} s") from None
        except PeerFailedError:
            request = None
        self.ended = request is None
        return request

    async def drain(self, timeout: float) -> None:
        """Read and drop what the client still sends until it closes the stream (at most ``timeout``
        seconds), so that the reply already written reaches it. A hivemind client writes its
        end-of-stream frame right after its last request but closes its half only once it has read
        every reply; closing before that cut long replies short (a backward's 30 parts arrived as 25),
        and closing under the client's writes makes its libp2p daemon drop the connection with the
        replies unread (a BrokenPipeError there); both look like network faults and are retried."""
        if self.ended:  # its end frame was read: wait for it to close
            with contextlib.suppress(TimeoutError, ConnectionError):
                async with asyncio.timeout(timeout):
                    while await self.stream.reader.read(1 << 16):
                        pass
        else:
            await self.stream.drop(timeout, MAX_PART_BYTES, until_closed=True)
            self.ended = True


def call_server(handler: Callable[[CallRequests, Any], AsyncIterator[Response]], read_timeout: float,
                budget: ByteBudget | None = None,
                hold: Callable[[Any], contextlib.AbstractContextManager] | None = None):
    """A lean-stream handler that serves one stream call with ``handler(requests, peer)`` (an async
    generator of replies): messages read with ``CallRequests``' bounds (``budget``: the bytes they
    may hold), within ``hold(peer)`` (a peer's call slots), replies written with flow control, a
    typed reply for any failure, then what the client still sends read and dropped (bounded) before
    the stream closes, so that the client reads the reply instead of a cut stream."""

    async def serve_call(stream: FrameStream) -> None:
        stream.budget = budget
        requests = CallRequests(stream, read_timeout)
        try:
            with hold(stream.peer) if hold is not None else contextlib.nullcontext():
                async for response in handler(requests, stream.peer):
                    await stream.write(response, read_timeout)
        except StreamEnded:  # the client stopped reading or left
            return
        except Exception as e:
            try:
                await stream.write(error_response(e), read_timeout)
            except StreamEnded:
                return
        stream.release()
        await requests.drain(read_timeout)  # until the client read the reply and closed

    return serve_call


async def read_all(requests: AsyncIterator[Request], decode: Callable, max_bytes: int,
                   timeout: float | None = None, check: Callable | None = None):
    """A stream of one message: its typed metadata (on the first part) and all tensors, joined.
    Refuses a stream whose tensors exceed ``max_bytes`` as soon as they do, one that takes over
    ``timeout`` seconds, and, before the rest is read, metadata that ``check`` refuses."""
    msg, parts, total_bytes = None, [], 0
    try:
        async with asyncio.timeout(timeout):
            async for request in requests:
                if msg is None:
                    msg = decode(request.metadata)
                    if check is not None:
                        check(msg)
                elif request.metadata:
                    raise InvalidRequestError("metadata on a later part of a one-message request")
                parts.extend(request.tensors)
                total_bytes += sum(len(p.buffer) for p in request.tensors)
                if total_bytes > max_bytes:
                    raise InvalidRequestError(f"request exceeds {max_bytes} bytes")
    except TimeoutError:
        raise InvalidRequestError(f"the request did not arrive within {timeout:.3g} s") from None
    if msg is None:
        raise InvalidRequestError("empty request")
    return msg, _joined(parts)


async def read_counted(requests: AsyncIterator, decode: Callable, max_bytes: int | None = None,
                       error: type[StamenError] = InvalidRequestError, timeout: float | None = None,
                       wait: float | None = None):
    """The next counted message of a stream: its typed metadata and the tensors of its ``parts``
    messages, joined; (None, []) when the stream ends before it. ``max_bytes`` bounds what is read,
    ``timeout`` the seconds it takes once its first message arrived; ``wait``: seconds for that
    first message (``CallRequests`` only). A malformed stream raises ``error`` (a server reading a
    request: ``InvalidRequestError``; a client reading a reply: ``RemoteCallError``)."""
    if wait is not None:
        first = await requests.next(wait)
        if first is None:
            return None, []
    else:
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            return None, []
    msg = decode(first.metadata)
    parts = list(first.tensors)
    total_bytes = sum(len(p.buffer) for p in first.tensors)
    try:
        async with asyncio.timeout(timeout):
            for _ in range(getattr(msg, "parts", 1) - 1):
                try:
                    message = await anext(requests)
                except StopAsyncIteration:
                    raise error(f"the stream ended before all {msg.parts} parts arrived") from None
                if message.metadata:
                    raise error("a new message started before all parts of the last arrived")
                parts.extend(message.tensors)
                total_bytes += sum(len(p.buffer) for p in message.tensors)
                if max_bytes is not None and total_bytes > max_bytes:
                    raise error(f"request exceeds {max_bytes} bytes")
    except TimeoutError:
        raise error(f"the message did not arrive within {timeout:.3g} s") from None
    return msg, _joined(parts, error)


def _joined(parts: list[runtime_pb2.Tensor], error: type[StamenError] = InvalidRequestError):
    """The tensors of ``parts``; parts that make no tensors (a malformed sender) raise ``error``."""
    try:
        return join_tensor_parts(parts)
    except Exception as e:
        raise error(f"tensor parts do not join: {e!r}") from None


async def read_reply(responses: AsyncIterator[Response], decode: Callable, peer, what: str):
    """The rest of a stream RPC's reply: its typed message (an ``ErrorReply`` raises its error) and
    its joined tensors. A counted reply that arrives in fewer messages than it announced is a
    network fault (``RemoteCallError``), as is a stream that ends without a reply."""
    reply, parts, received, expected = None, [], 0, None
    async for response in responses:
        received += 1
        if response.metadata:
            reply = decode(response.metadata)
            raise_if_error(reply)
            expected = getattr(reply, "parts", 1)
        parts.extend(response.tensors)
        if expected is not None and received >= expected:
            break  # all of it: the caller closes its half, which tells the server the reply arrived
    if reply is None:
        raise RemoteCallError(f"{what} call to {peer} ended without a reply")
    check_complete(peer, what, received, getattr(reply, "parts", received))
    return reply, join_tensor_parts(parts)
