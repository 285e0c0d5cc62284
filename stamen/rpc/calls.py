"""Client halves of the one-shot RPCs: info (and ping), forward, backward, adapter upload."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from stamen.errors import RemoteCallError, StamenError
from stamen.rpc import protocol
from stamen.rpc.inputs import SpanGrads, SpanInputs
from stamen.rpc.parts import encode_all, in_parts, read_reply
from stamen.rpc.protocol import Request
from stamen.types import Compression, Span
from stamen.wire.messages import (
    AdapterMeta,
    BackwardRequest,
    ForwardRequest,
    InfoReply,
    InfoRequest,
    PutAdapters,
    SpanRef,
    decode_backward_reply,
    decode_bandwidth_reply,
    decode_forward_reply,
    decode_info_reply,
    decode_put_adapters_reply,
    encode,
)
from stamen.wire.tensors import FLOAT_DTYPES, decode_tensor

logger = logging.getLogger(__name__)

GRADIENT_ELEMENTS_FLOOR = 1 << 26
"""A gradient reply may always carry this many elements per tensor (LoRA gradients of a small input)."""


async def call_info(p2p: P2P, peer: PeerID, timeout: float) -> InfoReply:
    try:
        response = await asyncio.wait_for(
            protocol.call_unary(p2p, peer, protocol.INFO, Request(metadata=encode(InfoRequest()))), timeout)
    except Exception as e:
        raise RemoteCallError(f"info call to {peer} failed: {e!r}") from e
    return decode_info_reply(response.metadata)


async def ping(p2p: P2P, peer: PeerID, timeout: float) -> float | None:
    """Round-trip seconds of an info call, or None if the server did not answer."""
    start = time.perf_counter()
    try:
        await call_info(p2p, peer, timeout)
    except Exception:
        return None
    return time.perf_counter() - start


async def _requests(messages: list[Request]) -> AsyncIterator[Request]:
    for message in messages:
        yield message


async def _call(p2p: P2P, peer: PeerID, rpc: protocol.Rpc, messages: list[Request], decode_reply,
                timeout: float, what: str):
    """Send a multi-part request over a stream RPC; the typed reply and its joined tensors. A
    counted reply that arrives in fewer messages than it announced is a network fault."""

    async def call():
        responses = await protocol.call_stream(p2p, peer, rpc, _requests(messages))
        try:
            return await read_reply(responses, decode_reply, peer, what)
        finally:
            await responses.aclose()  # closes the stream: the server waits for that before closing its half

    try:
        return await asyncio.wait_for(call(), timeout)
    except StamenError:
        raise
    except Exception as e:
        raise RemoteCallError(f"{what} call to {peer} failed: {e!r}") from e


async def call_forward(p2p: P2P, peer: PeerID, blocks: Span, inputs: SpanInputs, *, timeout: float,
                       compression: Compression | None = None) -> torch.Tensor:
    """The span's outputs; ``compression``: how the hidden states go and how the outputs come back
    (None: hidden uncompressed, outputs as the server's default)."""
    msg = ForwardRequest(blocks=SpanRef.of(blocks), compression=compression, **inputs.fields(ForwardRequest))
    what = f"forward over blocks {blocks}"
    reply, protos = await _call(p2p, peer, protocol.FORWARD, in_parts(Request, msg, inputs.pack(compression)),
                                decode_forward_reply, timeout, what)
    if len(protos) != 1:
        raise RemoteCallError(f"forward reply from {peer} carried {len(protos)} tensors")
    return decode_tensor(protos[0], "output", FLOAT_DTYPES, inputs.hidden.numel(), compressed_ok=True)


async def call_backward(p2p: P2P, peer: PeerID, blocks: Span, inputs: SpanInputs, grad_outputs: torch.Tensor, *,
                        timeout: float, train_lora_a: bool = True,
                        compression: Compression | None = None) -> SpanGrads:
    """Gradients of the span's inputs, of its deep prompts (if sent) and of its LoRA weights
    (A only if ``train_lora_a``). ``compression`` applies to hidden, grad_outputs and grad_inputs."""
    msg = BackwardRequest(blocks=SpanRef.of(blocks), train_lora_a=train_lora_a, compression=compression,
                          **inputs.fields(BackwardRequest))
    messages = in_parts(Request, msg, inputs.pack(compression, grad_outputs))
    reply, protos = await _call(p2p, peer, protocol.BACKWARD, messages, decode_backward_reply, timeout,
                                f"backward over blocks {blocks}")
    prompts = inputs.prompts
    limit = max(inputs.hidden.numel(), 0 if prompts is None else prompts.numel(), GRADIENT_ELEMENTS_FLOOR)
    return SpanGrads.unpack(reply, protos, limit, peer)


async def call_put_adapters(p2p: P2P, peer: PeerID, metas: list[AdapterMeta], tensors: list[torch.Tensor],
                            timeout: float) -> list[str]:
    """Upload block adapters (A and B of every target, in order) into the server's cache."""
    messages = in_parts(Request, PutAdapters(adapters=metas), encode_all(tensors, None, 0))
    reply, _ = await _call(p2p, peer, protocol.PUT_ADAPTERS, messages, decode_put_adapters_reply, timeout,
                           "adapter upload")
    return reply.hashes


BANDWIDTH_PART_BYTES = 1 << 20
"""Bytes per message of a bandwidth probe (hivemind caps one message at 4 MiB)."""


async def call_bandwidth(p2p: P2P, peer: PeerID, num_bytes: int) -> float:
    """Stream ``num_bytes`` random bytes to ``peer``; bytes per second until it counted them."""
    part = runtime_pb2.Tensor(buffer=os.urandom(min(num_bytes, BANDWIDTH_PART_BYTES)))
    start = time.perf_counter()
    reply = await protocol.call_unary(p2p, peer, protocol.BANDWIDTH,
                                      _requests([Request(tensors=[part])] * max(1, num_bytes // BANDWIDTH_PART_BYTES)))
    elapsed = time.perf_counter() - start
    return decode_bandwidth_reply(reply.metadata).received / max(elapsed, 1e-6)


async def measure_bandwidth(p2p: P2P, peers: list[PeerID], num_bytes: int = 4 << 20,
                            timeout: float = 5.0) -> float | None:
    """Bytes per second this server sends to peers of the swarm (the best of ``peers``), or None if
    none answered. A small probe first opens the connection, so the timed one measures throughput."""
    best = None
    for peer in peers:
        try:
            await asyncio.wait_for(call_bandwidth(p2p, peer, 1024), timeout)
            rate = await asyncio.wait_for(call_bandwidth(p2p, peer, num_bytes), timeout)
        except Exception as e:
            logger.info("bandwidth probe to %s failed: %r", peer, e)
            continue
        best = rate if best is None else max(best, rate)
    return best
