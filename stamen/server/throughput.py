"""How fast a server is: compute measured once per device, model and dtype (and cached); the
network bandwidth is measured against peers of the swarm at every start (``rpc.calls.measure_bandwidth``)."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import torch
from hivemind.proto import runtime_pb2
from pydantic import BaseModel

from stamen.models import BlockConfig, KVCache
from stamen.models.span import SpanModel
from stamen.types import Span

logger = logging.getLogger(__name__)

Request = runtime_pb2.ExpertRequest
Response = runtime_pb2.ExpertResponse



class ComputeThroughput(BaseModel):
    """Measured compute speed of one block on this device, model and dtype."""

    inference: float
    """Single-token inference steps per second through one block."""
    forward: float
    """Tokens per second through one block in a forward batch of ``forward_tokens`` tokens."""
    forward_tokens: int
    """Tokens of the forward batch measured."""


def device_name(device: str, threads: int | None = None) -> str:
    """A stable name for the hardware a server computes on (the cache key's first part); ``threads``:
    the server's torch threads (default: this thread's count)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{dev.type}:{cpu}:{threads or torch.get_num_threads()} threads"


def cache_key(device: str, model_name: str, dtype: torch.dtype, c: BlockConfig, quant: str = "none",
              threads: int | None = None) -> str:
    return (f"{device_name(device, threads)}|{model_name} (hidden {c.hidden_size}, intermediate {c.intermediate_size}, "
            f"heads {c.num_heads}/{c.num_kv_heads})|{str(dtype).removeprefix('torch.')}"
            + (f"|{quant}" if quant != "none" else ""))


def _median_seconds(fn, repeats: int, warmup: int = 3) -> float:
    times = []
    for _ in range(repeats + warmup):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times = sorted(times[warmup:])
    return max(times[len(times) // 2], 1e-6)


def measure_compute(model: SpanModel, dtype: torch.dtype, device: str, forward_tokens: int = 128,
                    repeats: int = 12, forward_threads: int | None = None) -> ComputeThroughput:
    """Time one block of ``model``: single-token inference steps (with this thread's torch threads),
    and a forward of ``forward_tokens`` (with ``forward_threads``, if given, as servers run it)."""
    block = Span(model.span.start, model.span.start + 1)
    hidden_size = model.config.hidden_size
    cache = KVCache(model.config, 1, 1, repeats + 8, dtype, device)
    token = torch.randn(1, 1, hidden_size, dtype=dtype, device=device)
    batch = torch.randn(1, forward_tokens, hidden_size, dtype=dtype, device=device)
    with torch.inference_mode():
        step = _median_seconds(lambda: model.step(token, cache, blocks=block), repeats)
        step_threads = torch.get_num_threads()
        if forward_threads is not None:
            torch.set_num_threads(forward_threads)
        try:
            forward = _median_seconds(lambda: model(batch, blocks=block), max(3, repeats // 3), warmup=1)
        finally:
            torch.set_num_threads(step_threads)
    return ComputeThroughput(inference=1.0 / step, forward=forward_tokens / forward, forward_tokens=forward_tokens)


def _read_cache(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def cached_only(path: Path, key: str) -> ComputeThroughput | None:
    """The cached measurement under ``key``, if any (a joining server announces it before loading)."""
    try:
        return ComputeThroughput.model_validate(_read_cache(path)[key])
    except (KeyError, ValueError):
        return None


def cached_compute(path: Path, key: str, measure) -> tuple[ComputeThroughput, bool]:
    """The cached measurement under ``key``, else ``measure()`` stored there. Returns (value, was cached)."""
    cached = cached_only(path, key)
    if cached is not None:
        return cached, True
    entries = _read_cache(path)
    value = measure()
    entries[key] = value.model_dump()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        tmp.replace(path)
    except OSError as e:
        logger.warning("cannot write the throughput cache %s: %s", path, e)
    return value, False


def network_steps_per_second(bandwidth: float, hidden_size: int, dtype: torch.dtype) -> float:
    """Tokens per second the network carries: each token's hidden state comes in and goes out once."""
    return bandwidth / (2 * hidden_size * torch.finfo(dtype).bits // 8)
