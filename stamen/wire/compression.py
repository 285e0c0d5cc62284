"""Optional lossy compression of activations on the wire: 8-bit blockwise absmax quantization
with square-root companding.

A float tensor is flattened and cut into blocks of ``BLOCK_SIZE`` values (the last block may be
shorter). Each block keeps one float32 scale, its ``absmax`` a, and one int8 code per value,
``sign(x) * round(127 * sqrt(|x| / a))`` in [-127, 127]; decoding is ``a * sign(c) * (c / 127)²``.
The square root spends the codes where values are dense: LLM hidden states carry a few huge
outlier channels (SmolLM2: ~2·10⁴ next to a median of ~3), and a linear code would flatten every
other value of an outlier's block to a few levels. A value x is off by at most
``a / 254 * (2 * sqrt(|x| / a) + 1 / 254)``: a/127 near the absmax, far less for small values
(a linear code's bound is a/254 for all). So the square root cuts the logit error against a
linear code of the same size (``stamen bench wire``; docs/benchmarks.md).

On the wire it is a hivemind ``runtime_pb2.Tensor`` with ``compression = BLOCKWISE_8BIT``,
``dtype`` = the original dtype (what the receiver gets back), ``size`` = the original shape and
``buffer`` = the scales (little-endian float32, one per block) followed by the codes (int8, one per
value): ``4 * ceil(n / 64) + n`` bytes for n values, 1.0625 bytes per value instead of 4 (float32)
or 2 (bfloat16/float16). This is our own layout, not hivemind's (which quantizes with
bitsandbytes' dynamic code); only ``decode_compressed`` reads it, and it checks every size.

Only hidden states and their gradients are ever compressed, never token ids, masks, position ids,
deep prompts or LoRA weights. A tensor with a non-finite value is sent uncompressed (NaN and
infinity would poison its block's scale).
"""

from __future__ import annotations

import numpy as np
import torch
from hivemind.proto import runtime_pb2

from stamen.errors import InvalidRequestError

BLOCK_SIZE = 64
"""Values per block on the wire (a fixed part of the format)."""
_QMAX = 127
_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def quantize_blockwise(tensor: torch.Tensor, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened ``tensor`` -> (absmax per block (ceil(n / block_size),) float32, codes (n,) int8)."""
    flat = tensor.detach().reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // block_size)
    padded = torch.nn.functional.pad(flat, (0, blocks * block_size - n)).view(blocks, block_size)
    absmax = padded.abs().amax(dim=1) if n else flat.new_zeros(0)
    peak = absmax[:, None]
    ratio = torch.where(peak > 0, padded.abs() / peak, 0.0)  # zero blocks: all codes 0
    magnitude = torch.round(torch.sqrt(ratio) * _QMAX).clamp_(0, _QMAX)
    codes = (magnitude * torch.sign(padded)).to(torch.int8)
    return absmax, codes.view(-1)[:n]


def dequantize_blockwise(scales: torch.Tensor, codes: torch.Tensor, shape: tuple[int, ...] | torch.Size,
                         dtype: torch.dtype, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """Inverse of ``quantize_blockwise`` (``scales``: the blocks' absmax): a tensor of ``shape`` and ``dtype``."""
    n = codes.numel()
    blocks = scales.numel()
    unit = torch.nn.functional.pad(codes.float(), (0, blocks * block_size - n)).view(blocks, block_size) / _QMAX
    values = (unit * unit.abs() * scales.float()[:, None]).view(-1)[:n]
    return values.view(shape).to(dtype)


def compressed_size(numel: int, block_size: int = BLOCK_SIZE) -> int:
    """Bytes of a compressed buffer holding ``numel`` values."""
    return 4 * -(-numel // block_size) + numel


def compress(tensor: torch.Tensor) -> runtime_pb2.Tensor | None:
    """The wire form of a float tensor, or None when it cannot be compressed (not a float32/16
    tensor, or a non-finite value): the caller then sends it uncompressed."""
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in _FLOAT_DTYPES:
        return None
    scales, codes = quantize_blockwise(tensor.detach().cpu())
    if not bool(torch.isfinite(scales).all()):
        return None
    return runtime_pb2.Tensor(
        compression=runtime_pb2.CompressionType.BLOCKWISE_8BIT,
        buffer=scales.numpy().astype("<f4", copy=False).tobytes() + codes.numpy().tobytes(),
        size=tensor.shape,
        dtype=dtype,
        requires_grad=tensor.requires_grad,
    )


def decode_compressed(proto: runtime_pb2.Tensor, name: str, numel: int) -> torch.Tensor:
    """Decode a ``BLOCKWISE_8BIT`` tensor whose dtype and element count the caller has checked;
    InvalidRequestError for a buffer of the wrong size, a negative or non-finite scale, or the
    code -128 (which ``compress`` never writes)."""
    if proto.dtype not in _FLOAT_DTYPES:
        raise InvalidRequestError(f"{name}: a compressed tensor must be float32, float16 or bfloat16, "
                                  f"not {proto.dtype or '?'}")
    blocks = -(-numel // BLOCK_SIZE)
    expected = 4 * blocks + numel
    if len(proto.buffer) != expected:
        raise InvalidRequestError(f"{name}: compressed buffer of {len(proto.buffer)} bytes does not match shape "
                                  f"{list(proto.size)} ({blocks} float32 scales + {numel} int8 codes = {expected})")
    scales = torch.from_numpy(np.frombuffer(proto.buffer, dtype="<f4", count=blocks).astype(np.float32))
    codes = torch.from_numpy(np.frombuffer(proto.buffer, dtype=np.int8, count=numel, offset=4 * blocks).copy())
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        raise InvalidRequestError(f"{name}: compressed tensor has a negative or non-finite scale")
    if bool((codes == -128).any()):
        raise InvalidRequestError(f"{name}: compressed tensor has the code -128 (codes are in [-127, 127])")
    return dequantize_blockwise(scales, codes, tuple(proto.size), _FLOAT_DTYPES[proto.dtype])
