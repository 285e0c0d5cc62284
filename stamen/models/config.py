"""The block-level view of a model config: only what our own math needs, validated once."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from stamen.errors import UnsupportedModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Compute dtypes by the names configs, records and the command line use."""

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class RopeConfig(BaseModel):
    """Rotary position embedding parameters."""

    model_config = ConfigDict(frozen=True)

    rope_type: str = "default"
    """One of ``default``, ``linear`` or ``llama3``."""
    theta: float = 10000.0
    """The base wavelength."""
    factor: float = 1.0
    """Scaling factor (``linear`` and ``llama3``)."""
    low_freq_factor: float = 1.0
    """Llama-3 smoothing: low frequency factor."""
    high_freq_factor: float = 4.0
    """Llama-3 smoothing: high frequency factor."""
    original_max_position_embeddings: int = 8192
    """Llama-3: context length of pretraining."""


class BlockConfig(BaseModel):
    """Everything a Llama-family decoder block needs (Llama 2/3, Mistral, Qwen2)."""

    model_config = ConfigDict(frozen=True)

    model_type: str
    """``llama``, ``mistral`` or ``qwen2``."""
    num_blocks: int
    """Number of transformer blocks in the whole model."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    num_heads: int
    """Number of query heads."""
    num_kv_heads: int
    """Number of key/value heads (grouped-query attention when fewer than ``num_heads``)."""
    head_dim: int
    """Width of one attention head."""
    rms_norm_eps: float
    """Epsilon of RMSNorm."""
    qkv_bias: bool = False
    """Whether q/k/v projections have a bias (Qwen2 does)."""
    o_bias: bool = False
    """Whether the output projection has a bias."""
    mlp_bias: bool = False
    """Whether the MLP projections have biases."""
    rope: RopeConfig = RopeConfig()
    """Rotary embedding parameters."""
    sliding_windows: tuple[int | None, ...] = ()
    """Per-block sliding attention window (``None``: full attention); empty means all full."""
    vocab_size: int
    """Vocabulary size (for the client-side embeddings and head)."""
    tie_word_embeddings: bool = False
    """Whether the LM head reuses the input embeddings."""

    def window(self, block_index: int) -> int | None:
        return self.sliding_windows[block_index] if self.sliding_windows else None

    @classmethod
    def from_hf(cls, hf_config: Any) -> BlockConfig:
        """Build from a transformers ``PretrainedConfig`` of a supported family."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {hf_config.hidden_act!r} is not supported (only silu)")
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        qkv_bias = True if model_type == "qwen2" else attention_bias
        return cls(
            model_type=model_type,
            num_blocks=hf_config.num_hidden_layers,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            qkv_bias=qkv_bias,
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            rope=_rope_from_hf(hf_config),
            sliding_windows=_sliding_windows_from_hf(hf_config),
            vocab_size=hf_config.vocab_size,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        )


def _rope_from_hf(hf_config: Any) -> RopeConfig:
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    legacy = getattr(hf_config, "rope_scaling", None)
    if isinstance(legacy, dict):  # older configs keep scaling apart from theta
        params = {**legacy, **params}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if getattr(hf_config, "partial_rotary_factor", 1.0) != 1.0 or params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings are not supported")
    return RopeConfig(
        rope_type=rope_type,
        theta=float(theta),
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", getattr(hf_config, "max_position_embeddings", 8192))
        ),
    )


def _sliding_windows_from_hf(hf_config: Any) -> tuple[int | None, ...]:
    window = getattr(hf_config, "sliding_window", None)
    if hf_config.model_type == "qwen2" and not getattr(hf_config, "use_sliding_window", False):
        window = None
    if window is None:
        return ()
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types:
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    return (window,) * hf_config.num_hidden_layers
