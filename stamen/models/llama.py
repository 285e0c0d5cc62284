"""Llama-family decoder blocks (Llama 2/3, Mistral, Qwen2), written for a span server.

Pure math: no networking. Checked against transformers in tests/test_models.py. How the products
and the attention are run on CPU (weight layout, split products, grouped decoding attention) is
``kernels.py``'s choice.
Shapes: B batch, T new tokens, S keys so far (cache length after this step), H hidden,
nh query heads, nkv key/value heads, hd head dim, I intermediate size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stamen.models.config import BlockConfig, RopeConfig
from stamen.models.kernels import attend, project  # the bench's op timer wraps `llama.project`
from stamen.models.lora import BlockLoRA


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies (hd/2,) for the configured rope type, in float32."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class Rotary(nn.Module):
    """Computes cos/sin for given positions; shared by all blocks of a span."""

    def __init__(self, config: BlockConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config.rope, config.head_dim), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (B, T) -> cos, sin: (B, 1, T, hd)
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :]  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def build_attention_mask(
    batch: int,
    offset: int,
    num_new: int,
    key_padding: torch.Tensor | None,
    window: int | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean mask (B, 1, T, S) where True means "may attend", or None when plain causal suffices.

    Query i sits at cache index ``offset + i``; key j at cache index j (S = offset + T).
    ``key_padding`` (B, S) marks real tokens with 1 and padding with 0.
    """
    total = offset + num_new
    if key_padding is None and window is None and (num_new == 1 or offset == 0):
        return None  # one new token attends to every cached key; a fresh prompt is plain causal
    q_idx = torch.arange(offset, total, device=device)[:, None]  # (T, 1)
    k_idx = torch.arange(total, device=device)[None, :]  # (1, S)
    allowed = k_idx <= q_idx
    if window is not None:
        allowed = allowed & (k_idx > q_idx - window)
    allowed = allowed[None, None].expand(batch, 1, num_new, total)
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, None, :total].bool()
        # a padded query row may see nothing at all: let it see itself so softmax stays finite
        empty = ~allowed.any(-1, keepdim=True)
        diagonal = (k_idx == q_idx)[None, None]
        allowed = allowed | (empty & diagonal)
    return allowed


