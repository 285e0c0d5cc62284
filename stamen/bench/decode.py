"""Decoding side by side (``stamen bench inference``): steps/s, ms/token and time to first token at
every prefix for every contender of a :class:`~stamen.bench.harness.Harness`, interleaved run by run.

The in-process blocks run just before and just after the swarm in each run and count as the mean of
the two. Offloading with the page cache warm reads each layer's weights from the page cache at
every forward; "cold" drops the file's pages (``posix_fadvise(DONTNEED)``) before every token, as
if weights came from disk.
"""

from __future__ import annotations

import os
import statistics

from stamen.bench.contenders import (
    blocks_generate,
    drop_page_cache,
    generate,
    read_bytes,
    swarm_generate,
    warm_page_cache,
)
from stamen.bench.harness import Harness
from stamen.bench.timing import TokenClock, median_or_nan, rounded

DECODE_CONTENDERS = ("local", "swarm", "swarm_push_off", "blocks", "blocks_head", "disk_offload", "cpu_offload",
                     "disk_offload_cold")


def run_decode(h: Harness) -> dict:
    """Steps/s, ms/token and time to first token at every prefix, contenders interleaved run by run."""
    s = h.settings
    raw: dict[int, dict[str, dict[str, list[float]]]] = {
        p: {c: {"ms": [], "ttft_ms": []} for c in DECODE_CONTENDERS} for p in s.prefixes}
    server_compute: dict[int, list[float]] = {p: [] for p in s.prefixes}
    offload_io: dict[str, list[float]] = {"warm_read_mb_per_token": [], "cold_read_mb_per_token": [],
                                          "cold_drop_ms": []}

    def record(prefix: int, name: str, ms: float, ttft: float) -> None:
        raw[prefix][name]["ms"].append(ms)
        raw[prefix][name]["ttft_ms"].append(ttft)

    loads: list[float] = []
    h.say("warming up ...")
    warm = h.prompt(8)
    for m in (h.local, h.dmodel, h.nopush, h.offload, h.cpu_offloaded):
        if m is not None:
            generate(m, warm, 3, TokenClock())
    blocks_generate(h.blocks, h.dmodel, warm, 3)
    for run in range(s.runs):
        for prefix in s.prefixes:
            prompt = h.prompt(prefix, seed=run)
            clock = TokenClock()
            generate(h.local, prompt, s.new_tokens, clock)
            record(prefix, "local", clock.ms_per_token(), clock.first_token_ms())
            # the in-process blocks run just before and just after the swarm, and count as the mean
            # of the two: on a shared machine whose speed drifts within seconds, the swarm / blocks
            # ratio of a run then compares the swarm with the machine's speed around it
            before = blocks_generate(h.blocks, h.dmodel, prompt, s.new_tokens)
            clock, compute = swarm_generate(h.dmodel, prompt, s.new_tokens)
            record(prefix, "swarm", clock.ms_per_token(), clock.first_token_ms())
            server_compute[prefix].append(statistics.mean(compute))
            after = blocks_generate(h.blocks, h.dmodel, prompt, s.new_tokens)
            b = {k: (before[k] + after[k]) / 2 for k in before}
            record(prefix, "blocks", b["blocks_ms"], b["ttft_ms"])
            record(prefix, "blocks_head", b["blocks_head_ms"], b["ttft_ms"])
            if h.nopush is not None:
                clock, _ = swarm_generate(h.nopush, prompt, s.new_tokens)
                record(prefix, "swarm_push_off", clock.ms_per_token(), clock.first_token_ms())
            # offloading is slow: every run at the first prefix, only the first run at the others
            offload_now = prefix == s.prefixes[0] or run == 0
            if h.offload is not None and offload_now:
                warm_page_cache(h.offload_files)
                clock = TokenClock()
                before = read_bytes()
                generate(h.offload, prompt, s.offload_tokens, clock)
                offload_io["warm_read_mb_per_token"].append((read_bytes() - before) / 2**20 / s.offload_tokens)
                record(prefix, "disk_offload", clock.ms_per_token(), clock.first_token_ms())
                if s.cold_tokens and prefix == s.prefixes[0]:
                    drops = [drop_page_cache(h.offload_files)]
                    clock = TokenClock(on_put=lambda drops=drops: drops.append(drop_page_cache(h.offload_files)))
                    before = read_bytes()
                    generate(h.offload, prompt, s.cold_tokens, clock)
                    offload_io["cold_read_mb_per_token"].append((read_bytes() - before) / 2**20 / s.cold_tokens)
                    offload_io["cold_drop_ms"].append(1000 * statistics.mean(drops))
                    # the first gap starts after the prompt's drop: clock.starts[0] is taken after it
                    record(prefix, "disk_offload_cold", clock.ms_per_token(), clock.first_token_ms())
            if h.cpu_offloaded is not None and offload_now:
                clock = TokenClock()
                generate(h.cpu_offloaded, prompt, s.offload_tokens, clock)
                record(prefix, "cpu_offload", clock.ms_per_token(), clock.first_token_ms())
            r = raw[prefix]
            loads.append(round(os.getloadavg()[0], 2))
            h.say(f"run {run + 1}/{s.runs} prefix {prefix} (load {loads[-1]}): "
                  f"local {r['local']['ms'][-1]:.1f} ms/token, "
                  f"swarm {r['swarm']['ms'][-1]:.1f} (servers computed {server_compute[prefix][-1]:.1f}), "
                  f"blocks {r['blocks']['ms'][-1]:.1f} (+head {r['blocks_head']['ms'][-1]:.1f})"
                  + (f", disk offload {r['disk_offload']['ms'][-1]:.0f}" if r["disk_offload"]["ms"] else "")
                  + (f" (cold {r['disk_offload_cold']['ms'][-1]:.0f})" if r["disk_offload_cold"]["ms"] else "")
                  + (f", cpu_offload {r['cpu_offload']['ms'][-1]:.1f}" if r["cpu_offload"]["ms"] else ""))

    out: dict = {"prefixes": {}, "offload_io": {k: rounded(median_or_nan(v), 1) for k, v in offload_io.items() if v}}
    for prefix in s.prefixes:
        r = raw[prefix]
        row: dict = {}
        for name, vals in r.items():
            if not vals["ms"]:
                continue
            ms = median_or_nan(vals["ms"])
            row[name] = {"ms_per_token": rounded(ms), "steps_per_s": rounded(1000 / ms, 3),
                         "time_to_first_token_ms": rounded(median_or_nan(vals["ttft_ms"]), 1)}

        def ratio(a: str, b: str, r: dict = r) -> dict | None:
            if not r[a]["ms"] or not r[b]["ms"]:
                return None
            per_run = [x / y for x, y in zip(r[a]["ms"], r[b]["ms"], strict=False)]
            return {"of_medians": rounded(median_or_nan(r[a]["ms"]) / median_or_nan(r[b]["ms"]), 3),
                    "median_of_runs": rounded(median_or_nan(per_run), 3), "per_run": [rounded(x, 3) for x in per_run]}

        ratios = {"swarm_over_local": ratio("swarm", "local"), "swarm_over_blocks": ratio("swarm", "blocks"),
                  "swarm_over_blocks_with_head": ratio("swarm", "blocks_head"),
                  "local_over_blocks_with_head": ratio("local", "blocks_head"),
                  "disk_offload_over_swarm": ratio("disk_offload", "swarm"),
                  "disk_offload_cold_over_swarm": ratio("disk_offload_cold", "swarm"),
                  "cpu_offload_over_local": ratio("cpu_offload", "local"),
                  "swarm_push_off_over_local": ratio("swarm_push_off", "local")}
        out["prefixes"][str(prefix)] = {
            "contenders": row, "ratios": {k: v for k, v in ratios.items() if v is not None},
            "swarm_server_compute_ms_per_token": rounded(median_or_nan(server_compute[prefix])),
            "raw_ms_per_token": {k: [rounded(x) for x in v["ms"]] for k, v in r.items() if v["ms"]},
            "raw_ttft_ms": {k: [rounded(x, 1) for x in v["ttft_ms"]] for k, v in r.items() if v["ttft_ms"]},
            "raw_server_compute_ms": [rounded(x) for x in server_compute[prefix]],
        }
    out["load_average_1min_after_each_prefix"] = loads
    out["new_tokens"] = s.new_tokens
    out["offload_tokens"] = s.offload_tokens
    out["cold_tokens"] = s.cold_tokens
    return out
