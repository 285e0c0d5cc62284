"""Quantized frozen weights for server blocks: int8 (per output channel) and NF4 (blockwise).

A server quantizes the four projections of every block it hosts (fused q/k/v, o, fused gate/up,
down) when it loads them; norms and biases stay in the compute dtype. ``QuantLinear`` replaces
``nn.Linear`` in place, so the block code (``llama.py``) and LoRA (its deltas are added to the
projection outputs) do not change. Pure math, no networking.

- **int8**: ``W ≈ q · s`` with ``q`` int8 in [-127, 127] and one float32 scale ``s = max|W_row| / 127``
  per output channel (row). Fusing q/k/v or gate/up stacks rows, so per-row scales are unaffected.
- **nf4**: bitsandbytes' 4-bit NormalFloat: the weight flattened (row-major) into blocks of 64,
  each scaled by its absmax to [-1, 1] and rounded to the nearest of 16 NormalFloat levels; two
  codes per byte, the first in the high nibble. We use bitsandbytes' kernels when it imports and
  our own pure-torch code otherwise; both read and write the same bytes (tested).

Compute: the weights are dequantized on the fly (never stored in float). On a CPU with native
bfloat16 matmuls (AVX512-BF16/AMX, where oneDNN runs bf16 GEMMs several times faster than fp32),
the quantized matmuls take bfloat16 inputs with float32 accumulation whatever the server's dtype:
int8 values are exact in bfloat16 and the extra rounding of the activations is small next to the
weights' own quantization error. Decoding-size inputs (≤ ``INT8_GEMV_ROWS`` rows) use
``torch._weight_int8pack_mm``, which reads the int8 weight directly: a decoding step streams every
weight once, and int8 codes are a quarter of float32's bytes. Larger inputs convert the int8 codes
to bfloat16, run one GEMM and scale its output rows (NF4: dequantize, then one GEMM).
Elsewhere (no native bfloat16, CUDA) the same is done in the input's dtype.

Backward (training through quantized blocks) is defined for the inputs only: the weights are
frozen. ``_QuantMatmul`` saves nothing but a reference to the quantized weight and dequantizes it
again in backward, so a kept training graph never holds a float copy of the weights.
"""

from __future__ import annotations

import functools
import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from stamen.errors import QuantizationError

QuantMethod = Literal["none", "int8", "nf4"]
QUANT_METHODS: tuple[str, ...] = ("none", "int8", "nf4")

NF4_BLOCK = 64
"""Weights per NF4 absmax block (bitsandbytes' default for 4-bit weights)."""
INT8_GEMV_ROWS = 16
"""Inputs with at most this many rows (batch × tokens) take the int8 GEMV kernel on CPU."""

# The 16 NormalFloat levels (Dettmers et al., QLoRA): quantiles of N(0, 1) scaled to [-1, 1], with an
# exact zero; the values bitsandbytes uses (``get_4bit_type("nf4")``).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
"""The Linear modules of a ``LlamaBlock`` that get quantized."""


@functools.cache
def bitsandbytes_ops():
    """``torch.ops.bitsandbytes`` when bitsandbytes imports, else None (we then use our own NF4 code)."""
    # bitsandbytes warns at import that it cannot fetch an optional CPU kernel from the Hub; we never want that
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # not installed, or its native library does not load on this machine
        return None
    return torch.ops.bitsandbytes


@functools.cache
def _cpu_has_fast_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype quantized matmuls run in for input ``x`` (see the module docstring)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and _cpu_has_fast_bf16():
        return torch.bfloat16
    return x.dtype


# --- int8 ---

def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (out, in) float -> int8 (out, in) and float32 scales (out,)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)[:, None]


# --- nf4 ---

