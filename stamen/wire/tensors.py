"""Tensor encoding on the wire: hivemind's protobuf ``Tensor``, in the tensor's own dtype
(bf16/fp16 travel as 2 bytes per element) or, for activations only, 8-bit blockwise compressed
(``compression.py``); split into parts for streams; decoded with checks."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

from stamen.errors import InvalidRequestError
from stamen.types import Compression
from stamen.wire.compression import compress, decode_compressed

FLOAT_DTYPES = {"float32", "float16", "bfloat16"}
INDEX_DTYPES = {"int64", "int32", "bool", "uint8"}
_TORCH_DTYPES = {name: getattr(torch, name) for name in (*FLOAT_DTYPES, *INDEX_DTYPES)}
STREAM_PART_BYTES = 1 << 20
"""Each streamed message carries at most this many tensor bytes (hivemind caps messages at 4 MiB)."""


def encode_tensor(tensor: torch.Tensor, compression: Compression = "none") -> runtime_pb2.Tensor:
    """Serialize in the tensor's dtype, uncompressed unless ``compression`` is "blockwise8" (for
    hidden states and their gradients only; a tensor that cannot be compressed goes uncompressed).
    (hivemind's own serializer upcasts bfloat16 to float32 unless USE_LEGACY_BFLOAT16=0 is set,
    doubling the bytes on the wire.)"""
    if compression == "blockwise8" and (proto := compress(tensor)) is not None:
        return proto
    tensor = tensor.detach().cpu().contiguous()
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    return runtime_pb2.Tensor(
        compression=runtime_pb2.CompressionType.NONE,
        buffer=raw.numpy().tobytes(),
        size=tensor.shape,
        dtype=str(tensor.dtype).removeprefix("torch."),
        requires_grad=tensor.requires_grad,
    )


def decode_tensor(proto: runtime_pb2.Tensor, name: str, allowed_dtypes: set[str], max_numel: int,
                  compressed_ok: bool = False) -> torch.Tensor:
    """Decode one tensor, raising InvalidRequestError for a wrong dtype, size or corrupt buffer.
    ``compressed_ok``: the tensor (hidden states or a gradient) may come blockwise8-compressed;
    anything else (ids, masks, positions, prompts, adapter weights) must come uncompressed."""
    if proto.dtype not in allowed_dtypes:
        raise InvalidRequestError(
            f"{name}: dtype {proto.dtype or '?'} not allowed (expected one of {sorted(allowed_dtypes)})"
        )
    numel = 1
    for dim in proto.size:
        numel *= dim
    if numel > max_numel:
        raise InvalidRequestError(f"{name}: {numel} elements exceed the limit of {max_numel}")
    if compressed_ok and proto.compression == runtime_pb2.CompressionType.BLOCKWISE_8BIT:
        return decode_compressed(proto, name, numel)
    if proto.compression != runtime_pb2.CompressionType.NONE:
        raise InvalidRequestError(f"{name}: compression {proto.compression} is not accepted")
    dtype = _TORCH_DTYPES[proto.dtype]  # allowed_dtypes are among FLOAT_DTYPES and INDEX_DTYPES
    if len(proto.buffer) != numel * dtype.itemsize:
        raise InvalidRequestError(
            f"{name}: buffer of {len(proto.buffer)} bytes does not match shape {list(proto.size)}"
        )
    if numel == 0:
        return torch.empty(tuple(proto.size), dtype=dtype)
    try:
        # one copy (protobuf's bytes are read-only), no numpy: the hot path of every decoding hop
        tensor = torch.frombuffer(bytearray(proto.buffer), dtype=dtype).view(tuple(proto.size))
        return tensor.requires_grad_(True) if proto.requires_grad and dtype.is_floating_point else tensor
    except Exception as e:  # corrupt buffer
        raise InvalidRequestError(f"{name}: cannot decode tensor: {e}") from None


def split_tensors(tensors: Iterable[runtime_pb2.Tensor]) -> Iterator[runtime_pb2.Tensor]:
    """Split serialized tensors into parts of at most STREAM_PART_BYTES for streaming."""
    for proto in tensors:
        yield from split_for_streaming(proto, STREAM_PART_BYTES)


def join_tensor_parts(parts: Iterable[runtime_pb2.Tensor]) -> list[runtime_pb2.Tensor]:
    """Inverse of ``split_tensors``: a part with a dtype starts a new tensor."""
    tensors: list[runtime_pb2.Tensor] = []
    current: list[runtime_pb2.Tensor] = []
    for part in parts:
        if part.dtype and current:
            tensors.append(combine_from_streaming(current))
            current = []
        current.append(part)
    if current:
        tensors.append(combine_from_streaming(current))
    return tensors
