"""Lean message streams for the decoding hot path, over hivemind's libp2p streams.

The inference sessions (client <-> server) and the pushes (server -> next server) carry one small
message per token per hop, so what each message costs in Python shows in every token. hivemind's
protobuf stream RPCs spend, per received message, a new task plus an ``asyncio.wait`` on it, a
queue and two async generators, and per sent message a queue, a generator and three socket writes
(marker, length, body), each of which can wake the daemon. Here the same frames (hivemind's own
format: a marker byte, an 8-byte big-endian length, the protobuf) go through one ``write`` and are
read in the coroutine that handles them. The transport stays hivemind's: ``P2P.call_binary_stream_handler``
and ``P2P.add_binary_stream_handler``, i.e. a libp2p stream through the p2pd daemon.

A message's round trip over one open stream is therefore shorter with these frames than with
hivemind's protobuf stream handler (docs/benchmarks.md).

A received frame longer than ``MAX_FRAME_BYTES`` fails the stream with a typed error instead of
being buffered: a peer cannot make the reader hold an arbitrary amount of memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from google.protobuf.message import DecodeError, Message
from hivemind.p2p import P2P, PeerID

from stamen.errors import InvalidRequestError, RemoteCallError

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

MESSAGE_MARKER, ERROR_MARKER = P2P.MESSAGE_MARKER, P2P.ERROR_MARKER
LENGTH_BYTES, BYTEORDER = P2P.HEADER_LEN, P2P.BYTEORDER
MAX_FRAME_BYTES = 256 << 20
"""Largest frame accepted (the largest legitimate ones, prefill chunks and deep prompts, are a few MiB)."""
MAX_UNREAD_BYTES = 64 << 20
"""A stream whose peer leaves more than this unread is closed on the next send: a peer that stops
reading cannot make the sender buffer without bound (sends never wait, see ``FrameStream``)."""


class InvalidFrameError(InvalidRequestError):
    """A frame that cannot be read (too long, unknown marker, undecodable): the stream's framing is lost."""


class StreamEnded(RemoteCallError):
    """The other side closed the stream, or its process or connection is gone."""


class FrameStream:
    """One open libp2p stream that carries protobuf messages of one type each way.

    ``send`` is synchronous (the transport buffers; replies and pushes never wait for a slow reader
    on the path of the next step); ``recv`` returns None once the other side ended the stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: PeerID):
        self.reader, self.writer, self.peer = reader, writer, peer

    @property
    def closing(self) -> bool:
        return self.writer.is_closing()

    def send(self, message: Message) -> None:
        """Write one message. Raises ``StreamEnded`` if the stream is closed (or is closed now
        because the other side left over ``MAX_UNREAD_BYTES`` unread)."""
        if self.writer.is_closing():
            raise StreamEnded(f"the stream to {self.peer} is closed")
        if self.writer.transport.get_write_buffer_size() > MAX_UNREAD_BYTES:
            self.writer.close()
            raise StreamEnded(f"{self.peer} left over {MAX_UNREAD_BYTES >> 20} MiB unread: stream closed")
        self._write(MESSAGE_MARKER, message.SerializeToString())

    def send_error(self, text: str) -> None:
        """Fail the stream for the other side with a message (what hivemind's handlers send on a crash)."""
        if not self.writer.is_closing():
            self._write(ERROR_MARKER, text.encode())

    def end(self) -> None:
        """Tell the other side that nothing more will be sent (an empty error frame, as hivemind's
        stream RPCs end theirs); keeps reading possible."""
        if not self.writer.is_closing():
            self._write(ERROR_MARKER, b"")

    def _write(self, marker: bytes, body: bytes) -> None:
        self.writer.write(b"".join((marker, len(body).to_bytes(LENGTH_BYTES, BYTEORDER), body)))

    def close(self) -> None:
        self.writer.close()

    async def recv(self, kind: type[M]) -> M | None:
        """The next message, or None at the end of the stream (an end frame or a closed connection).
        Raises ``RemoteCallError`` for an error frame, ``InvalidFrameError`` for a malformed one."""
        try:
            head = await self.reader.readexactly(1 + LENGTH_BYTES)
            length = int.from_bytes(head[1:], BYTEORDER)
            if length > MAX_FRAME_BYTES:
                raise InvalidFrameError(f"a frame of {length} bytes from {self.peer} exceeds {MAX_FRAME_BYTES}")
            body = await self.reader.readexactly(length) if length else b""
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        marker = head[:1]
        if marker == ERROR_MARKER:
            if not body:
                return None
            raise RemoteCallError(f"{self.peer} failed the stream: {body.decode(errors='replace')}")
        if marker != MESSAGE_MARKER:
            raise InvalidFrameError(f"a frame from {self.peer} has an unknown marker {marker!r}")
        try:
            return kind.FromString(body)
        except DecodeError as e:
            raise InvalidFrameError(f"an undecodable {kind.__name__} from {self.peer}: {e}") from None


async def open_stream(p2p: P2P, peer: PeerID, protocol: str) -> FrameStream:
    """Open a stream to ``peer``'s ``protocol`` handler (registered with ``serve``)."""
    _, reader, writer = await p2p.call_binary_stream_handler(peer, protocol)
    return FrameStream(reader, writer, peer)


async def serve(p2p: P2P, protocol: str, handler: Callable[[FrameStream], Awaitable[None]]) -> None:
    """Register ``handler`` for the streams that peers open to ``protocol``; the stream is closed
    when the handler returns. A handler that raises fails the stream with the error's text."""

    async def on_stream(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = FrameStream(reader, writer, info.peer_id)
        try:
            await handler(stream)
        except Exception as e:
            logger.warning("%s handler failed for %s: %r", protocol, info.peer_id, e, exc_info=True)
            stream.send_error(repr(e))
        finally:
            stream.close()

    await p2p.add_binary_stream_handler(protocol, on_stream)
