"""The client halves of ``rpc_stage_state`` and ``rpc_trainer_state``: a training stage's state
(parameters, and the optimizer's and averager's state) from one of its peers, for a server joining
the stage or a trainer exporting the model; the trainers' shared state from one trainer, for a
trainer that fell behind or joined late."""

from __future__ import annotations

from typing import Any

import torch
from hivemind.p2p import P2P, PeerID

from stamen.errors import RemoteCallError
from stamen.rpc import protocol
from stamen.rpc.calls import _call
from stamen.rpc.parts import in_parts
from stamen.rpc.protocol import Request
from stamen.types import Span
from stamen.wire.messages import (
    SpanRef,
    StageState,
    StageStateRequest,
    TrainerStateRequest,
    decode_stage_state_reply,
)
from stamen.wire.tensors import FLOAT_DTYPES, INDEX_DTYPES, decode_tensor

STATE_ELEMENTS_LIMIT = 1 << 34
"""Most elements one tensor of a stage's state may hold (a projection of a very large model)."""


async def fetch_stage_state(p2p: P2P, peer: PeerID, blocks: Span, *, optimizer: bool = True,
                            timeout: float = 300.0) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """(epoch, tensors by name, optimizer meta) of the stage ``peer`` serves over ``blocks`` (its whole
    span). Names: "param.<name>" (``SpanModel`` naming), "optim.*" and "averager.*" (only with
    ``optimizer``). ``NotTrainingError``: the peer's blocks do not train."""
    messages = in_parts(Request, StageStateRequest(blocks=SpanRef.of(blocks), optimizer=optimizer), [])
    return await _fetch_state(p2p, peer, protocol.STAGE_STATE, messages, timeout, f"stage state of blocks {blocks}")


async def fetch_trainer_state(p2p: P2P, peer: PeerID, model: str, *, optimizer: bool = True,
                              timeout: float = 300.0) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """(epoch, tensors by name, optimizer meta) of the trainers' group as the trainer at ``peer`` (its
    averaging peer) holds it: "param.<name>" of the client parts, "optim.*" and "averager.*"."""
    messages = in_parts(Request, TrainerStateRequest(model=model, optimizer=optimizer), [])
    return await _fetch_state(p2p, peer, protocol.TRAINER_STATE, messages, timeout, f"trainer state of {model}")


async def _fetch_state(p2p: P2P, peer: PeerID, rpc: protocol.Rpc, messages: list[Request], timeout: float,
                       what: str) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    reply, protos = await _call(p2p, peer, rpc, messages, decode_stage_state_reply, timeout, what)
    if not isinstance(reply, StageState) or len(protos) != len(reply.names):
        raise RemoteCallError(f"{what}: the reply from {peer} carried {len(protos)} tensors for "
                              f"{len(getattr(reply, 'names', []))} names")
    tensors = {name: decode_tensor(proto, name, FLOAT_DTYPES | INDEX_DTYPES, STATE_ELEMENTS_LIMIT)
               for name, proto in zip(reply.names, protos, strict=True)}
    return reply.epoch, tensors, reply.optimizer_meta
