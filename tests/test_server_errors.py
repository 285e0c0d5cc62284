"""Bad input gets a typed error and the server keeps serving (real server processes)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import torch
from hivemind.proto import runtime_pb2

from stamen.client import loop
from stamen.client.config import ClientConfig
from stamen.client.swarm import Swarm
from stamen.errors import (
    InvalidRequestError,
    RemoteCallError,
    RequestError,
    ServerFullError,
    SessionClosedError,
    SessionLengthError,
    UnknownSessionError,
    WrongBlocksError,
)
from stamen.rpc import protocol
from stamen.rpc.calls import call_forward
from stamen.rpc.inference import InferenceStream
from stamen.rpc.inputs import SpanInputs
from stamen.types import ModelName, Span
from stamen.wire.messages import CloseSession, Step, decode_inference_reply, encode
from stamen.wire.stream import BYTEORDER, LENGTH_BYTES, MAX_FRAME_BYTES, MESSAGE_MARKER
from stamen.wire.tensors import encode_tensor

pytestmark = pytest.mark.swarm

HIDDEN = 64


@pytest.fixture(scope="module")
def qwen(swarm):
    """The qwen2 model's swarm: server [0:3) has a 4 s session timeout and a 1024-token cache budget."""
    s = Swarm(ModelName("qwen2-bias"), 4, ClientConfig(initial_peers=swarm.initial_peers, request_timeout=20))
    s.wait_until_ready()
    peer = next(x.peer_id for x in s.servers(refresh=True) if x.span == Span(0, 3))
    yield s, s.peer(peer)
    s.shutdown()


def _open(s: Swarm, peer, blocks=Span(0, 3), max_length=16, batch_size=1) -> InferenceStream:
    return loop.run(InferenceStream.open(s.p2p, peer, blocks, uuid.uuid4().hex, max_length=max_length,
                                         batch_size=batch_size, timeout=20))


def _step(stream: InferenceStream, hidden, position=0, session_id=None):
    if session_id is not None:
        stream.session_id = session_id
    return loop.run(stream.step(hidden, position))


def _good_step_works(s: Swarm, peer) -> None:
    stream = _open(s, peer)
    out = _step(stream, torch.randn(1, 3, HIDDEN))
    assert out.shape == (1, 3, HIDDEN) and torch.isfinite(out).all()
    loop.run(stream.close())


def _raw(stream: InferenceStream, metadata: bytes, tensors=()):
    """Send a hand-made request; returns the reply, or the code of the typed error it raised."""
    try:
        reply, _ = loop.run(stream.control(runtime_pb2.ExpertRequest(metadata=metadata, tensors=list(tensors))))
    except RequestError as e:
        return e.code
    return reply


BAD_STEPS = {
    "wrong hidden size": (lambda: torch.randn(1, 2, HIDDEN + 1), InvalidRequestError),
    "integer dtype": (lambda: torch.ones(1, 2, HIDDEN, dtype=torch.int64), InvalidRequestError),
    "wrong rank": (lambda: torch.randn(2, HIDDEN), InvalidRequestError),
    "wrong batch": (lambda: torch.randn(2, 1, HIDDEN), InvalidRequestError),
    "nan": (lambda: torch.full((1, 1, HIDDEN), float("nan")), InvalidRequestError),
    "past max length": (lambda: torch.randn(1, 17, HIDDEN), SessionLengthError),
}


@pytest.mark.parametrize("case", list(BAD_STEPS))
def test_bad_step_gets_typed_error_and_server_keeps_serving(qwen, case):
    s, peer = qwen
    make, error = BAD_STEPS[case]
    stream = _open(s, peer)
    with pytest.raises(error):
        _step(stream, make())
    # the same session still works after the error, and so does a new one
    assert _step(stream, torch.randn(1, 2, HIDDEN)).shape == (1, 2, HIDDEN)
    loop.run(stream.close())
    _good_step_works(s, peer)


def test_oversized_request_is_refused(qwen):
    s, peer = qwen
    with pytest.raises(InvalidRequestError, match="exceed"):  # past the default --max-step-tokens 8192
        loop.run(call_forward(s.p2p, peer, Span(0, 3), SpanInputs(torch.randn(1, 8193, HIDDEN)), timeout=20))
    _good_step_works(s, peer)


def test_corrupt_tensor_and_malformed_metadata(qwen):
    s, peer = qwen
    stream = _open(s, peer)
    assert _raw(stream, b"{not json") == "invalid_request"
    assert _raw(stream, b'{"kind": "step"}') == "invalid_request"
    bad = encode_tensor(torch.randn(1, 2, HIDDEN))
    bad.buffer = bad.buffer[:-4]
    step = Step(session_id=stream.session_id, step_id=0, position=0)
    assert _raw(stream, encode(step), [bad]) == "invalid_request"
    assert _raw(stream, encode(step), []) == "invalid_request"
    loop.run(stream.close())
    _good_step_works(s, peer)


