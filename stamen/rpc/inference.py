"""The client half of inference sessions: one lean stream per server (``protocol.INFERENCE``),
steps matched to their replies by ``step_id``, and the bytes each stream carried."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import astuple, dataclass

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from stamen import trace
from stamen.errors import RemoteCallError, StamenError, request_error_from_code
from stamen.rpc import protocol
from stamen.rpc.inputs import SpanInputs
from stamen.rpc.protocol import Request, Response
from stamen.types import Compression, Span
from stamen.wire.messages import (
    AdapterRef,
    Burst,
    CloseSession,
    ErrorReply,
    FlushReplies,
    OpenSession,
    PushTarget,
    SpanRef,
    Step,
    StepDone,
    decode_inference_reply,
    encode,
)
from stamen.wire.stream import FrameStream, StreamEnded
from stamen.wire.tensors import FLOAT_DTYPES, decode_tensor, encode_tensor

logger = logging.getLogger(__name__)


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


_live_readers: set[asyncio.Task] = set()
"""Reader tasks of inference streams, held until their stream ends (also after the client closed it)."""
_CLOSE_GRACE_S = 30.0
"""Seconds a closed stream's reader waits for the server to end the stream before it is cancelled."""


class InferenceStream:
    """The client half of ``protocol.INFERENCE``: one open session on one server.

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
        self.last_burst: Burst | None = None
        """The burst of the last reply read (``Burst``): replies that left the server together."""
        """Total compute time the server reported for this session's steps."""
        self.received_compressed = False
        """Whether any output came through the lossy activation codec (audits allow for it)."""
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
                        pending.set_exception(request_error_from_code(reply.code, reply.message, reply.retry_after))
            return
        if isinstance(reply, ErrorReply):
            future.set_exception(request_error_from_code(reply.code, reply.message, reply.retry_after))
        else:
            future.set_result((reply, response))

    async def _await(self, future: asyncio.Future, timeout: float | None = None):
        timeout = self.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise RemoteCallError(f"{self.peer} did not answer within {timeout:.3g} s") from None

    async def control(self, request: Request):
        """Send a non-step request (open, close, or anything malformed) and await its reply."""
        if self._reader is None or self._reader.done():
            raise RemoteCallError(f"the stream to {self.peer} is not open")
        self._control = asyncio.get_running_loop().create_future()
        self._control.add_done_callback(_mark_retrieved)
        self._send(request)
        return await self._await(self._control)

    @classmethod
    async def open(cls, p2p: P2P, peer: PeerID, blocks: Span, session_id: str, *, max_length: int,
                   batch_size: int, timeout: float, prompts: torch.Tensor | None = None,
                   adapter: AdapterRef | None = None, compression: Compression | None = None,
                   connect_timeout: float | None = None) -> InferenceStream:
        """Open a session; deep ``prompts`` (n_blocks, P, H) and LoRA ``adapter`` apply to all its steps;
        ``compression``: how hidden states go and how outputs come back and are pushed on;
        ``connect_timeout``: seconds to get the stream (default ``timeout``; dialing a dead peer
        may take the daemon 20 s to give up)."""
        self = cls(peer, blocks, session_id, timeout, compression)
        try:
            self._stream = await asyncio.wait_for(protocol.open_lean(p2p, peer, protocol.INFERENCE),
                                                  timeout if connect_timeout is None else connect_timeout)
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

    def send_step(self, step_id: int, position: int, inputs: SpanInputs, push_to: list[PushTarget] | None = None,
                  hold_reply: bool = False, burst: Burst | None = None) -> None:
        """Send a step at ``position``; ``push_to``: the following hops, which this server's output is
        pushed on to; ``hold_reply``: servers of the push chain but the last may hold their replies."""
        self.expect(step_id)
        self._next_step_id = max(self._next_step_id, step_id + 1)
        msg = Step(session_id=self.session_id, step_id=step_id, position=position, push_to=push_to or [],
                   hold_reply=hold_reply and bool(push_to), burst=burst, **inputs.fields(Step))
        self._send(Request(metadata=encode(msg), tensors=inputs.pack(self.compression)))

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

    async def result(self, step_id: int, num_elements: int, timeout: float | None = None) -> torch.Tensor:
        """Await a step's output hidden states (``RemoteCallError`` after ``timeout`` seconds,
        default the stream's). A reply that comes after the caller gave up is dropped unread."""
        try:
            reply, response = await self._await(self.expect(step_id), timeout)
        finally:
            if self._pending.get(step_id) is not None and self._pending[step_id].done():
                del self._pending[step_id]
        if not isinstance(reply, StepDone) or len(response.tensors) != 1:
            raise RemoteCallError(f"unexpected reply from {self.peer}: {reply!r}")
        self.server_compute_ms += reply.compute_ms
        self.last_burst = reply.burst
        if response.tensors[0].compression != runtime_pb2.CompressionType.NONE:
            self.received_compressed = True
        return decode_tensor(response.tensors[0], "output", FLOAT_DTYPES, num_elements, compressed_ok=True)

    async def step(self, hidden: torch.Tensor, position: int, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One step on this server alone (no push), with the next step id."""
        step_id = self.new_step_id()
        self.send_step(step_id, position, SpanInputs(hidden, attention_mask, position_ids))
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
