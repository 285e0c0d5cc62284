"""The client half of ``rpc_train``: a span's forward whose graph the server keeps until the
client sends the gradient of its outputs (or closes the call)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import torch
from hivemind.p2p import P2P, PeerID

from stamen.errors import RemoteCallError, StamenError
from stamen.rpc import protocol
from stamen.rpc.calls import GRADIENT_ELEMENTS_FLOOR
from stamen.rpc.inputs import SpanGrads, SpanInputs
from stamen.rpc.parts import encode_all, in_parts, read_counted, read_reply
from stamen.rpc.protocol import Request, Response
from stamen.rpc.replies import raise_if_error
from stamen.types import Compression, Span
from stamen.wire.messages import (
    BackwardDone,
    Microbatch,
    SpanRef,
    TrainBackward,
    TrainRequest,
    decode_backward_reply,
    decode_train_forward_reply,
)
from stamen.wire.tensors import FLOAT_DTYPES, decode_tensor


class TrainStream:
    """One ``rpc_train`` call: ``open`` runs the forward, ``backward`` sends the gradient once."""

    def __init__(self, peer: PeerID, blocks: Span, timeout: float, compression: Compression | None = None):
        self.peer, self.blocks, self.timeout, self.compression = peer, blocks, timeout, compression
        self._outbox: asyncio.Queue[Request | None] = asyncio.Queue()
        self._replies: AsyncIterator[Response] | None = None
        self.used = False
        """``backward`` was called (a kept graph serves one backward)."""
        self.done: BackwardDone | None = None
        """The backward's reply, once it came: for a microbatch, whether the server counted its weight
        gradient (``accumulated``) and in which epoch of its stage (``stage_epoch``)."""

    async def _requests(self) -> AsyncIterator[Request]:
        while (request := await self._outbox.get()) is not None:
            yield request

    def _send(self, msg, tensors: list[torch.Tensor]) -> None:
        for request in in_parts(Request, msg, encode_all(tensors, self.compression, 1), counted=True):
            self._outbox.put_nowait(request)

    def close(self) -> None:
        """End the call (the server drops a graph still held). Idempotent; call on the client loop."""
        self._outbox.put_nowait(None)

    @classmethod
    async def open(cls, p2p: P2P, peer: PeerID, blocks: Span, inputs: SpanInputs, *, timeout: float,
                   train_lora_a: bool = True, compression: Compression | None = None,
                   microbatch: Microbatch | None = None,
                   recompute: bool = False) -> tuple[TrainStream, torch.Tensor]:
        """Run the span forward on a server that keeps its graph; the stream and the span's outputs.
        ``ServerFullError``: the server holds as many graphs as it may (use ``call_forward``).
        ``compression`` applies to hidden, the outputs and both gradients. ``microbatch``: train the
        span's own weights too (a ``--train`` server; ``NotTrainingError`` from others,
        ``StageEpochError`` when its stage is in another epoch); ``done`` tells after ``backward``
        whether the server counted it. ``recompute``: the server keeps only the inputs and recomputes
        the forward with autograd at the backward (activation recomputation)."""
        self = cls(peer, blocks, timeout, compression)
        msg = TrainRequest(blocks=SpanRef.of(blocks), parts=1, train_lora_a=train_lora_a, compression=compression,
                           microbatch=microbatch, recompute=recompute, **inputs.fields(TrainRequest))
        self._send(msg, inputs.tensors())

        async def call():
            self._replies = (await protocol.call_stream(p2p, peer, protocol.TRAIN, self._requests())).__aiter__()
            reply, protos = await read_counted(self._replies, decode_train_forward_reply, error=RemoteCallError)
            if reply is None:
                raise RemoteCallError(f"train call to {peer} ended without outputs")
            raise_if_error(reply)
            if len(protos) != 1:
                raise RemoteCallError(f"train reply from {peer} carried {len(protos)} tensors")
            return decode_tensor(protos[0], "output", FLOAT_DTYPES, inputs.hidden.numel(), compressed_ok=True)

        try:
            return self, await asyncio.wait_for(call(), timeout)
        except BaseException as e:
            self.close()
            if isinstance(e, StamenError) or not isinstance(e, Exception):
                raise
            raise RemoteCallError(f"train forward call to {peer} for blocks {blocks} failed: {e!r}") from e

    async def backward(self, grad_outputs: torch.Tensor) -> SpanGrads:
        """The gradients ``call_backward`` returns, from the kept graph; the call then ends."""
        if self.used:
            raise RemoteCallError(f"the training graph on {self.peer} was already used")
        self.used = True
        self._send(TrainBackward(parts=1), [grad_outputs])
        self.close()  # nothing more to send (hivemind's reader waits for the request stream to end)

        async def call():
            try:
                reply, protos = await read_reply(self._replies, decode_backward_reply, self.peer, "train backward")
            finally:
                await self._replies.aclose()  # closes the stream: the server waits for that
            self.done = reply if isinstance(reply, BackwardDone) else None
            return SpanGrads.unpack(reply, protos, max(grad_outputs.numel(), GRADIENT_ELEMENTS_FLOOR), self.peer)

        try:
            return await asyncio.wait_for(call(), self.timeout)
        except StamenError:
            raise
        except Exception as e:
            raise RemoteCallError(f"train backward call to {self.peer} for blocks {self.blocks} failed: "
                                  f"{e!r}") from e
        finally:
            self.close()