def _add(x: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    return x if delta is None else x + delta


@dataclass(frozen=True)
class Segment:
    """One session's part of a batched step through one block (``SpanModel.step_batch``).

    The step's inputs of all sessions are flattened into one (1, N, H) input: rows ``rows`` are
    this session's B·T new positions, sequence-major (row b·T + t is sequence b, new token t).
    Projections and the MLP run over all N rows at once; attention runs per segment, over the
    session's own cache ``kv`` (this block's keys and values, (B, nkv, max_len, hd)) from
    position ``offset``, with its own ``mask`` and ``lora``."""

    rows: slice
    batch: int
    tokens: int
    kv: tuple[torch.Tensor, torch.Tensor]
    offset: int
    mask: torch.Tensor | None
    lora: BlockLoRA | None


def _add_segments(t: torch.Tensor, target: str, x: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
    """Add each segment's LoRA delta of ``target`` to its rows of ``t`` (1, N, ·), in place."""
    for seg in segments:
        delta = seg.lora.delta(target, x[:, seg.rows]) if seg.lora is not None else None
        if delta is not None:
            t[:, seg.rows] += delta
    return t


class Attention(nn.Module):
    def __init__(self, config: BlockConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split_sizes = (q_size, kv_size, kv_size)
        # q, k and v projections fused into one matmul
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.o_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor] | None,
        offset: int,
        mask: torch.Tensor | None,
        lora: BlockLoRA | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project(self.qkv_proj, x).split(self.split_sizes, dim=-1)  # (B, T, nh·hd), 2 × (B, T, nkv·hd)
        if lora is not None:  # per-target LoRA deltas on the slices of the fused projection
            q, k, v = (_add(t, lora.delta(name, x)) for t, name in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj")))
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if kv is not None:  # write the new keys/values in place, then attend over the whole prefix
            k_cache, v_cache = kv  # (B, nkv, max_len, hd)
            k_cache[:, :, offset : offset + T] = k
            v_cache[:, :, offset : offset + T] = v
            k, v = k_cache[:, :, : offset + T], v_cache[:, :, : offset + T]  # (B, nkv, S, hd)
        out = attend(q, k, v, mask)  # (B, nh, T, hd)
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh·hd)
        return _add(project(self.o_proj, out), lora and lora.delta("o_proj", out))  # (B, T, H)

    def forward_segments(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         segments: list[Segment]) -> torch.Tensor:
        """``forward`` for the sessions of a batched step (inference only): x (1, N, H), cos and
        sin (1, 1, N, hd) per row; the projections run once over all rows."""
        N = x.shape[1]
        q, k, v = project(self.qkv_proj, x).split(self.split_sizes, dim=-1)  # (1, N, nh·hd), 2 × (1, N, nkv·hd)
        if any(seg.lora is not None for seg in segments):
            q, k, v = (_add_segments(t, name, x, segments) for t, name in ((q, "q_proj"), (k, "k_proj"),
                                                                          (v, "v_proj")))
        q = q.view(1, N, self.num_heads, self.head_dim).transpose(1, 2)  # (1, nh, N, hd)
        k = k.view(1, N, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (1, nkv, N, hd)
        v = v.view(1, N, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (1, nkv, N, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        outs = []
        for seg in segments:  # each session attends over its own cache
            B, T, end = seg.batch, seg.tokens, seg.offset + seg.tokens
            qs = q[0, :, seg.rows].view(self.num_heads, B, T, self.head_dim).transpose(0, 1)  # (B, nh, T, hd)
            k_cache, v_cache = seg.kv  # (B, nkv, max_len, hd)
            k_cache[:, :, seg.offset : end] = k[0, :, seg.rows].view(self.num_kv_heads, B, T, -1).transpose(0, 1)
            v_cache[:, :, seg.offset : end] = v[0, :, seg.rows].view(self.num_kv_heads, B, T, -1).transpose(0, 1)
            out = attend(qs, k_cache[:, :, :end], v_cache[:, :, :end], seg.mask)  # (B, nh, T, hd)
            outs.append(out.transpose(1, 2).reshape(B * T, -1))  # (B·T, nh·hd)
        out = torch.cat(outs)[None]  # (1, N, nh·hd)
        o = project(self.o_proj, out)  # (1, N, H)
        return _add_segments(o, "o_proj", out, segments) if any(s.lora is not None for s in segments) else o


class MLP(nn.Module):
    def __init__(self, config: BlockConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        # gate and up projections fused into one matmul
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, lora: BlockLoRA | None = None) -> torch.Tensor:
        gate, up = project(self.gate_up_proj, x).split(self.intermediate_size, dim=-1)  # 2 × (B, T, I)
        if lora is not None:
            gate, up = _add(gate, lora.delta("gate_proj", x)), _add(up, lora.delta("up_proj", x))
        h = F.silu(gate) * up  # SwiGLU, (B, T, I)
        return _add(project(self.down_proj, h), lora and lora.delta("down_proj", h))  # (B, T, H)

    def forward_segments(self, x: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        """``forward`` over the rows of a batched step (1, N, H), each segment with its own LoRA."""
        if not any(seg.lora is not None for seg in segments):
            return self(x)
        gate, up = project(self.gate_up_proj, x).split(self.intermediate_size, dim=-1)  # 2 × (1, N, I)
        gate, up = _add_segments(gate, "gate_proj", x, segments), _add_segments(up, "up_proj", x, segments)
        h = F.silu(gate) * up  # (1, N, I)
        return _add_segments(project(self.down_proj, h), "down_proj", h, segments)  # (1, N, H)


class LlamaBlock(nn.Module):
    """One pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: BlockConfig, index: int):
        super().__init__()
        self.index = index
        self.window = config.window(index)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor] | None,
        offset: int,
        mask: torch.Tensor | None,
        lora: BlockLoRA | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, offset, mask, lora)
        return x + self.mlp(self.post_attention_layernorm(x), lora)

    def forward_segments(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         segments: list[Segment]) -> torch.Tensor:
        """``forward`` for a batched step of several sessions: x (1, N, H) -> (1, N, H)."""
        x = x + self.self_attn.forward_segments(self.input_layernorm(x), cos, sin, segments)
        return x + self.mlp.forward_segments(self.post_attention_layernorm(x), segments)


def hf_block_state_dict(hf_tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Map one block's tensors in Hugging Face naming (under ``prefix``) to our fused layout."""

    def take(name: str) -> torch.Tensor:
        return hf_tensors[prefix + name]

    def maybe(name: str) -> torch.Tensor | None:
        return hf_tensors.get(prefix + name)

    state = {
        "input_layernorm.weight": take("input_layernorm.weight"),
        "post_attention_layernorm.weight": take("post_attention_layernorm.weight"),
        "self_attn.qkv_proj.weight": torch.cat(
            [take(f"self_attn.{p}_proj.weight") for p in "qkv"], dim=0
        ),
        "self_attn.o_proj.weight": take("self_attn.o_proj.weight"),
        "mlp.gate_up_proj.weight": torch.cat([take("mlp.gate_proj.weight"), take("mlp.up_proj.weight")], dim=0),
        "mlp.down_proj.weight": take("mlp.down_proj.weight"),
    }
    if maybe("self_attn.q_proj.bias") is not None:
        state["self_attn.qkv_proj.bias"] = torch.cat([take(f"self_attn.{p}_proj.bias") for p in "qkv"], dim=0)
    if maybe("self_attn.o_proj.bias") is not None:
        state["self_attn.o_proj.bias"] = take("self_attn.o_proj.bias")
    if maybe("mlp.gate_proj.bias") is not None:
        state["mlp.gate_up_proj.bias"] = torch.cat([take("mlp.gate_proj.bias"), take("mlp.up_proj.bias")], dim=0)
        state["mlp.down_proj.bias"] = take("mlp.down_proj.bias")
    return state


BLOCK_TENSOR_SUFFIXES = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.bias",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "mlp.gate_proj.bias",
    "mlp.up_proj.bias",
    "mlp.down_proj.bias",
)
