"""A real server under hostile input: half-sent and oversized requests, too many calls, and a seeded
fuzz of malformed messages to every RPC of the span service. Client mistakes get typed replies
(never ``internal``), the server stays up and answers pings, a known forward's output does not
change, and its memory stays bounded.

One server of a model of its own (no other test routes through it), with short read deadlines and a
small request buffer so that every bound is reached within seconds.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter

import pytest
import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from stamen.client import loop
from stamen.client.config import ClientConfig
from stamen.client.swarm import Swarm
from stamen.rpc import protocol
from stamen.rpc.calls import call_forward, call_info
from stamen.rpc.inputs import SpanInputs
from stamen.testing.models import save_random_llama
from stamen.types import ModelName, Span
from stamen.wire.messages import (
    BackwardRequest,
    CloseSession,
    FlushReplies,
    ForwardRequest,
    Microbatch,
    OpenSession,
    PutAdapters,
    SpanRef,
    StageStateRequest,
    Step,
    TrainBackward,
    TrainRequest,
    encode,
)
from stamen.wire.stream import BYTEORDER, ERROR_MARKER, LENGTH_BYTES, MESSAGE_MARKER, PeerFailedError, open_stream
from stamen.wire.tensors import encode_tensor

pytestmark = pytest.mark.swarm

HIDDEN = 64
READ_TIMEOUT = 1.5
"""The server's ``--read-timeout``; it drains a call's rest for as long after its reply."""
BUDGET = 48 << 20
"""The server's ``--max-request-bytes``."""
PEER_CALLS = 6
"""The server's ``--max-peer-calls``."""
FUZZ_CASES = 90
"""Seeded cases, ten per RPC (``_Fuzz.case`` takes the RPCs in turn; each case draws its kinds of
malformed metadata, tensors and framing at random: every kind at least once over the 90, as
``test_the_seeded_cases_cover_every_rpc_and_every_kind_of_malformation`` checks)."""
FUZZ_SECONDS = 60
FUZZ_CLIENTS = 2
"""Client peers the fuzz comes from, each with ``PEER_CALLS`` cases in flight at once (its whole share)."""
MIB = 1 << 20

Request, Response = runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse


@pytest.fixture(scope="module")
def hostile(swarm, tmp_path_factory):
    """(client swarm view, the server's peer id, its process)."""
    path = save_random_llama(tmp_path_factory.mktemp("fuzz") / "fuzz-llama", dict(
        hidden_size=HIDDEN, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        initializer_range=0.2), seed=20)
    server = swarm.add_server(
        path, Span(0, 2), "--torch-threads", "1", "--decode-threads", "1", "--throughput", "5",
        "--read-timeout", str(READ_TIMEOUT), "--request-read-timeout", "6", "--max-request-bytes", str(BUDGET),
        "--max-peer-calls", str(PEER_CALLS), "--max-peer-streams", "16", "--session-timeout", "10",
        "--max-step-tokens", "1024", "--max-cache-tokens", "2048")
    try:
        swarm.wait_online("fuzz-llama", 2, [server])
        s = Swarm(ModelName("fuzz-llama"), 2, ClientConfig(initial_peers=swarm.initial_peers, request_timeout=20))
        try:
            s.wait_until_ready()
            yield s, s.peer(s.servers(refresh=True)[0].peer_id), server
        finally:
            s.shutdown()
    finally:
        swarm.stop_server(server)


