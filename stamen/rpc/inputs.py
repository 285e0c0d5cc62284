"""What a call into a span carries, packed and unpacked in one place.

A span call (an inference step, a forward, a backward, a training forward) sends hidden states and,
as needed, an attention mask, position ids, beam-search ``hypo_ids``, deep prompts and a LoRA
adapter reference. The message's ``has_*`` flags say which tensors follow, in one fixed order:
hidden, [grad_outputs], attention_mask, position_ids, hypo_ids, prompts. ``SpanInputs.fields``
sets the flags of a message, ``pack`` encodes its tensors, ``unpack`` checks and decodes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hivemind.proto import runtime_pb2

from stamen.errors import InvalidRequestError, RemoteCallError, RequestError
from stamen.rpc.parts import encode_all
from stamen.types import Compression
from stamen.wire.messages import AdapterRef, BackwardDone
from stamen.wire.tensors import FLOAT_DTYPES, INDEX_DTYPES, decode_tensor

_ID_DTYPES = {"int64", "int32"}


def decode_received(proto: runtime_pb2.Tensor, name: str, allowed_dtypes: set[str], max_numel: int,
                    compressed_ok: bool = False) -> torch.Tensor:
    """``decode_tensor`` for a tensor a server received: any tensor it cannot decode is the
    sender's mistake, ``InvalidRequestError``, never a server error."""
    try:
        return decode_tensor(proto, name, allowed_dtypes, max_numel, compressed_ok)
    except RequestError:
        raise
    except Exception as e:
        raise InvalidRequestError(f"{name}: cannot decode tensor: {e!r}") from None


@dataclass(frozen=True)
class TensorLimits:
    """The most elements a received tensor may have (checked before it is decoded)."""

    elements: int
    """Per hidden state, gradient, mask, position ids or hypo ids: ``max_step_tokens × hidden``."""
    prompt_elements: int
    """Per deep-prompt tensor: ``elements ×`` the span's blocks."""


@dataclass(frozen=True)
class SpanInputs:
    """The inputs of one call into a span (batch B, new tokens T, hidden H)."""

    hidden: torch.Tensor
    """(B, T, H) hidden states, sent in the compute dtype or compressed."""
    attention_mask: torch.Tensor | None = None
    """(B, T) or (B, positions so far + T) padding mask, as the span call takes it."""
    position_ids: torch.Tensor | None = None
    """(B, T) positions of the new tokens."""
    hypo_ids: torch.Tensor | None = None
    """(B,) beam search: reorder the cached sequences before an inference step."""
    prompts: torch.Tensor | None = None
    """(n_blocks, P, H) deep prompts added to positions [0, P) of every block's input."""
    adapter: AdapterRef | None = field(default=None)
    """The LoRA adapters to apply, named by content hash (the server must hold them)."""

    def fields(self, message: type) -> dict:
        """The ``has_*`` flags (and ``adapter``) of ``message`` that describe these inputs; refuses
        inputs the message cannot carry."""
        values = dict(has_attention_mask=self.attention_mask is not None,
                      has_position_ids=self.position_ids is not None,
                      has_hypo_ids=self.hypo_ids is not None,
                      has_prompts=self.prompts is not None,
                      adapter=self.adapter)
        known = message.model_fields
        for name, value in values.items():
            if name not in known and value not in (False, None):
                raise TypeError(f"{message.__name__} cannot carry {name.removeprefix('has_')}")
        return {name: value for name, value in values.items() if name in known}

    def tensors(self, grad_outputs: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The tensors in wire order (``grad_outputs`` right after the hidden states)."""
        return [t for t in (self.hidden, grad_outputs, self.attention_mask, self.position_ids, self.hypo_ids,
                            self.prompts) if t is not None]

    def pack(self, compression: Compression | None = None,
             grad_outputs: torch.Tensor | None = None) -> list[runtime_pb2.Tensor]:
        """Encoded tensors; ``compression`` applies to the hidden states (and ``grad_outputs``) only."""
        return encode_all(self.tensors(grad_outputs), compression, 1 + (grad_outputs is not None))

    @classmethod
    def unpack(cls, msg, protos: list[runtime_pb2.Tensor], limits: TensorLimits) -> SpanInputs:
        """The inputs that ``msg``'s flags (and ``adapter``) announce; ``InvalidRequestError`` for a
        wrong count, dtype or size."""
        return cls._unpack(msg, protos, limits, False)[0]

    @classmethod
    def unpack_with_grad(cls, msg, protos: list[runtime_pb2.Tensor],
                         limits: TensorLimits) -> tuple[SpanInputs, torch.Tensor]:
        """As ``unpack``, for a backward: the inputs and the gradient of the span's outputs."""
        return cls._unpack(msg, protos, limits, True)

    @classmethod
    def _unpack(cls, msg, protos, limits: TensorLimits, grads: bool):
        flags = [getattr(msg, f"has_{name}", False)
                 for name in ("attention_mask", "position_ids", "hypo_ids", "prompts")]
        expected = 1 + grads + sum(flags)
        if len(protos) != expected:
            raise InvalidRequestError(f"expected {expected} tensors, got {len(protos)}")
        rest = iter(protos)
        n = limits.elements
        decode = decode_received
        hidden = decode(next(rest), "hidden_states", FLOAT_DTYPES, n, compressed_ok=True)
        grad = decode(next(rest), "grad_outputs", FLOAT_DTYPES, n, compressed_ok=True) if grads else None
        has_mask, has_positions, has_hypo_ids, has_prompts = flags
        return cls(
            hidden=hidden,
            attention_mask=decode(next(rest), "attention_mask", INDEX_DTYPES, n) if has_mask else None,
            position_ids=decode(next(rest), "position_ids", _ID_DTYPES, n) if has_positions else None,
            hypo_ids=decode(next(rest), "hypo_ids", _ID_DTYPES, n) if has_hypo_ids else None,
            prompts=decode(next(rest), "prompts", FLOAT_DTYPES, limits.prompt_elements) if has_prompts
            else None,
            adapter=getattr(msg, "adapter", None),
        ), grad


@dataclass(frozen=True)
class SpanGrads:
    """What a backward returns: the gradient of the span's inputs, of its deep prompts (if sent)
    and of its LoRA weights (per block, per target in canonical order: A if trained, then B)."""

    inputs: torch.Tensor
    prompts: torch.Tensor | None = None
    adapters: list[torch.Tensor] = field(default_factory=list)

    def reply(self) -> BackwardDone:
        return BackwardDone(has_prompt_grads=self.prompts is not None, num_adapter_grads=len(self.adapters))

    def tensors(self) -> list[torch.Tensor]:
        return [self.inputs, *([self.prompts] if self.prompts is not None else []), *self.adapters]

    @classmethod
    def unpack(cls, reply, protos: list[runtime_pb2.Tensor], max_elements: int, peer) -> SpanGrads:
        """Decode a ``BackwardDone`` reply's tensors; ``RemoteCallError`` if they do not match it."""
        if not isinstance(reply, BackwardDone) or len(protos) != 1 + reply.has_prompt_grads + reply.num_adapter_grads:
            raise RemoteCallError(f"backward reply from {peer} carried {len(protos)} tensors for {reply!r}")
        grads = [decode_tensor(p, "gradient", FLOAT_DTYPES, max_elements, compressed_ok=i == 0)
                 for i, p in enumerate(protos)]
        return cls(grads[0], grads[1] if reply.has_prompt_grads else None, grads[1 + reply.has_prompt_grads:])
