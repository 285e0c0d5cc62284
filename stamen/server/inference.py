"""The inference-stream engine: sessions served over lean streams (``protocol.INFERENCE``), steps
run once each (a pushed step and the client's copy may both arrive), outputs pushed on to the next
server (``protocol.PUSH``) over one long-lived stream per next server, and the replies of chained
decoding steps held until the client asks (``Step.hold_reply``, ``FlushReplies``)."""

from __future__ import annotations

import asyncio
import logging
import time

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from stamen import trace
from stamen.errors import InvalidRequestError, ServerFullError, SessionClosedError, UnknownSessionError
from stamen.rpc import protocol
from stamen.rpc.inputs import SpanInputs, decode_received
from stamen.rpc.protocol import Request, Response
from stamen.rpc.replies import error_response, raise_if_error
from stamen.server.backend import INLINE_STEP_TOKENS, Session, SpanBackend
from stamen.server.limits import Limits, PeerSlots
from stamen.server.metrics import ServerMetrics
from stamen.types import Compression
from stamen.wire.messages import (
    HELD_REPLIES_MAX,
    Closed,
    CloseSession,
    FlushReplies,
    Opened,
    OpenSession,
    Step,
    StepDone,
    decode_inference_request,
    decode_push_reply,
    decode_step,
    encode,
)
from stamen.wire.stream import ByteBudget, FrameStream, InvalidFrameError, StreamEnded
from stamen.wire.tensors import FLOAT_DTYPES, encode_tensor

logger = logging.getLogger(__name__)

_MAX_WAITING_PUSHES = 64
_REPLY_DELAY_S = 0.002
"""How long a server that pushed its output waits before sending the client its copy: long enough
for the push to reach the next server and its compute to start, so that the copy (the client's
daemon and process waking up, decoding it) does not compete with the push for the machine's cores.
The client needs the copy only to recover from a later failure. At most ``_REPLY_DELAY_SHARE`` of
the step's own compute time: the client takes the copies in route order, so a copy held longer
than the rest of the route takes would delay the token (measured: docs/benchmarks.md, copy delay)."""
_REPLY_DELAY_SHARE = 0.25
PUSHED_IN_FLIGHT = 64
"""Pushed steps of one push stream computing (or queued for the batcher) at once: the pushes of
different sessions from one previous server run concurrently, so they can share an iteration."""
PUSH_STEP_WINDOW = 1024
"""How far past a session's last step a pushed step id may be. A push comes from the previous hop
of the owner's route, with the step id the owner gave that hop, so it is the next step or a few
later (steps that failed there); one far ahead would make every later step of the owner look done."""


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


