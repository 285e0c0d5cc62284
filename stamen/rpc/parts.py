"""Multi-part messages of the stream RPCs: a typed message whose tensors travel in parts of at
most ``STREAM_PART_BYTES`` (hivemind caps one protobuf message at 4 MiB), the metadata on the
first part. Counted messages say in ``parts`` how many stream messages they take, so a stream
cut by the transport is never mistaken for a complete message."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable

import torch
from hivemind.proto import runtime_pb2

from stamen.errors import InvalidRequestError, RemoteCallError, StamenError
from stamen.rpc.protocol import Request, Response
from stamen.rpc.replies import check_complete, raise_if_error
from stamen.types import Compression
from stamen.wire.messages import encode
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


async def read_all(requests: AsyncIterator[Request], decode: Callable, max_bytes: int):
    """A stream of one message: its typed metadata (on the first part) and all tensors, joined.
    Refuses a stream whose tensors exceed ``max_bytes`` as soon as they do."""
    msg, parts, total_bytes = None, [], 0
    async for request in requests:
        if msg is None:
            msg = decode(request.metadata)
        parts.extend(request.tensors)
        total_bytes += sum(len(p.buffer) for p in request.tensors)
        if total_bytes > max_bytes:
            raise InvalidRequestError(f"request exceeds {max_bytes} bytes")
    if msg is None:
        raise InvalidRequestError("empty request")
    return msg, join_tensor_parts(parts)


async def read_counted(requests: AsyncIterator, decode: Callable, max_bytes: int | None = None,
                       error: type[StamenError] = InvalidRequestError):
    """The next counted message of a stream: its typed metadata and the tensors of its ``parts``
    messages, joined; (None, []) when the stream ends before it. ``max_bytes`` bounds what is read;
    a malformed stream raises ``error`` (a server reading a request: ``InvalidRequestError``; a
    client reading a reply: ``RemoteCallError``)."""
    try:
        first = await anext(requests)
    except StopAsyncIteration:
        return None, []
    msg = decode(first.metadata)
    parts = list(first.tensors)
    total_bytes = sum(len(p.buffer) for p in first.tensors)
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
    return msg, join_tensor_parts(parts)


async def read_reply(responses: AsyncIterator[Response], decode: Callable, peer, what: str):
    """The rest of a stream RPC's reply: its typed message (an ``ErrorReply`` raises its error) and
    its joined tensors. A counted reply that arrives in fewer messages than it announced is a
    network fault (``RemoteCallError``), as is a stream that ends without a reply."""
    reply, parts, received = None, [], 0
    async for response in responses:
        received += 1
        if response.metadata:
            reply = decode(response.metadata)
            raise_if_error(reply)
        parts.extend(response.tensors)
    if reply is None:
        raise RemoteCallError(f"{what} call to {peer} ended without a reply")
    check_complete(peer, what, received, getattr(reply, "parts", received))
    return reply, join_tensor_parts(parts)


async def wait_for_end(requests: AsyncIterator[Request], timeout: float = 10.0) -> None:
    """Wait (bounded) for the client to end its half of a stream before a handler returns and
    closes the server's. The client writes its end-of-stream marker right after its last message;
    if that write reaches a stream the server already closed, the client's libp2p daemon drops the
    whole connection and the client loses the replies it had not read yet (a BrokenPipeError)."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):
            async for _ in requests:
                pass
