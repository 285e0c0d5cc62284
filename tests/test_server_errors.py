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
from stamen.rpc.calls import _call, call_forward
from stamen.rpc.inference import InferenceStream
from stamen.rpc.inputs import SpanInputs
from stamen.types import ModelName, Span
from stamen.wire.messages import (
    CloseSession,
    Step,
    decode_forward_reply,
    decode_inference_reply,
    decode_push_reply,
    encode,
)
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


# --- issue 20: sessions belong to their owner, every refusal is a typed reply ---


def test_beam_search_over_a_left_padded_batch_matches_transformers(swarm, model_dirs):
    """The padding mask kept in the cache is reordered by every beam-search step (``hypo_ids``)."""
    from transformers import AutoModelForCausalLM

    from stamen import AutoDistributedModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dirs["qwen2-bias"]).eval()
    model = AutoDistributedModelForCausalLM.from_pretrained(model_dirs["qwen2-bias"], initial_peers=swarm.initial_peers,
                                                            request_timeout=30)
    try:
        ids = torch.randint(3, ref.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(11))
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        ids[1, :3] = 0
        settings = dict(max_new_tokens=4, num_beams=2, do_sample=False, eos_token_id=None, pad_token_id=0,
                        length_penalty=1.0, early_stopping=False)
        expected = ref.generate(ids, attention_mask=mask, **settings)
        got = model.generate(ids, attention_mask=mask, **settings)
        assert torch.equal(got, expected)
    finally:
        model.shutdown()


def test_a_session_belongs_to_the_peer_that_opened_it(qwen, swarm):
    """Another peer can neither close nor step a session it did not open (it is unknown to it)."""
    s, peer = qwen
    stream = _open(s, peer)
    other = Swarm(ModelName("qwen2-bias"), 4, ClientConfig(initial_peers=swarm.initial_peers, request_timeout=20))
    try:
        stranger = _open(other, peer)
        assert _raw(stranger, encode(CloseSession(session_id=stream.session_id))) == "unknown_session"
        with pytest.raises(UnknownSessionError):
            _step(stranger, torch.randn(1, 1, HIDDEN), session_id=stream.session_id)
        loop.run(stranger.close())
    finally:
        other.shutdown()
    assert _step(stream, torch.randn(1, 2, HIDDEN)).shape == (1, 2, HIDDEN)  # still open
    loop.run(stream.close())


def test_a_push_far_ahead_of_the_session_is_refused(qwen):
    """A pushed step id far past the session's last step (2^62) is refused on the push stream; it
    used to become the session's last step, and the owner's later steps were dropped as duplicates."""
    s, peer = qwen
    stream = _open(s, peer)

    async def push() -> list:
        link = await protocol.open_lean(s.p2p, peer, protocol.PUSH)
        step = Step(session_id=stream.session_id, step_id=2**62, position=0)
        link.send(runtime_pb2.ExpertRequest(metadata=encode(step), tensors=[encode_tensor(torch.randn(1, 1, HIDDEN))]))
        link.end()
        replies = []
        while (reply := await asyncio.wait_for(link.recv(runtime_pb2.ExpertResponse), 20)) is not None:
            replies.append(decode_push_reply(reply.metadata))
        link.close()
        return replies

    assert [r.code for r in loop.run(push())] == ["invalid_request"]
    out = loop.run(asyncio.wait_for(stream.step(torch.randn(1, 2, HIDDEN), 0), 10))
    assert out.shape == (1, 2, HIDDEN)
    loop.run(stream.close())


def test_closing_a_session_while_its_step_waits_for_compute(qwen):
    """A close from another stream of the owner while the session's step waits behind a long
    forward: the close is answered, the step gets its output or session_closed (never internal),
    and the cache comes back."""
    s, peer = qwen
    stream = _open(s, peer, max_length=600)
    closer = _open(s, peer, max_length=4)

    async def race():
        busy = asyncio.ensure_future(call_forward(s.p2p, peer, Span(0, 3), SpanInputs(torch.randn(2, 4000, HIDDEN)),
                                                  timeout=60))
        await asyncio.sleep(0.3)
        step = asyncio.ensure_future(stream.step(torch.randn(1, 500, HIDDEN), 0))  # > 8 tokens: waits for compute
        await asyncio.sleep(0.05)
        closed = await closer.control(runtime_pb2.ExpertRequest(metadata=encode(CloseSession(
            session_id=stream.session_id))))
        return closed, await asyncio.gather(step, busy, return_exceptions=True)

    (closed, _), (step, busy) = loop.run(race())
    assert closed.kind == "closed"
    assert isinstance(busy, torch.Tensor)
    assert isinstance(step, (torch.Tensor, SessionClosedError)), step
    loop.run(closer.close())
    held = _open(s, peer, max_length=1000)  # the closed session's cache came back
    loop.run(held.close())
    _good_step_works(s, peer)


def test_a_forward_of_batch_zero_is_refused(qwen):
    s, peer = qwen
    with pytest.raises(InvalidRequestError, match="batch"):
        loop.run(call_forward(s.p2p, peer, Span(0, 3), SpanInputs(torch.randn(0, 2, HIDDEN)), timeout=20))
    _good_step_works(s, peer)


def test_a_clients_error_frame_is_not_answered_as_a_server_bug(qwen):
    """A client that fails its inference stream (an error frame) ends it; nothing is `internal`."""
    s, peer = qwen

    async def fail_stream() -> list:
        stream = await protocol.open_lean(s.p2p, peer, protocol.INFERENCE)
        stream.send_error("the client gave up")
        replies = []
        while (reply := await asyncio.wait_for(stream.recv(runtime_pb2.ExpertResponse), 20)) is not None:
            replies.append(decode_inference_reply(reply.metadata))
        stream.close()
        return replies

    assert [r.code for r in loop.run(fail_stream()) if r.kind == "error"] == []
    _good_step_works(s, peer)


def test_an_error_early_in_a_multi_part_request_is_a_typed_reply(qwen):
    """Undecodable metadata on the first of 32 one-MiB parts: the server answers invalid_request and
    reads (drops) the rest, instead of closing the stream under the client's writes (which reached
    the client as a broken pipe, a reset or an empty reply: a network fault, retried and banned)."""
    s, peer = qwen
    part = runtime_pb2.Tensor(buffer=bytes(1 << 20), dtype="float32", size=[1 << 18])
    messages = [runtime_pb2.ExpertRequest(metadata=b"{garbled" if i == 0 else b"", tensors=[part]) for i in range(32)]
    with pytest.raises(InvalidRequestError):
        loop.run(_call(s.p2p, peer, protocol.FORWARD, messages, decode_forward_reply, 20, "forward"))
    _good_step_works(s, peer)
