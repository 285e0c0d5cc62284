"""Typed wire messages and tensor decoding reject bad input with typed errors."""

from __future__ import annotations

import pytest
import torch

from stamen.errors import InvalidRequestError, ServerFullError, request_error_from_code
from stamen.types import Span
from stamen.wire.messages import OpenSession, SpanRef, Step, decode_inference_request, encode
from stamen.wire.tensors import FLOAT_DTYPES, decode_tensor, encode_tensor, join_tensor_parts, split_tensors


def test_messages_round_trip():
    msg = OpenSession(session_id="s", blocks=SpanRef.of(Span(1, 3)), max_length=8, batch_size=2)
    assert decode_inference_request(encode(msg)) == msg
    step = Step(session_id="s", step_id=3, position=4, has_attention_mask=True)
    assert decode_inference_request(encode(step)) == step


@pytest.mark.parametrize("raw", [
    b"", b"[]", b'{"kind": "nope"}', b'{"kind": "open", "session_id": "s"}',
    b'{"kind": "open", "session_id": "s", "blocks": {"start": 3, "end": 1}, "max_length": 4, "batch_size": 1}',
    b'{"kind": "step", "session_id": "s", "step_id": 0, "position": -1}',
    b'{"kind": "step", "session_id": "s", "step_id": 0, "position": 0, "extra": 1}',
    b'{"kind": "step", "session_id": "s", "position": 0}',
])
def test_malformed_messages_are_typed_errors(raw):
    with pytest.raises(InvalidRequestError):
        decode_inference_request(raw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensors_keep_their_dtype_on_the_wire(dtype):
    t = torch.randn(2, 3, 8).to(dtype)
    proto = encode_tensor(t)
    assert len(proto.buffer) == t.numel() * t.element_size()  # no silent upcast
    back = decode_tensor(proto, "x", FLOAT_DTYPES, 1000)
    assert back.dtype == dtype and torch.equal(back, t)


def test_bad_tensors_are_typed_errors():
    proto = encode_tensor(torch.randn(4, 4))
    with pytest.raises(InvalidRequestError, match="exceed"):
        decode_tensor(proto, "x", FLOAT_DTYPES, 10)
    with pytest.raises(InvalidRequestError, match="dtype"):
        decode_tensor(encode_tensor(torch.ones(3, dtype=torch.int64)), "x", FLOAT_DTYPES, 10)
    proto.buffer = proto.buffer[:-1]
    with pytest.raises(InvalidRequestError, match="buffer"):
        decode_tensor(proto, "x", FLOAT_DTYPES, 100)


def test_streamed_parts_join_back():
    tensors = [torch.randn(300, 1000), torch.ones(2, 3, dtype=torch.int64)]
    parts = list(split_tensors(encode_tensor(t) for t in tensors))
    assert len(parts) > 2
    joined = join_tensor_parts(parts)
    assert torch.equal(decode_tensor(joined[0], "a", FLOAT_DTYPES, 10**6), tensors[0])
    assert torch.equal(decode_tensor(joined[1], "b", {"int64"}, 10), tensors[1])


def test_error_codes_round_trip():
    err = request_error_from_code("server_full", "no room")
    assert isinstance(err, ServerFullError) and str(err) == "no room"


def test_frame_stream_round_trip_and_a_peer_that_stops_reading(monkeypatch):
    """Frames over a real socket pair: messages arrive in order and an end frame ends the stream;
    a peer that leaves more than MAX_UNREAD_BYTES unread gets its stream closed on the next send."""
    import asyncio
    import socket

    from hivemind.proto import runtime_pb2

    from stamen.wire import stream as frames

    monkeypatch.setattr(frames, "MAX_UNREAD_BYTES", 1 << 20)

    async def main():
        a, b = socket.socketpair()
        ra, wa = await asyncio.open_unix_connection(sock=a)
        rb, wb = await asyncio.open_unix_connection(sock=b)
        left, right = frames.FrameStream(ra, wa, "left"), frames.FrameStream(rb, wb, "right")
        sent = [runtime_pb2.ExpertRequest(uid=str(i), tensors=[encode_tensor(torch.randn(4))]) for i in range(3)]
        for msg in sent:
            left.send(msg)
        left.end()
        got = [await right.recv(runtime_pb2.ExpertRequest) for _ in range(3)]
        assert got == sent and await right.recv(runtime_pb2.ExpertRequest) is None
        big = runtime_pb2.ExpertRequest(uid="x" * (256 << 10))
        with pytest.raises(frames.StreamEnded):
            for _ in range(1000):  # right never reads again
                right.send(big)
        assert right.closing
        left.close()
        await asyncio.sleep(0)

    asyncio.run(main())
