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
being buffered: a peer cannot make the reader hold an arbitrary amount of memory. A server's streams
also share one ``ByteBudget``: a frame's bytes are taken from it before its body is read, and a
body must arrive within a deadline once its header did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from google.protobuf.message import DecodeError, Message
from hivemind.p2p import P2P, PeerID

from stamen.errors import InvalidRequestError, RemoteCallError, ServerFullError

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


class PeerFailedError(StreamEnded):
    """The other side failed the stream with an error frame (it gave up; nothing more comes)."""


_SKIP_CHUNK = 1 << 16


class ByteBudget:
    """Bytes of received messages that a server holds at once, over all its streams: a frame's
    bytes are taken before its body is read and given back when the server is done with it."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, n: int, held: int) -> None:
        """Take ``n`` more bytes for a stream that holds ``held``: ``InvalidRequestError`` if that
        stream's request could never fit, ``ServerFullError`` ("busy") if it does not fit now."""
        if held + n > self.limit:
            raise InvalidRequestError(f"a request of over {held + n} bytes exceeds the server's request buffer "
                                      f"of {self.limit} bytes")
        if self.used + n > self.limit:
            raise ServerFullError(f"server busy: {self.used} of {self.limit} request bytes are held; "
                                  f"a message of {n} bytes does not fit")
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n


class FrameStream:
    """One open libp2p stream that carries protobuf messages of one type each way.

    ``send`` is synchronous (the transport buffers; replies and pushes never wait for a slow reader
    on the path of the next step); ``recv`` returns None once the other side ended the stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: PeerID,
                 budget: ByteBudget | None = None):
        self.reader, self.writer, self.peer = reader, writer, peer
        self.budget = budget
        self.last_size = 0
        """Bytes of the last message received (its frame's body)."""
        """Where received bodies take their bytes from (servers); None: not counted (clients)."""
        self.held = 0
        """Bytes this stream holds in ``budget``, until ``release``."""
        self._ended = False

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
        stream RPCs end theirs); keeps reading possible. Once only."""
        if not self.writer.is_closing() and not self._ended:
            self._ended = True
            self._write(ERROR_MARKER, b"")

    def _write(self, marker: bytes, body: bytes) -> None:
        self.writer.write(b"".join((marker, len(body).to_bytes(LENGTH_BYTES, BYTEORDER), body)))

    async def write(self, message: Message, timeout: float | None = None) -> None:
        """Write one message and wait until the transport took it (``send`` with flow control, for
        replies of many parts). ``StreamEnded`` if the stream is closed or the other side does not
        read within ``timeout`` seconds (the stream is then closed)."""
        if self.writer.is_closing():
            raise StreamEnded(f"the stream to {self.peer} is closed")
        self._write(MESSAGE_MARKER, message.SerializeToString())
        try:
            async with asyncio.timeout(timeout):
                await self.writer.drain()
        except (ConnectionError, TimeoutError) as e:
            self.writer.close()
            raise StreamEnded(f"{self.peer} did not read the stream: {e!r}") from None

    def release(self) -> None:
        """Give back the bytes of the messages received so far (they are no longer held)."""
        if self.held:
            self.budget.give(self.held)
            self.held = 0

    def hand_over(self) -> int:
        """The bytes of the messages received so far, now held by whoever processes them (who
        gives them back to the budget when done) instead of this stream."""
        held, self.held = self.held, 0
        return held

    def close(self) -> None:
        self.release()
        self.writer.close()

    async def recv(self, kind: type[M], *, idle: float | None = None, timeout: float | None = None,
                   max_bytes: int = MAX_FRAME_BYTES) -> M | None:
        """The next message, or None at the end of the stream (an end frame or a closed connection).
        Raises ``PeerFailedError`` for an error frame, ``InvalidFrameError`` for a malformed one
        (longer than ``max_bytes``, an unknown marker, undecodable) or one whose body does not
        arrive within ``timeout`` seconds of its header (the framing is lost either way), and
        ``TimeoutError`` when no frame begins within ``idle`` seconds (the stream stays usable).
        With a ``budget``, the body's bytes are taken from it before they are read and held until
        ``release``; a body it cannot hold is read and dropped and its refusal raised (the stream
        stays usable)."""
        length, begun = 0, False
        try:
            async with asyncio.timeout(idle) as deadline:  # a cancelled readexactly consumes nothing
                head = await self.reader.readexactly(1 + LENGTH_BYTES)
                begun = True  # from here on the frame must arrive within ``timeout``
                marker, length = head[:1], int.from_bytes(head[1:], BYTEORDER)
                if marker not in (MESSAGE_MARKER, ERROR_MARKER):
                    raise InvalidFrameError(f"a frame from {self.peer} has an unknown marker {marker!r}")
                if length > max_bytes:
                    raise InvalidFrameError(f"a frame of {length} bytes from {self.peer} exceeds {max_bytes}")
                deadline.reschedule(None if timeout is None else asyncio.get_running_loop().time() + timeout)
                if self.budget is not None and length:
                    try:
                        self.budget.take(length, self.held)
                    except (InvalidRequestError, ServerFullError):
                        await self._skip(length)
                        raise
                    self.held += length
                body = await self.reader.readexactly(length) if length else b""
                self.last_size = length
        except TimeoutError:
            if not begun:
                raise  # no frame began: the stream is intact
            raise InvalidFrameError(f"a frame of {length} bytes from {self.peer} did not arrive within "
                                    f"{timeout} s") from None
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        if marker == ERROR_MARKER:
            if not body:
                return None
            raise PeerFailedError(f"{self.peer} failed the stream: {body[:1000].decode(errors='replace')}")
        try:
            return kind.FromString(body)
        except DecodeError as e:
            raise InvalidFrameError(f"an undecodable {kind.__name__} from {self.peer}: {e}") from None

    async def _skip(self, length: int) -> None:
        """Read ``length`` bytes and drop them (the body of a refused frame), a chunk at a time."""
        while length > 0:
            chunk = await self.reader.read(min(length, _SKIP_CHUNK))
            if not chunk:
                return
            length -= len(chunk)

    async def drop(self, timeout: float, max_bytes: int = MAX_FRAME_BYTES, until_closed: bool = False) -> None:
        """Read and drop what the other side still sends until it ends its half (an end frame, or
        it closes), for at most ``timeout`` seconds; past a frame that cannot be read (the framing
        is lost), raw bytes until it closes. Nothing is kept or taken from the budget. Why: a stream
        closed with bytes unread resets the peer's whole libp2p connection, and the peer loses what
        it had not read yet on every stream of it (the reply that ended this call included).
        ``until_closed``: past the end frame too, until the other side closes the stream."""
        with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            async with asyncio.timeout(timeout):
                while True:
                    head = await self.reader.readexactly(1 + LENGTH_BYTES)
                    length = int.from_bytes(head[1:], BYTEORDER)
                    if head[:1] not in (MESSAGE_MARKER, ERROR_MARKER) or length > max_bytes:
                        while await self.reader.read(_SKIP_CHUNK):
                            pass
                        return
                    if head[:1] == ERROR_MARKER and not length:
                        if until_closed:
                            while await self.reader.read(_SKIP_CHUNK):
                                pass
                        return
                    await self._skip(length)


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
