"""How many blocks fit a server's memory: weights, its KV cache budget and a safety margin."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from stamen.models import BlockConfig, KVCache
from stamen.models.quant import QuantMethod, quantized_linear_bytes


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def block_bytes(config: BlockConfig, dtype: torch.dtype, quant: QuantMethod = "none") -> int:
    """Bytes of one block's weights: the four projections (fused q/k/v, o, fused gate/up, down) in
    ``dtype`` or quantized with ``quant`` (codes and scales), norms and biases in ``dtype``."""
    h, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    projections = sum(quantized_linear_bytes(fan_in, fan_out, quant, dtype) for fan_in, fan_out in
                      ((h, q + 2 * kv), (q, h), (h, 2 * config.intermediate_size), (config.intermediate_size, h)))
    params = 2 * h  # norms
    params += (q + 2 * kv) * config.qkv_bias + h * config.o_bias + (2 * config.intermediate_size + h) * config.mlp_bias
    return projections + params * torch.finfo(dtype).bits // 8


def available_memory(device: str) -> int:
    """Free bytes on ``device`` now (GPU: free device memory; CPU: the OS's available memory)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class MemoryPlan:
    num_blocks: int
    message: str


def plan_blocks(config: BlockConfig, dtype: torch.dtype, max_cache_tokens: int, available: int,
                margin: float, source: str, quant: QuantMethod = "none") -> MemoryPlan:
    """As many blocks as fit ``available`` bytes less a ``margin`` fraction, each block taking its
    weights (quantized with ``quant``) plus its share of the KV cache budget; at least 1, at most the
    model's blocks."""
    weights = block_bytes(config, dtype, quant)
    cache = KVCache.nbytes_per_token(config, 1, dtype) * max_cache_tokens
    usable = int(available * (1 - margin))
    fit = usable // (weights + cache)
    blocks = max(1, min(fit, config.num_blocks))
    why = (f"each block takes {format_bytes(weights)} of weights{f' ({quant})' if quant != 'none' else ''} + "
           f"{format_bytes(cache)} of KV cache "
           f"({max_cache_tokens} tokens); {format_bytes(available)} {source}, less a {margin:.0%} margin, "
           f"holds {fit}")
    if fit > config.num_blocks:
        why += f"; the model has {config.num_blocks}"
    elif fit < 1:
        why += "; hosting 1 block anyway (lower --max-cache-tokens to fit)"
    return MemoryPlan(blocks, f"hosting {blocks} blocks: {why}")
