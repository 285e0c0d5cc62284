"""The service declaration: every RPC a span server offers, how it travels, and what it carries.

Unary and stream RPCs use hivemind's protobuf handlers (``ExpertRequest``/``ExpertResponse``
with one typed message as JSON in ``metadata``); the two decoding-path RPCs use lean binary
streams with the same frames (``stamen/wire/stream.py``). Servers register handlers with
``register``; clients call through ``call_unary`` / ``call_stream`` / ``open_lean``, so the names
and transports live only here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from stamen.wire import messages as m
from stamen.wire.stream import FrameStream, open_stream, serve

Request = runtime_pb2.ExpertRequest
Response = runtime_pb2.ExpertResponse


class Transport(Enum):
    UNARY = "unary"
    """One request, one response (hivemind protobuf handler)."""
    STREAM_IN = "stream in"
    """A stream of requests, one response."""
    STREAMS = "streams"
    """Streams both ways."""
    LEAN = "lean"
    """A lean binary stream of frames both ways (``wire/stream.py``), read in the handling coroutine."""


@dataclass(frozen=True)
class Rpc:
    """One RPC: the handle name servers register, its transport, the typed messages in ``metadata``."""

    name: str
    transport: Transport
    requests: tuple[type, ...]
    replies: tuple[type, ...]

    @property
    def stream_input(self) -> bool:
        return self.transport in (Transport.STREAM_IN, Transport.STREAMS)

    @property
    def stream_output(self) -> bool:
        return self.transport is Transport.STREAMS


INFO = Rpc("SpanHandler.rpc_info", Transport.UNARY, (m.InfoRequest,), (m.InfoReply,))
"""The server's span, dtype, free cache and counters; also a ping."""
FORWARD = Rpc("SpanHandler.rpc_forward", Transport.STREAMS, (m.ForwardRequest,), (m.ForwardDone, m.ErrorReply))
"""A stateless forward through some of the span's blocks (tensors in parts both ways)."""
BACKWARD = Rpc("SpanHandler.rpc_backward", Transport.STREAMS, (m.BackwardRequest,), (m.BackwardDone, m.ErrorReply))
"""A stateless backward: the span's activations are recomputed."""
TRAIN = Rpc("SpanHandler.rpc_train", Transport.STREAMS, (m.TrainRequest, m.TrainBackward),
            (m.TrainForwardDone, m.BackwardDone, m.ErrorReply))
"""A forward whose graph the server keeps for the backward of the same call."""
PUT_ADAPTERS = Rpc("SpanHandler.rpc_put_adapters", Transport.STREAMS, (m.PutAdapters,),
                   (m.AdaptersStored, m.ErrorReply))
"""Upload LoRA adapters, named by content hash, into the server's cache (one reply message)."""
INFERENCE = Rpc("SpanHandler.inference", Transport.LEAN,
                (m.OpenSession, m.Step, m.FlushReplies, m.CloseSession),
                (m.Opened, m.StepDone, m.Closed, m.ErrorReply))
"""Client <-> server inference sessions with KV caches, one stream per client connection."""
PUSH = Rpc("SpanHandler.push", Transport.LEAN, (m.Step,), (m.ErrorReply,))
"""Server -> next server step outputs; only errors come back."""
BANDWIDTH = Rpc("SpanHandler.rpc_bandwidth", Transport.STREAM_IN, (), (m.BandwidthDone,))
"""Random bytes streamed to a server to measure the link (no metadata); the reply counts them."""

STAGE_STATE = Rpc("SpanHandler.rpc_stage_state", Transport.STREAMS, (m.StageStateRequest,),
                  (m.StageState, m.ErrorReply))
"""A training stage's parameters (and optimizer and averager state) at its current epoch, for a
peer that joins the stage or a trainer that exports the model (``stamen server --train`` only)."""

TRAINER_STATE = Rpc("TrainerHandler.rpc_trainer_state", Transport.STREAMS, (m.TrainerStateRequest,),
                    (m.StageState, m.ErrorReply))
"""The trainers' shared state (client parts, optimizer, averager), served by every trainer on its
averaging peer to a trainer that fell behind or joined late; not part of a span server's service."""

SPAN_SERVICE = (INFO, FORWARD, BACKWARD, TRAIN, PUT_ADAPTERS, INFERENCE, PUSH, BANDWIDTH, STAGE_STATE)
"""What every span server registers."""

Handler = Callable[..., Awaitable[Response] | AsyncIterator[Response]]


async def register(p2p: P2P, rpc: Rpc, handler: Handler | Callable[[FrameStream], Awaitable[None]]) -> None:
    """Serve ``rpc`` with ``handler``: ``(request or request iterator, context)`` for protobuf
    transports, ``(FrameStream)`` for lean streams."""
    if rpc.transport is Transport.LEAN:
        await serve(p2p, rpc.name, handler)
    else:
        await p2p.add_protobuf_handler(rpc.name, handler, Request, stream_input=rpc.stream_input,
                                       stream_output=rpc.stream_output)


async def unregister(p2p: P2P, rpc: Rpc) -> None:
    if rpc.transport is Transport.LEAN:
        await p2p.remove_binary_stream_handler(rpc.name)
    else:
        await p2p.remove_protobuf_handler(rpc.name, stream_input=rpc.stream_input, stream_output=rpc.stream_output)


async def call_unary(p2p: P2P, peer: PeerID, rpc: Rpc, request: Request | AsyncIterator[Request]) -> Response:
    """A unary or stream-in call; bound it with a timeout (hivemind's call has none)."""
    if rpc.stream_output or rpc.transport is Transport.LEAN:
        raise TypeError(f"{rpc.name} does not answer with a single response")
    if not rpc.stream_input:
        return await p2p.call_protobuf_handler(peer, rpc.name, request, Response)
    responses = await p2p.iterate_protobuf_handler(peer, rpc.name, request, Response)
    try:  # the one reply, then close: the server waits for that close before closing its half
        return await anext(responses)
    finally:
        await responses.aclose()


async def call_stream(p2p: P2P, peer: PeerID, rpc: Rpc, requests: AsyncIterator[Request]) -> AsyncIterator[Response]:
    """A streams-both-ways call: the responses as they arrive."""
    if rpc.transport is not Transport.STREAMS:
        raise TypeError(f"{rpc.name} does not stream its responses")
    return await p2p.iterate_protobuf_handler(peer, rpc.name, requests, Response)


async def open_lean(p2p: P2P, peer: PeerID, rpc: Rpc) -> FrameStream:
    if rpc.transport is not Transport.LEAN:
        raise TypeError(f"{rpc.name} is not a lean stream")
    return await open_stream(p2p, peer, rpc.name)