class InferenceEngine:
    """Serves inference sessions and pushes for one ``SpanBackend``."""

    def __init__(self, backend: SpanBackend, peer_id: str, session_timeout: float, request_timeout: float,
                 compression: Compression = "none", limits: Limits | None = None, budget: ByteBudget | None = None,
                 metrics: ServerMetrics | None = None):
        self.backend, self.peer_id = backend, peer_id
        self.metrics = metrics or ServerMetrics(peer_id)
        self.limits = limits or Limits.default()
        self.budget = budget or ByteBudget(self.limits.max_request_bytes)
        """Request bytes held at once, shared with the handler's stream calls."""
        self._streams = PeerSlots(self.limits.max_peer_streams, "inference and push streams")
        self.session_timeout, self.request_timeout = session_timeout, request_timeout
        self.compression: Compression = compression
        """Default for step outputs and pushes (a session's own ``compression`` overrides it)."""
        self.p2p: P2P | None = None
        """Set when the handlers are registered: pushes go out through the same daemon."""
        self._pushes: set[asyncio.Task] = set()
        self._push_links: dict[str, _PushLink] = {}
        self.pushed_steps = 0
        self.push_messages = 0
        self.push_bytes = 0

    async def serve_inference(self, stream: FrameStream) -> None:
        """Client messages are handled in order; replies (also those of steps that another server
        pushed into this stream's sessions) are written to the stream as soon as they exist. The
        sessions opened here belong to the stream's peer; they close when the stream ends."""
        replies = _StreamReplies(stream)
        opened: dict[str, Session] = {}
        owner = str(stream.peer)
        stream.budget = self.budget
        try:
            with self._streams.hold(owner):
                while True:
                    step_id = None
                    try:
                        try:
                            request = await stream.recv(Request, idle=self.session_timeout,
                                                        timeout=self.limits.read_timeout)
                        except TimeoutError:
                            logger.info("closing idle sessions %s of %s", sorted(opened), stream.peer)
                            replies.put_nowait(error_response(SessionClosedError(
                                f"idle for {self.session_timeout:.0f} s: session closed")))
                            return
                        if request is None:
                            return
                        self.metrics.bytes_in.inc(stream.last_size)  # the frame's length: no re-serializing
                        msg = decode_inference_request(request.metadata)
                        step_id = msg.step_id if isinstance(msg, Step) else None
                        trace.mark("s.recv", -1 if step_id is None else step_id)
                        reply = await self._inference_message(msg, request, replies, opened, owner)
                    except InvalidFrameError as e:  # the framing is lost: answer and end the stream
                        replies.put_nowait(error_response(e))
                        stream.end()
                        await stream.drop(self.limits.drain_s)
                        return
                    except StreamEnded as e:  # the client failed its stream (an error frame): nothing to answer
                        logger.info("%s", e)
                        return
                    except Exception as e:  # a typed error (or a bug): reply and keep serving
                        reply = error_response(e, step_id)
                    finally:
                        stream.release()
                    if reply is not None:
                        replies.put_nowait(reply)
        except ServerFullError as e:  # the peer holds all its streams
            replies.put_nowait(error_response(e))
            stream.end()
            await stream.drop(self.limits.drain_s)
        finally:
            stream.end()
            for session_id, session in opened.items():
                self.backend.close(session_id, only=session)

    def _owned(self, session_id: str, peer: str) -> Session:
        """The session, if ``peer`` opened it: to any other peer it is unknown."""
        session = self.backend.get(session_id)
        if session.owner is not None and session.owner != peer:
            raise UnknownSessionError(f"unknown session {session_id}")
        return session

    async def _inference_message(self, msg, request: Request, replies: _StreamReplies,
                                 opened: dict[str, Session], owner: str) -> Response | None:
        if isinstance(msg, OpenSession):
            prompts = self._open_prompts(msg, list(request.tensors))
            session = self.backend.open(msg, replies, prompts, owner=owner)
            session.compression = msg.compression or self.compression
            opened[msg.session_id] = session
            return Response(metadata=encode(Opened(session_id=msg.session_id)))
        if isinstance(msg, CloseSession):
            # a step that holds the session (pushed, or from another stream) ends with session_closed
            self.backend.close(msg.session_id, only=self._owned(msg.session_id, owner))
            trace.flush()  # a traced benchmark reads the servers' marks after its session
            opened.pop(msg.session_id, None)
            return Response(metadata=encode(Closed(session_id=msg.session_id)))
        if isinstance(msg, FlushReplies):
            _send_held(self._owned(msg.session_id, owner))
            return None
        await self._step(msg, list(request.tensors), owner=owner)
        return None  # the step's reply went to the session's queue

    async def _step(self, msg: Step, tensors: list[runtime_pb2.Tensor], pushed: bool = False,
                    owner: str | None = None, sender: str | None = None) -> None:
        """Run a step unless it is a duplicate, push the output on, and queue the reply to the client.
        A step from a client stream must come from the session's owner (``owner``); a pushed one
        (from a server the owner named in ``push_to``, who knows the session's random id) at most
        ``PUSH_STEP_WINDOW`` steps past the session's last."""
        session = self._owned(msg.session_id, owner) if not pushed else self.backend.get(msg.session_id)
        async with self.backend.stepping(session):
            if pushed and msg.step_id > session.last_step_id + PUSH_STEP_WINDOW:
                raise InvalidRequestError(f"pushed step {msg.step_id} is over {PUSH_STEP_WINDOW} steps past the "
                                          f"last step {session.last_step_id} of session {msg.session_id}")
            if msg.step_id <= session.last_step_id:
                # already computed from the other copy (pushed or sent by the client); a client that
                # sends its copy did not get the reply in time: the held ones go out now
                _send_held(session)
                return
            inputs = SpanInputs.unpack(msg, tensors, self.backend.tensor_limits())
            start = time.perf_counter()
            out = await self.backend.step(session, msg, inputs, sender=sender or owner or "")
            session.last_step_id = msg.step_id
            self.pushed_steps += pushed
        compute_ms = round(1000 * (time.perf_counter() - start), 3)
        tokens = inputs.hidden.shape[0] * inputs.hidden.shape[1]
        self.metrics.served("decode" if tokens <= INLINE_STEP_TOKENS else "prefill", tokens, compute_ms / 1000)
        encoded = encode_tensor(out, session.compression)  # one encoding for the reply and the push
        push_burst, reply_burst = session.out_bursts
        session.out_bursts = (None, None)
        if msg.push_to:
            pushed = msg.model_copy(update=dict(session_id=msg.push_to[0].session_id, push_to=msg.push_to[1:],
                                                burst=push_burst))
            self._push(msg.push_to[0].peer_id, pushed, [encoded, *tensors[1:]])
        reply = StepDone(session_id=msg.session_id, step_id=msg.step_id, position=session.cache.length,
                         compute_ms=compute_ms, burst=reply_burst)
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
        size = request.ByteSize()
        self.push_bytes += size
        self.metrics.pushes.inc()
        self.metrics.push_bytes.inc(size)
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
                protocol.open_lean(self.p2p, PeerID.from_base58(peer_id), protocol.PUSH), self.request_timeout)
            link.opened(stream)
            while (response := await stream.recv(Response)) is not None:
                raise_if_error(decode_push_reply(response.metadata))
        except Exception as e:
            logger.info("push stream to %s ended: %r", peer_id, e)
        finally:
            link.close()
            if self._push_links.get(peer_id) is link:
                del self._push_links[peer_id]

    async def serve_push(self, stream: FrameStream) -> None:
        """Steps pushed by a previous server; only errors are answered (they are logged there)."""
        stream.budget = self.budget
        running: set[asyncio.Task] = set()
        try:
            with self._streams.hold(stream.peer):
                while True:
                    try:
                        try:  # an idle link ends; the previous server opens another for its next push
                            request = await stream.recv(Request, idle=self.session_timeout,
                                                        timeout=self.limits.read_timeout)
                        except TimeoutError:
                            return
                        if request is None:
                            return
                        msg = decode_step(request.metadata)
                        trace.mark("s.recv_push", msg.step_id)
                    except (InvalidFrameError, StreamEnded):
                        raise
                    except Exception as e:
                        _send_quietly(stream, error_response(e))
                        stream.release()
                        continue
                    # pushes of different sessions run at once (and batch); one session's steps
                    # still run in order (its lock); the task holds the message's bytes until done
                    task = asyncio.create_task(self._pushed_step(stream, msg, list(request.tensors),
                                                                 stream.hand_over()))
                    running.add(task)
                    task.add_done_callback(running.discard)
                    if len(running) >= PUSHED_IN_FLIGHT:
                        await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        except (InvalidFrameError, ServerFullError) as e:  # the framing is lost; the peer holds all its streams
            _send_quietly(stream, error_response(e))
            stream.end()
            await stream.drop(self.limits.drain_s)
        except StreamEnded as e:  # the pushing server failed its stream
            logger.info("%s", e)
        finally:
            if running:  # their errors go back on this stream: end it after them (bounded)
                await asyncio.wait(running, timeout=self.limits.read_timeout)
            stream.end()

    async def _pushed_step(self, stream: FrameStream, msg: Step, tensors: list[runtime_pb2.Tensor],
                           held: int) -> None:
        """One pushed step; errors go back on the push stream (logged by the pushing server)."""
        try:
            await self._step(msg, tensors, pushed=True, sender=str(stream.peer))
        except (UnknownSessionError, SessionClosedError):
            pass  # the client closed or moved its session: nothing to do
        except Exception as e:
            _send_quietly(stream, error_response(e))
        finally:
            if held:
                self.budget.give(held)

    def _open_prompts(self, msg: OpenSession, protos: list[runtime_pb2.Tensor]):
        """A session's deep prompts (n_blocks, P, H), if it sends them."""
        if len(protos) != msg.has_prompts:
            raise InvalidRequestError(f"expected {int(msg.has_prompts)} tensors, got {len(protos)}")
        if not msg.has_prompts:
            return None
        b = self.backend
        return decode_received(protos[0], "prompts", FLOAT_DTYPES,
                               min(msg.max_length, b.max_step_tokens) * b.hidden_size * b.span.length)

