"""The graph-friendly decode step of the GPU bench (:class:`StaticDecodeStep`), CUDA graph capture, and
its timing and error helpers (see ``stamen.bench.gpu``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from stamen.models.llama import rotate_half

# --------------------------------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int) -> dict[str, float]:
    """Median (and p10/p90) wall ms of ``fn`` with a device synchronize around every call, plus the mean
    ms per call of ``reps`` back-to-back calls with one synchronize at the end ("pipelined")."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(1000 * (time.perf_counter() - start))
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    pipelined = 1000 * (time.perf_counter() - start) / reps
    times.sort()
    return {"median_ms": statistics.median(times), "p10_ms": times[len(times) // 10],
            "p90_ms": times[(9 * len(times)) // 10], "pipelined_ms": pipelined}


def kernel_profile(fn: Callable[[], Any]) -> dict[str, float] | str:
    """GPU kernels one call of ``fn`` launches: how many, and their summed device time (µs)."""
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return {"count": len(kernels), "device_us": sum(e.device_time_total for e in kernels)}
    except Exception as e:  # the profiler is a nice-to-have here
        return repr(e)


def error_stats(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    diff = ours.double() - ref.double()
    return {"max_abs": diff.abs().max().item(), "rel": (diff.norm() / ref.double().norm()).item(),
            "ref_max_abs": ref.double().abs().max().item()}


def worst_errors(errors: list[dict[str, float]]) -> dict[str, float]:
    return {k: max(e[k] for e in errors) for k in errors[0]}


def capture_graph(fn: Callable[[], torch.Tensor], before: Callable[[], None] = lambda: None,
             ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Warm ``fn`` up on a side stream, then capture it as one CUDA graph; returns the graph and its
    static output. ``before`` runs ahead of every warm-up call and of the capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            before()
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    before()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


# --------------------------------------------------------------------------------- graph-friendly decode step


class StaticDecodeStep:
    """One single-token decode step of a whole span with no Python-side position: capturable once, valid at
    every position ``< bucket``.

    The position lives in the device tensor ``pos`` (shape (1,), int64; all sequences of the batch at the same
    position, as in a server's session). New keys/values go in with ``index_copy_`` at ``pos``; attention reads
    a fixed ``bucket`` of cache positions and masks ``key_index > pos``. Grouped-query attention folds the
    query heads of a group into the query-length axis, so SDPA needs neither ``enable_gqa`` nor a copy of k/v.
    The math is :class:`~stamen.models.llama.LlamaBlock`'s (same modules and weights); sliding windows, LoRA
    and deep prompts are left out of this prototype.
    """

    def __init__(self, span: Any, cache: Any, bucket: int):
        if span.config.sliding_windows:
            raise ValueError("StaticDecodeStep does not implement sliding windows")
        if bucket > cache.max_length:
            raise ValueError(f"bucket {bucket} exceeds the cache's {cache.max_length} positions")
        self.span, self.cache, self.bucket = span, cache, bucket
        device, dtype = cache.tensor.device, cache.tensor.dtype
        self.hidden = torch.zeros(cache.batch_size, 1, span.config.hidden_size, device=device, dtype=dtype)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self._key_index = torch.arange(bucket, device=device)

    def __call__(self) -> torch.Tensor:
        """Run the step on ``self.hidden`` at position ``self.pos``; returns (B, 1, H)."""
        cfg = self.span.config
        B, dtype = self.hidden.shape[0], self.hidden.dtype
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        group = nh // nkv
        cos, sin = self.span.rotary(self.pos.view(1, 1).expand(B, 1), dtype)  # (B, 1, 1, hd)
        mask = (self._key_index <= self.pos)[None, None, None, :]  # (1, 1, 1, bucket)
        x = self.hidden
        for i, block in enumerate(self.span.blocks):
            attn = block.self_attn
            k_cache, v_cache = self.cache.block(i)  # (B, nkv, max_len, hd)
            q, k, v = attn.qkv_proj(block.input_layernorm(x)).split(attn.split_sizes, dim=-1)
            q = q.view(B, 1, nh, hd).transpose(1, 2)  # (B, nh, 1, hd)
            k = k.view(B, 1, nkv, hd).transpose(1, 2)  # (B, nkv, 1, hd)
            v = v.view(B, 1, nkv, hd).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            k_cache.index_copy_(2, self.pos, k)
            v_cache.index_copy_(2, self.pos, v)
            q = q.reshape(B, nkv, group, hd)  # the group's query heads as rows of one kv head
            out = F.scaled_dot_product_attention(q, k_cache[:, :, : self.bucket], v_cache[:, :, : self.bucket],
                                                 attn_mask=mask)  # (B, nkv, group, hd)
            x = x + attn.o_proj(out.reshape(B, 1, nh * hd))
            x = x + block.mlp(block.post_attention_layernorm(x))
        return x
