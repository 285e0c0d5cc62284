"""Forward side by side (``stamen bench forward``): tokens/s of one forward with no cache (logits for
every position, the ``rpc_forward`` path) at each (batch, length), local vs swarm vs disk offload."""

from __future__ import annotations

import time

import torch

from stamen.bench.harness import Harness
from stamen.bench.timing import median_or_nan, rounded


def run_forward(h: Harness) -> dict:
    """Tokens/s of one forward (logits for every position) at each (batch, length), interleaved."""
    s = h.settings
    contenders: list[tuple[str, object]] = [("local", h.local), ("swarm", h.dmodel)]
    if h.offload is not None:
        contenders.append(("disk_offload", h.offload))
    out: dict = {}
    with torch.no_grad():
        for m in (m for _, m in contenders):  # warm-up
            m(h.prompt(4))
        raw = {shape: {name: [] for name, _ in contenders} for shape in s.forward_shapes}
        for run in range(s.forward_runs):
            for shape in s.forward_shapes:
                ids = h.prompt(shape[1], batch=shape[0], seed=run)
                for name, m in contenders:
                    start = time.perf_counter()
                    m(ids)
                    raw[shape][name].append(time.perf_counter() - start)
                h.say(f"forward run {run + 1}/{s.forward_runs} batch {shape[0]} × {shape[1]}: " + ", ".join(
                    f"{name} {shape[0] * shape[1] / raw[shape][name][-1]:.0f} tokens/s" for name, _ in contenders))
    for shape, r in raw.items():
        tokens = shape[0] * shape[1]
        entry: dict = {"batch": shape[0], "seq_len": shape[1], "tokens": tokens}
        for name, secs in r.items():
            secs_median = median_or_nan(secs)
            entry[name] = {"tokens_per_s": rounded(tokens / secs_median, 1), "seconds": rounded(secs_median, 3)}
        entry["swarm_over_local"] = rounded(median_or_nan(r["local"]) / median_or_nan(r["swarm"]), 3)
        entry["swarm_over_local_per_run"] = [rounded(a / b, 3) for a, b in zip(r["local"], r["swarm"], strict=True)]
        if "disk_offload" in r:
            entry["swarm_over_disk_offload"] = rounded(median_or_nan(r["disk_offload"]) / median_or_nan(r["swarm"]), 3)
        entry["raw_seconds"] = {k: [rounded(x, 3) for x in v] for k, v in r.items()}
        out[f"{shape[0]}x{shape[1]}"] = entry
    return out