def _rss_mib(server) -> float:
    with open(f"/proc/{server.proc.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _frame(message, marker: bytes = MESSAGE_MARKER) -> bytes:
    body = message if isinstance(message, bytes) else message.SerializeToString()
    return marker + len(body).to_bytes(LENGTH_BYTES, BYTEORDER) + body


def _header(length: int, marker: bytes = MESSAGE_MARKER) -> bytes:
    return marker + length.to_bytes(LENGTH_BYTES, BYTEORDER)


def _reply(response) -> tuple:
    """(kind, code) of a typed reply; ("part",) for a reply's later part; ("garbled",) otherwise."""
    if not response.metadata:
        return ("part",)
    try:
        data = json.loads(response.metadata)
        return (data["kind"], data.get("code"))
    except (ValueError, KeyError, TypeError):
        return ("garbled",)


async def _exchange(p2p, peer, name: str, frames: list[bytes], end: bool = True, wait: float = 15.0) -> list[tuple]:
    """Write raw frames to the handler ``name`` (then end our half, unless ``end`` is false: a stalled
    client) and read until the server closes the stream; the replies as ``_reply`` gives them, and
    ("stream_failed",) if the server failed the stream (a handler that crashed)."""
    stream = await open_stream(p2p, peer, name)
    replies = []
    try:
        for data in frames:
            stream.writer.write(data)
        if end:
            stream.end()
        async with asyncio.timeout(wait):
            while True:
                try:
                    response = await stream.recv(Response)
                except PeerFailedError as e:
                    replies.append(("stream_failed", str(e)))
                    break
                if response is None:
                    break
                replies.append(_reply(response))
    except TimeoutError:
        replies.append(("no_end",))
    finally:
        stream.close()
    return replies


def _hidden(*shape, dtype=torch.float32) -> runtime_pb2.Tensor:
    return encode_tensor(torch.randn(*shape).to(dtype))


def _parts(metadata: bytes, tensors: list[runtime_pb2.Tensor]) -> list[bytes]:
    if not tensors:
        return [_frame(Request(metadata=metadata))]
    return [_frame(Request(metadata=metadata if i == 0 else b"", tensors=[t])) for i, t in enumerate(tensors)]


def _codes(replies: list[tuple]) -> list[str]:
    return [r[1] for r in replies if r[0] == "error"]


async def _another_client(p2p: P2P, peer) -> P2P:
    """A client of a peer id of its own (its own share of the server's calls), connected straight to
    the server at the addresses ``p2p`` reaches it at."""
    addrs = next(info.addrs for info in await p2p.list_peers() if info.peer_id == peer)
    return await P2P.create(initial_peers=[f"{addr}/p2p/{peer}" for addr in addrs])


def _good_forward(s: Swarm, peer) -> torch.Tensor:
    hidden = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(3))
    return loop.run(call_forward(s.p2p, peer, Span(0, 2), SpanInputs(hidden), timeout=20))


# --- read deadlines, the request buffer and per-peer limits (issue 20, item 10) ---


def test_a_call_ends_as_soon_as_both_halves_did(hostile):
    """The server drains a call's rest only while the client still sends: a whole request, once
    answered, closes at once (no wait for the drain bound)."""
    s, peer, _ = hostile
    _good_forward(s, peer)
    start = time.monotonic()
    for _ in range(5):
        _good_forward(s, peer)
    assert time.monotonic() - start < 3


async def _timed_exchange(p2p, peer, name: str, frames: list[bytes], end: bool = True) -> tuple[list[tuple], float]:
    """``_exchange`` and the seconds it took (several run at once, each timed on its own)."""
    start = time.monotonic()
    replies = await _exchange(p2p, peer, name, frames, end=end)
    return replies, time.monotonic() - start


def test_a_half_sent_forward_is_answered_within_the_read_timeout(hostile):
    """A whole message with the client's half never ended, and a message cut short (both at once)."""
    s, peer, _ = hostile
    metadata = encode(ForwardRequest(blocks=SpanRef(start=0, end=2)))
    whole = _frame(Request(metadata=metadata, tensors=[_hidden(1, 4, HIDDEN)]))
    half = _frame(Request(metadata=metadata, tensors=[_hidden(1, 4, HIDDEN)]))[:-100]  # the rest never comes

    async def main():
        return await asyncio.gather(*(_timed_exchange(s.p2p, peer, protocol.FORWARD.name, frames, end=False)
                                      for frames in ([whole], [half])))

    for replies, seconds in loop.run(main()):
        assert _codes(replies) == ["invalid_request"], replies
        assert seconds < 2 * READ_TIMEOUT + 3  # the reply, then at most READ_TIMEOUT of draining
    _good_forward(s, peer)


def test_a_frame_declaring_two_to_the_62_bytes_is_refused_at_once(hostile):
    """To each RPC that reads frames (all at once: fewer than a peer's share of calls)."""
    s, peer, _ = hostile
    rpcs = (protocol.FORWARD, protocol.TRAIN, protocol.PUT_ADAPTERS, protocol.BANDWIDTH, protocol.INFERENCE,
            protocol.PUSH)

    async def main():
        return await asyncio.gather(*(_timed_exchange(s.p2p, peer, rpc.name, [_header(2**62)], end=False)
                                      for rpc in rpcs))

    for rpc, (replies, seconds) in zip(rpcs, loop.run(main()), strict=True):
        assert _codes(replies) == ["invalid_request"], (rpc.name, replies)
        assert seconds < READ_TIMEOUT + 2, rpc.name