def test_unknown_and_closed_sessions(qwen):
    s, peer = qwen
    stream = _open(s, peer)
    real_id = stream.session_id
    with pytest.raises(UnknownSessionError):
        _step(stream, torch.randn(1, 1, HIDDEN), session_id="no-such-session")
    stream.session_id = real_id
    reply = _raw(stream, encode(CloseSession(session_id=real_id)))
    assert reply.kind == "closed"
    with pytest.raises(SessionClosedError):
        _step(stream, torch.randn(1, 1, HIDDEN))
    stream.closed = True
    stream._stream.end()  # end the stream without another close message
    _good_step_works(s, peer)


BAD_FRAMES = {
    "length past the limit": lambda: MESSAGE_MARKER + (MAX_FRAME_BYTES + 1).to_bytes(LENGTH_BYTES, BYTEORDER),
    "unknown marker": lambda: b"\x07" + (3).to_bytes(LENGTH_BYTES, BYTEORDER) + b"abc",
    "undecodable body": lambda: MESSAGE_MARKER + (4).to_bytes(LENGTH_BYTES, BYTEORDER) + b"\xff\xff\xff\xff",
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_malformed_frame_gets_a_typed_error_and_ends_only_its_stream(qwen, case):
    """A raw frame that breaks the lean stream's framing: the server answers invalid_request and
    ends that stream (its framing is lost), without reading the claimed bytes; other sessions go on."""
    s, peer = qwen
    other = _open(s, peer)
    _step(other, torch.randn(1, 1, HIDDEN))

    async def send_raw() -> list:
        stream = await protocol.open_lean(s.p2p, peer, protocol.INFERENCE)
        stream.writer.write(BAD_FRAMES[case]())
        replies = []
        while (reply := await asyncio.wait_for(stream.recv(runtime_pb2.ExpertResponse), 20)) is not None:
            replies.append(decode_inference_reply(reply.metadata))
        stream.close()
        return replies

    replies = loop.run(send_raw())
    assert [(r.kind, r.code) for r in replies] == [("error", "invalid_request")]
    assert _step(other, torch.randn(1, 1, HIDDEN), position=1).shape == (1, 1, HIDDEN)
    loop.run(other.close())
    _good_step_works(s, peer)


def test_step_ahead_of_the_cache_is_refused(qwen):
    s, peer = qwen
    stream = _open(s, peer)
    _step(stream, torch.randn(1, 2, HIDDEN))
    with pytest.raises(SessionLengthError):
        _step(stream, torch.randn(1, 1, HIDDEN), position=5)
    assert _step(stream, torch.randn(1, 1, HIDDEN), position=2).shape == (1, 1, HIDDEN)
    loop.run(stream.close())


def test_blocks_the_server_does_not_host(qwen):
    s, peer = qwen
    with pytest.raises(WrongBlocksError):
        _open(s, peer, blocks=Span(2, 4))
    with pytest.raises(WrongBlocksError):
        loop.run(call_forward(s.p2p, peer, Span(3, 4), SpanInputs(torch.randn(1, 2, HIDDEN)), timeout=20))
    _good_step_works(s, peer)


def test_server_full_is_refused_at_open(qwen):
    s, peer = qwen
    with pytest.raises(ServerFullError, match="server full"):
        _open(s, peer, max_length=2048)
    held = _open(s, peer, max_length=1000)  # takes most of the 1024-token budget
    with pytest.raises(ServerFullError):
        _open(s, peer, max_length=100)
    loop.run(held.close())
    _good_step_works(s, peer)  # the budget came back


def test_idle_session_is_freed(qwen):
    s, peer = qwen
    stream = _open(s, peer, max_length=1000)
    time.sleep(5.5)  # the server's session timeout is 4 s: waiting past it is the behaviour under test
    with pytest.raises((SessionClosedError, RemoteCallError)):  # the server replied and ended the stream
        _step(stream, torch.randn(1, 1, HIDDEN))
    held = _open(s, peer, max_length=1000)  # the idle session's cache was returned
    loop.run(held.close())


def test_forward_rejects_bad_input(qwen):
    s, peer = qwen
    with pytest.raises(InvalidRequestError):
        loop.run(call_forward(s.p2p, peer, Span(0, 3), SpanInputs(torch.randn(1, 2, HIDDEN + 3)), timeout=20))
    with pytest.raises(InvalidRequestError):
        mask = torch.ones(1, 5, dtype=torch.int64)
        inputs = SpanInputs(torch.randn(1, 2, HIDDEN), attention_mask=mask)
        loop.run(call_forward(s.p2p, peer, Span(0, 3), inputs, timeout=20))
    out = loop.run(call_forward(s.p2p, peer, Span(0, 3), SpanInputs(torch.randn(2, 5, HIDDEN)), timeout=20))
    assert out.shape == (2, 5, HIDDEN)


def test_a_cut_stream_reply_is_a_retryable_network_fault():
    from hivemind.p2p import PeerID

    from stamen.client.retry import is_retryable
    from stamen.errors import RemoteCallError
    from stamen.rpc.replies import check_complete

    peer = PeerID(b"x" * 34)
    check_complete(peer, "forward", 3, 3)
    with pytest.raises(RemoteCallError, match="after 5 of 8 messages") as info:
        check_complete(peer, "forward", 5, 8)
    assert is_retryable(info.value)
