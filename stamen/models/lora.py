"""LoRA on our fused blocks: per-target low-rank deltas added to the right slices.

Our q/k/v projections are fused into one matmul and gate/up into another (``hf_block_state_dict``),
but LoRA adapters (peft) name the Hugging Face modules. So a delta is computed per target from the
target's own input and added to that target's slice of the fused output:
``q += scaling · (x Aᵀ) Bᵀ`` with A (r, in), B (out, r). Pure math, no networking.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from stamen.errors import InvalidRequestError
from stamen.models.config import BlockConfig

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Target module names as in Hugging Face Llama (and peft's ``target_modules``), in canonical order."""

TARGET_PATHS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
"""Module path of each target inside a Hugging Face decoder layer."""


def target_shapes(config: BlockConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every LoRA target of one block."""
    H, q, kv, inter = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, \
        config.intermediate_size
    return {
        "q_proj": (H, q),
        "k_proj": (H, kv),
        "v_proj": (H, kv),
        "o_proj": (q, H),
        "gate_proj": (H, inter),
        "up_proj": (H, inter),
        "down_proj": (inter, H),
    }


@dataclass
class BlockLoRA:
    """LoRA weights of one block: target -> (A (r, in), B (out, r)); delta(x) = scaling · x Aᵀ Bᵀ."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float

    @property
    def targets(self) -> list[str]:
        """Present targets in canonical order (the order of tensors on the wire)."""
        return [t for t in LORA_TARGETS if t in self.weights]

    @property
    def rank(self) -> int:
        return next(iter(self.weights.values()))[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())

    def delta(self, target: str, x: torch.Tensor) -> torch.Tensor | None:
        """The target's LoRA output for input x (..., in), or None when the target has no adapter."""
        pair = self.weights.get(target)
        if pair is None:
            return None
        a, b = pair
        return (x @ a.t().to(x.dtype)) @ (b.t().to(x.dtype) * self.scaling)

    def tensors(self) -> list[torch.Tensor]:
        """A then B of every present target, in canonical order."""
        return [t for target in self.targets for t in self.weights[target]]

    def clone(self) -> BlockLoRA:
        return BlockLoRA({k: (a.clone(), b.clone()) for k, (a, b) in self.weights.items()}, self.scaling)

    def to(self, dtype: torch.dtype, device: torch.device | str) -> BlockLoRA:
        return BlockLoRA({k: (a.to(device, dtype), b.to(device, dtype)) for k, (a, b) in self.weights.items()},
                         self.scaling)

    def leaves(self, train_a: bool) -> tuple[BlockLoRA, list[torch.Tensor]]:
        """A copy whose B (and A if ``train_a``) are fresh autograd leaves, with those leaves in wire order."""
        weights, leaves = {}, []
        for target in self.targets:
            a, b = self.weights[target]
            a = a.detach().requires_grad_(train_a)
            b = b.detach().requires_grad_(True)
            weights[target] = (a, b)
            leaves.extend([a, b] if train_a else [b])
        return BlockLoRA(weights, self.scaling), leaves


def adapter_hash(lora: BlockLoRA) -> str:
    """Content address of one block's adapter: targets, shapes, dtype, bytes and scaling."""
    h = hashlib.blake2b(digest_size=20)
    h.update(repr(float(lora.scaling)).encode())
    for target in lora.targets:
        for t in lora.weights[target]:
            t = t.detach().cpu().contiguous()
            h.update(f"{target}:{str(t.dtype)}:{tuple(t.shape)};".encode())
            h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()


def block_lora_from_tensors(config: BlockConfig, targets: list[str], rank: int, scaling: float,
                            tensors: list[torch.Tensor]) -> BlockLoRA:
    """Build one block's adapter from A, B pairs in the order of ``targets``, checking every shape."""
    shapes = target_shapes(config)
    if not targets or len(set(targets)) != len(targets) or any(t not in shapes for t in targets):
        raise InvalidRequestError(f"LoRA targets must be distinct names among {list(LORA_TARGETS)}, got {targets}")
    if [t for t in LORA_TARGETS if t in targets] != list(targets):
        raise InvalidRequestError(f"LoRA targets must come in the order {list(LORA_TARGETS)}")
    if len(tensors) != 2 * len(targets):
        raise InvalidRequestError(f"expected {2 * len(targets)} LoRA tensors (A and B per target), got {len(tensors)}")
    weights = {}
    for i, target in enumerate(targets):
        a, b = tensors[2 * i], tensors[2 * i + 1]
        fan_in, fan_out = shapes[target]
        if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
            raise InvalidRequestError(
                f"LoRA {target}: expected A {(rank, fan_in)} and B {(fan_out, rank)}, "
                f"got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise InvalidRequestError(f"LoRA {target}: weights contain NaN or infinity")
        weights[target] = (a, b)
    return BlockLoRA(weights, scaling)