def test_request_bytes_over_the_servers_buffer_are_refused_before_they_are_read(hostile):
    """One call holds 40 of the 48 MiB buffer: a second is refused "server busy" once it would pass
    the buffer; a request larger than the whole buffer is refused as invalid; memory stays flat."""
    s, peer, server = hostile
    rss = _rss_mib(server)
    metadata = encode(ForwardRequest(blocks=SpanRef(start=0, end=2)))
    part = runtime_pb2.Tensor(buffer=bytes(MIB), dtype="float32", size=[MIB // 4])

    async def main():
        holder = asyncio.ensure_future(_exchange(s.p2p, peer, protocol.FORWARD.name, _parts(metadata, [part] * 40),
                                                 end=False))
        await asyncio.sleep(1.0)  # (local) 40 MiB arrive well within the read timeout
        second = await _exchange(s.p2p, peer, protocol.FORWARD.name, _parts(metadata, [part] * 16))
        return await holder, second

    holder, second = loop.run(main())
    assert _codes(holder) == ["invalid_request"]  # stalled: the read timeout
    assert _codes(second) == ["server_full"], second
    too_big = loop.run(_exchange(s.p2p, peer, protocol.FORWARD.name, _parts(metadata, [part] * 50)))
    assert _codes(too_big) == ["invalid_request"]
    assert _rss_mib(server) < rss + BUDGET / MIB + 100
    _good_forward(s, peer)


def test_a_peer_gets_at_most_its_share_of_concurrent_calls(hostile):
    s, peer, _ = hostile
    metadata = encode(ForwardRequest(blocks=SpanRef(start=0, end=2)))

    async def main():
        stalled = [asyncio.ensure_future(_exchange(s.p2p, peer, protocol.FORWARD.name, _parts(metadata, []),
                                                   end=False)) for _ in range(PEER_CALLS)]
        await asyncio.sleep(0.5)
        extra = await _exchange(s.p2p, peer, protocol.FORWARD.name, _parts(metadata, []), end=False)
        return extra, await asyncio.gather(*stalled)

    extra, stalled = loop.run(main())
    assert _codes(extra) == ["server_full"]
    assert all(_codes(r) == ["invalid_request"] for r in stalled), stalled
    _good_forward(s, peer)


# --- the fuzz ---


class _Fuzz:
    """Seeded hostile messages: each case is (rpc name, frames, whether the client ends its half,
    whether a typed reply must come)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        torch.manual_seed(seed)
        self.drawn: Counter = Counter()
        """(what, kind) of the malformations drawn: ("meta", 0..11), ("tensor", 0..13), ("framing", 0..15)."""

    def pick(self, *options):
        return options[self.rng.randrange(len(options))]

    def _meta(self, good: bytes) -> bytes:
        """``good`` a third of the time, else malformed: random bytes, cut, extra fields, out-of-range
        numbers, deep nesting, a wrong kind, null, a string for a number."""
        r = self.rng
        choice = r.randrange(12)
        self.drawn["meta", choice] += 1
        if choice < 4:
            return good
        return [
            lambda: r.randbytes(r.randrange(1, 200)),
            lambda: good[: r.randrange(len(good))],
            lambda: good.replace(b"}", b',"extra":1}', 1),
            lambda: b'{"kind":"forward","blocks":{"start":0,"end":%d}}' % r.choice([2**70, -1, 0, 99]),
            lambda: b"[" * 5000 + b"]" * 5000,
            lambda: json.dumps({"kind": r.choice(["step", "open", "train", "backward", "info", "x", 7])}).encode(),
            lambda: b"null",
            lambda: good.replace(b'"start":0', b'"start":"zero"'),
        ][choice - 4]()

    def mutate(self, t: runtime_pb2.Tensor) -> runtime_pb2.Tensor:
        """``t`` with a wrong dtype, shape, buffer or compression, or values it may not hold (half the time)."""
        r = self.rng
        kind = r.randrange(14)
        self.drawn["tensor", kind] += 1
        if kind == 0:
            t.dtype = r.choice(["int64", "complex64", "", "float64", "bool", "nonsense"])
        elif kind == 1:
            del t.size[:]
            t.size.extend(r.choice([[HIDDEN], [2, 3], [0, 3, HIDDEN], [1, 0, HIDDEN], [2**32 - 1, 2, HIDDEN],
                                    [2**31, 2**31, HIDDEN], [1, 3, HIDDEN + 1], [0, 2**32 - 1]]))
        elif kind == 2:
            t.buffer = t.buffer[: r.randrange(len(t.buffer))]
        elif kind == 3:
            t.buffer = bytes(len(t.buffer)) if r.random() < 0.5 else encode_tensor(
                torch.full(tuple(t.size), float("nan"))).buffer
        elif kind == 4:
            t.compression = runtime_pb2.CompressionType.BLOCKWISE_8BIT
        elif kind == 5:
            t.compression = r.choice([1, 2, 3, 99])
        elif kind == 6:
            t = encode_tensor(torch.randint(0, 2, (1, 3)))  # a mask or ids where hidden states belong
        return t

    def tensors(self) -> list[runtime_pb2.Tensor]:
        """A few tensors of no particular role."""
        r = self.rng
        return [self.mutate(_hidden(r.choice([1, 2]), r.choice([1, 3]), HIDDEN)) for _ in range(self.pick(0, 1, 2, 3))]

    def span_tensors(self, flags: dict, blocks: int, grads: bool = False, batch: int | None = None):
        """The tensors a span call with these ``has_*`` flags carries, in wire order; one of them
        mutated half the time (and a third of the time tensors of no particular role instead)."""
        r = self.rng
        if r.random() < 0.3:
            return self.tensors()
        batch, tokens = batch or r.choice([1, 2]), r.choice([1, 3, 8, 20])
        found = [_hidden(batch, tokens, HIDDEN)] + ([_hidden(batch, tokens, HIDDEN)] if grads else [])
        if flags.get("has_attention_mask"):
            found.append(encode_tensor(torch.randint(0, 2, (batch, tokens))))
        if flags.get("has_position_ids"):
            found.append(encode_tensor(torch.arange(tokens).expand(batch, tokens).contiguous() * r.choice([1, 10**6])))
        if flags.get("has_hypo_ids"):
            found.append(encode_tensor(torch.randint(-1, batch + 1, (batch,))))
        if flags.get("has_prompts"):
            found.append(_hidden(blocks, r.choice([1, tokens, tokens + 1]), HIDDEN))
        if r.random() < 0.5:
            i = r.randrange(len(found))
            found[i] = self.mutate(found[i])
        return found

    def framing(self, frames: list[bytes]) -> tuple[list[bytes], bool, bool]:
        """Frames as sent, whether the client ends its half, whether a typed reply must come."""
        r = self.rng
        kind = r.randrange(16)
        self.drawn["framing", kind] += 1
        if kind == 0:  # stalled
            return frames, False, True
        if kind == 1:  # truncated mid-frame, then stalled
            data = b"".join(frames)
            return [data[: r.randrange(1, len(data))]], False, True
        if kind == 2:  # a huge declared size
            return frames[:1] + [_header(self.pick(2**62, 20 * MIB, 2**40))], False, True
        if kind == 3:  # an unknown marker
            return frames[:1] + [b"\x07" + _header(3)[1:] + b"abc"], True, True
        if kind == 4:  # the client fails its stream
            return frames[:1] + [_frame(b"client gave up", ERROR_MARKER)], False, False
        if kind == 5:  # an undecodable frame
            return frames + [_frame(r.randbytes(64))], True, True
        if kind == 6:  # the same message twice
            return frames + frames, True, True
        return frames, True, True

    def call_case(self, rpc: protocol.Rpc) -> tuple[str, list[bytes], bool, bool]:
        r = self.rng
        blocks = SpanRef(start=0, end=r.choice([1, 2, 2, 2]))
        flags = dict(has_attention_mask=r.random() < 0.2, has_position_ids=r.random() < 0.2,
                     has_prompts=r.random() < 0.1)
        if rpc is protocol.FORWARD:
            good = encode(ForwardRequest(blocks=blocks, **flags))
        elif rpc is protocol.BACKWARD:
            good = encode(BackwardRequest(blocks=blocks, **flags))
        elif rpc is protocol.TRAIN:  # a microbatch asks a frozen server to train: refused
            good = encode(self.pick(TrainRequest(blocks=blocks, parts=r.choice([1, 2, 1 << 20]), **flags,
                                                 recompute=r.random() < 0.3,
                                                 microbatch=self.pick(None, Microbatch(id="m", samples=2, epoch=0))),
                                    TrainBackward(parts=1)))
        elif rpc is protocol.STAGE_STATE:  # a frozen server has no stage
            good = encode(StageStateRequest(blocks=blocks, optimizer=r.random() < 0.5))
        elif rpc is protocol.PUT_ADAPTERS:
            good = encode(PutAdapters.model_validate(dict(adapters=[dict(
                hash=r.randbytes(8).hex(), targets=r.choice([["q_proj"], ["v_proj", "q_proj"], ["nope"]]),
                rank=r.choice([1, 4, 4096]), scaling=r.choice([1.0, float("inf")]))])))
        else:  # bandwidth: no metadata
            good = b""
        if rpc is protocol.PUT_ADAPTERS:
            rank = r.choice([1, 4])
            tensors = [self.mutate(_hidden(rank, HIDDEN)), self.mutate(_hidden(HIDDEN, rank))]
        elif rpc in (protocol.BANDWIDTH, protocol.STAGE_STATE):
            tensors = self.tensors()
        else:
            tensors = self.span_tensors(flags, blocks.end, grads=rpc is protocol.BACKWARD)
        frames = _parts(self._meta(good) if good else self.pick(b"", b"{x"), tensors)
        if rpc is protocol.TRAIN and r.random() < 0.5:  # a second message, in or out of order
            frames += _parts(self._meta(encode(self.pick(TrainBackward(parts=1), TrainRequest(blocks=blocks,
                                                                                              parts=1)))),
                             self.pick([self.mutate(_hidden(1, 3, HIDDEN))], self.tensors()))
        frames, end, reply = self.framing(frames)
        return rpc.name, frames, end, reply

    def inference_case(self, session: str) -> tuple[str, list[bytes], bool, bool]:
        r = self.rng
        blocks = SpanRef(start=0, end=r.choice([1, 2, 2, 3]))
        messages = []
        if r.random() < 0.7:
            messages.append((OpenSession(session_id=session, blocks=blocks, max_length=r.choice([4, 16, 10**9]),
                                         batch_size=r.choice([1, 2, 1000]), has_prompts=r.random() < 0.1), []))
        for step_id in range(r.randrange(1, 4)):
            step = Step(session_id=self.pick(session, "no-such-session"), step_id=self.pick(step_id, 2**62, 0),
                        position=self.pick(0, step_id, 5, 10**6), has_attention_mask=r.random() < 0.2,
                        has_position_ids=r.random() < 0.2, has_hypo_ids=r.random() < 0.2,
                        push_to=[], hold_reply=r.random() < 0.2)
            messages.append((step, self.span_tensors(step.model_dump(), blocks.end, batch=r.choice([1, 2]))))
        messages.append((self.pick(CloseSession(session_id=session), FlushReplies(session_id=session),
                                   CloseSession(session_id="no-such-session")), []))
        frames = [_frame(Request(metadata=self._meta(encode(m)), tensors=t)) for m, t in messages]
        frames, end, _ = self.framing(frames)
        # a lean stream may idle between messages (its session timeout): the client ends its half
        return protocol.INFERENCE.name, frames, True, False  # an inference stream answers what it can

    def push_case(self, session: str) -> tuple[str, list[bytes], bool, bool]:
        step = Step(session_id=self.pick(session, "no-such-session"), step_id=self.pick(0, 1, 2**62, 5000),
                    position=self.pick(0, 1, 10**6))
        tensors = self.span_tensors({}, 2)
        frames, end, _ = self.framing([_frame(Request(metadata=self._meta(encode(step)), tensors=tensors))])
        return protocol.PUSH.name, frames, True, False  # pushes into unknown sessions are ignored

    RPCS = (protocol.FORWARD, protocol.BACKWARD, protocol.TRAIN, protocol.PUT_ADAPTERS, protocol.BANDWIDTH,
            protocol.INFERENCE, protocol.PUSH, protocol.INFO, protocol.STAGE_STATE)

    def case(self, index: int):
        """Case ``index``: of the RPCs in turn (every one alike often), on session ``fuzz-{index}``."""
        rpc, session = self.RPCS[index % len(self.RPCS)], f"fuzz-{index}"
        if rpc is protocol.INFERENCE:
            return self.inference_case(session)
        if rpc is protocol.PUSH:
            return self.push_case(session)
        if rpc is protocol.INFO:
            return rpc.name, [self._meta(b'{"kind":"info"}')], True, True
        return self.call_case(rpc)


KINDS = dict(meta=12, tensor=14, framing=16)
"""How many kinds ``_Fuzz`` draws from, per what it malforms (the first few of each: well-formed)."""


def test_the_seeded_cases_cover_every_rpc_and_every_kind_of_malformation():
    """The fuzz's ``FUZZ_CASES`` seeded cases reach every RPC alike often and draw every kind of
    malformed metadata, tensor and framing at least once (no server needed: the cases alone)."""
    fuzz = _Fuzz(seed=20)
    rpcs = Counter(fuzz.case(index)[0] for index in range(FUZZ_CASES))
    assert set(rpcs) == {rpc.name for rpc in protocol.SPAN_SERVICE} and len(set(rpcs.values())) == 1, rpcs
    missing = [(what, kind) for what, n in KINDS.items() for kind in range(n) if not fuzz.drawn[what, kind]]
    assert not missing and set(fuzz.drawn) == {(w, k) for w, n in KINDS.items() for k in range(n)}, missing


@pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning")  # hivemind's P2P.create
def test_fuzz_every_rpc(hostile):
    """Seeded malformed and hostile messages to every RPC of the span service (``SPAN_SERVICE``),
    from two client peers with ``PEER_CALLS`` calls in flight each: every error a typed reply and none
    ``internal``, every refused call answered, the server alive, answering pings, computing what it
    computed before, in bounded memory."""
    s, peer, server = hostile
    assert set(_Fuzz.RPCS) == set(protocol.SPAN_SERVICE) and len(_Fuzz.RPCS) == len(protocol.SPAN_SERVICE)
    before = _good_forward(s, peer)
    rss = _rss_mib(server)
    fuzz = _Fuzz(seed=20)
    results: list[tuple] = []

    async def run_case(p2p: P2P, index: int) -> None:
        name, frames, end, reply = fuzz.case(index)
        if name == protocol.INFO.name:
            info = await call_info(p2p, peer, timeout=10) if frames[0] == b'{"kind":"info"}' else \
                await protocol.call_unary(p2p, peer, protocol.INFO, Request(metadata=frames[0]))
            results.append((name, [("info",)] if info else [], reply, frames[:1]))
            return
        replies = await _exchange(p2p, peer, name, frames, end=end)
        results.append((name, replies, reply, [f[:120] for f in frames[:3]]))

    async def main() -> None:
        others = [await _another_client(s.p2p, peer) for _ in range(FUZZ_CLIENTS - 1)]
        deadline = time.monotonic() + FUZZ_SECONDS
        cases = iter(range(FUZZ_CASES))

        async def worker(p2p: P2P) -> None:
            for index in cases:
                if time.monotonic() > deadline:
                    return
                await run_case(p2p, index)

        try:
            await asyncio.gather(*(worker(p2p) for p2p in [s.p2p, *others] for _ in range(PEER_CALLS)))
        finally:
            for p2p in others:
                await p2p.shutdown()

    loop.run(main(), timeout=FUZZ_SECONDS + 30)
    assert len(results) >= 60  # enough cases ran within the time bound
    codes = [code for _, replies, _, _ in results for code in _codes(replies)]
    print(len(results), "cases;", Counter(name.rsplit(".", 1)[-1] for name, *_ in results), Counter(codes),
          Counter(x[0] for _, replies, _, _ in results for x in replies if x[0] not in ("error", "part")))
    assert "internal" not in codes, [r for r in results if "internal" in _codes(r[1])][:3]
    failed = [r for r in results if any(x[0] in ("stream_failed", "garbled", "no_end") for x in r[1])]
    assert not failed, failed[:3]
    unanswered = [r for r in results if r[2] and not r[1]]
    assert not unanswered, unanswered[:3]
    assert set(codes) <= {"invalid_request", "wrong_blocks", "server_full", "unknown_session", "session_closed",
                          "session_length", "unknown_adapter", "not_training"}, set(codes)

    assert loop.run(call_info(s.p2p, peer, timeout=5)).blocks.span == Span(0, 2)  # alive, answering pings
    assert torch.equal(_good_forward(s, peer), before)  # bitwise
    assert server.proc.poll() is None
    assert _rss_mib(server) < 1.5 * rss + 200
    log = server.log_path.read_text(errors="replace")
    assert "internal error while serving" not in log and "handler failed" not in log