def _nf4_levels(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def quantize_nf4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise NF4 of the row-major flattened weight: packed codes (ceil(n/2),) uint8 and float32
    absmax per block of 64 (ceil(n/64),), in bitsandbytes' layout."""
    w = weight.detach().float().contiguous()
    ops = bitsandbytes_ops()
    if ops is not None and w.device.type in ("cpu", "cuda"):
        packed, absmax = ops.quantize_4bit(w, NF4_BLOCK, "nf4", torch.uint8)
        return packed.reshape(-1), absmax.float()
    return _quantize_nf4_torch(w)


def _quantize_nf4_torch(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = w.numel()
    blocks = -(-n // NF4_BLOCK)
    flat = F.pad(w.reshape(-1), (0, blocks * NF4_BLOCK - n)).view(blocks, NF4_BLOCK)
    absmax = flat.abs().amax(dim=1)
    scaled = flat / absmax.clamp_min(1e-12)[:, None]
    levels = _nf4_levels(w.device)
    # nearest level: the levels are sorted, so compare against the midpoints between neighbours
    codes = torch.bucketize(scaled, (levels[1:] + levels[:-1]) / 2).to(torch.uint8).view(-1)
    codes = F.pad(codes, (0, codes.numel() % 2))
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed[: (n + 1) // 2].contiguous(), absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...],
                   dtype: torch.dtype) -> torch.Tensor:
    ops = bitsandbytes_ops()
    if ops is not None and packed.device.type in ("cpu", "cuda"):
        return ops.dequantize_4bit(packed.view(-1, 1), absmax.float(), NF4_BLOCK, "nf4", list(shape), dtype)
    return _dequantize_nf4_torch(packed, absmax, shape, dtype)


def _dequantize_nf4_torch(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...],
                          dtype: torch.dtype) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    blocks = absmax.numel()
    # one lookup per byte: a (256, 2) table of (high nibble, low nibble) levels
    levels = _nf4_levels(packed.device)
    byte = torch.arange(256, device=packed.device)
    pairs = torch.stack([levels[byte >> 4], levels[byte & 15]], dim=1).to(dtype)
    codes = F.pad(packed, (0, blocks * NF4_BLOCK // 2 - packed.numel()))
    values = pairs[codes.int()].view(blocks, NF4_BLOCK) * absmax.to(dtype)[:, None]
    return values.view(-1)[:n].view(shape)


# --- the module ---

class QuantLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is kept quantized (``int8`` or ``nf4``); bias in float.

    ``weight_q`` holds the int8 weight (out, in) or the packed NF4 codes; ``weight_scale`` the
    per-row int8 scales or the NF4 block absmaxes (float32).
    """

    def __init__(self, method: QuantMethod, in_features: int, out_features: int, weight_q: torch.Tensor,
                 weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        if method not in ("int8", "nf4"):
            raise QuantizationError(f"QuantLinear quantizes with int8 or nf4, not {method!r}")
        self.method, self.in_features, self.out_features = method, in_features, out_features
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self._scale_bf16: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: QuantMethod) -> QuantLinear:
        weight = linear.weight
        if weight.is_meta:
            raise QuantizationError("cannot quantize a Linear whose weight is not loaded (meta device)")
        q, s = quantize_int8(weight) if method == "int8" else quantize_nf4(weight)
        return cls(method, linear.in_features, linear.out_features, q, s, linear.bias)

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized weight, its scales and the bias."""
        return sum(t.nbytes for t in (self.weight_q, self.weight_scale, self.bias) if t is not None)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight (out, in) these codes stand for, in ``dtype``."""
        if self.method == "int8":
            return dequantize_int8(self.weight_q, self.weight_scale, dtype)
        return dequantize_nf4(self.weight_q, self.weight_scale, (self.out_features, self.in_features), dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) @ Wᵀ without the bias, in x's dtype."""
        dtype = _matmul_dtype(x)
        rows = x.numel() // self.in_features
        if self.method == "int8" and x.device.type == "cpu" and dtype == torch.bfloat16 and rows <= INT8_GEMV_ROWS:
            if self._scale_bf16 is None:
                self._scale_bf16 = self.weight_scale.to(torch.bfloat16)
            out = torch._weight_int8pack_mm(x.reshape(rows, self.in_features).to(dtype).contiguous(), self.weight_q,
                                            self._scale_bf16)
            return out.view(*x.shape[:-1], self.out_features).to(x.dtype)
        if self.method == "int8":  # int8 codes are exact in any float dtype: scale the (smaller) output instead
            out = F.linear(x.to(dtype), self.weight_q.to(dtype)).to(x.dtype)
            return out * self.weight_scale.to(x.dtype)
        return F.linear(x.to(dtype), self.dequantize(dtype)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _QuantMatmul.apply(x, self) if torch.is_grad_enabled() and x.requires_grad else self.matmul(x)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"{self.method}, in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"


class _QuantMatmul(torch.autograd.Function):
    """x @ Wᵀ with a frozen quantized W: the gradient flows to x only; W is dequantized again in
    backward instead of being saved in float."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        layer: QuantLinear = ctx.layer
        return grad_out @ layer.dequantize(grad_out.dtype), None


def quantize_block_(block: nn.Module, method: QuantMethod) -> nn.Module:
    """Replace the block's projections (``PROJECTIONS``) by ``QuantLinear`` in place; returns the block."""
    if method == "none":
        return block
    if method not in QUANT_METHODS:
        raise QuantizationError(f"unknown quantization {method!r}; choose one of {list(QUANT_METHODS)}")
    for path in PROJECTIONS:
        parent_path, name = path.rsplit(".", 1)
        parent = block.get_submodule(parent_path)
        linear = getattr(parent, name)
        if isinstance(linear, QuantLinear):
            if linear.method != method:
                raise QuantizationError(f"{path} is already quantized with {linear.method}, not {method}")
            continue
        setattr(parent, name, QuantLinear.from_linear(linear, method))
    return block


def module_nbytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (persistent or not), each tensor counted once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.nbytes
    return total


def quantized_linear_bytes(in_features: int, out_features: int, method: QuantMethod, dtype: torch.dtype) -> int:
    """Bytes one Linear's weight takes under ``method`` (without its bias)."""
    n = in_features * out_features
    if method == "none":
        return n * torch.finfo(dtype).bits // 8
    if method == "int8":
        return n + 4 * out_features
    if method == "nf4":
        return (n + 1) // 2 + 4 * (-(-n // NF4_BLOCK))
    raise QuantizationError(f"unknown quantization {method!r}; choose one of {list(QUANT_METHODS)}")
