"""The reports of the side-by-side benches: Markdown tables of decoding, forward, the offloading
bound, the breakdown and training, and how a report is printed (Markdown on stdout and JSON on
stderr, or JSON only)."""

from __future__ import annotations

import json
import sys

TRAIN_MODES = ("deep_ptune", "lora")
"""What ``stamen bench train`` trains: deep prompt tuning and LoRA."""


def emit(report: dict, json_only: bool) -> None:
    if json_only:
        print(json.dumps(report, indent=2))
    else:
        print(markdown(report))
        print(json.dumps(report), file=sys.stderr)


_NAMES = {
    "local": "local transformers `generate`",
    "swarm": "swarm ({servers} loopback servers)",
    "swarm_push_off": "swarm, push off",
    "blocks": "our blocks in-process (pure compute)",
    "blocks_head": "our blocks in-process + client head (embeddings, norm, LM head, argmax)",
    "disk_offload": "transformers + accelerate, layers offloaded to disk (page cache warm)",
    "disk_offload_cold": "the same, page cache dropped before every token (cold disk)",
    "cpu_offload": "transformers + accelerate `cpu_offload` (execution device CPU: hooks only)",
}


def markdown(report: dict) -> str:
    lines: list[str] = []
    servers = report.get("servers")
    if "decode" in report:
        d = report["decode"]
        lines += [f"### Decoding ({report['num_blocks']} blocks, greedy, {d['new_tokens']} new tokens; offload "
                  f"contenders {d['offload_tokens']}, cold {d['cold_tokens']}; medians of "
                  f"{report['settings']['runs']} interleaved runs)", ""]
        for prefix, p in d["prefixes"].items():
            c, r = p["contenders"], p["ratios"]
            swarm_ms = c["swarm"]["ms_per_token"]
            lines += [f"Prefix {prefix}:", "",
                      "| contender | ms/token | steps/s | time to first token ms | vs swarm |",
                      "|---|---:|---:|---:|---:|"]
            for name, v in c.items():
                lines.append(f"| {_NAMES[name].format(servers=servers)} | {v['ms_per_token']:.1f} | "
                             f"{v['steps_per_s']:.2f} | {v['time_to_first_token_ms']:.0f} | "
                             f"{v['ms_per_token'] / swarm_ms:.2f}× |")
            lines.append("")
            for key, v in r.items():
                lines.append(f"- {key.replace('_', ' ')}: {v['of_medians']:.3f} (median of per-run ratios "
                             f"{v['median_of_runs']:.3f}; runs {', '.join(f'{x:.2f}' for x in v['per_run'])})")
            lines += [f"- servers' reported compute per swarm token: {p['swarm_server_compute_ms_per_token']:.1f} ms",
                      ""]
        if d.get("offload_io"):
            lines += ["Offload reads from storage (`/proc/self/io` read_bytes, MB per token): " + ", ".join(
                f"{k} {v}" for k, v in d["offload_io"].items()), ""]
    if "forward" in report:
        lines += ["### Forward (no cache, logits for every position; `model(ids)`)", "",
                  "| batch × length | tokens | local tokens/s | swarm tokens/s | swarm / local | "
                  "disk offload tokens/s | swarm / offload |", "|---|---:|---:|---:|---:|---:|---:|"]
        for f in report["forward"].values():
            off = f.get("disk_offload")
            lines.append(f"| {f['batch']} × {f['seq_len']} | {f['tokens']} | {f['local']['tokens_per_s']:.0f} | "
                         f"{f['swarm']['tokens_per_s']:.0f} | {f['swarm_over_local']:.2f} | "
                         + (f"{off['tokens_per_s']:.0f} | {f['swarm_over_disk_offload']:.2f}× |" if off else "– | – |"))
        lines.append("")
    if "offload_bound" in report:
        b = report["offload_bound"]
        links = list(b["links_bytes_per_s"])
        lines += ["### Offloading bound: block weights / link bandwidth, ms per token", "",
                  "| model | weights GB | " + " | ".join(links) + " |", "|---|---:|" + "---:|" * len(links)]
        for name, m in b["models"].items():
            lines.append(f"| {name} | {m['weight_gb']:.2f} | " + " | ".join(
                f"{m['ms_per_token'][link]:.0f}" for link in links) + " |")
        if b.get("measured_on_this_machine"):
            lines += ["", "Measured here: " + ", ".join(f"{k} {v}" for k, v in b["measured_on_this_machine"].items())]
        lines.append("")
    if "breakdown" in report:
        br = report["breakdown"]
        lines += [f"### Where a swarm decode step goes (prefix {br['prefix']}, {br['tokens']} tokens, "
                  f"step {br['step_ms']:.1f} ms, servers' reported compute {br['server_compute_ms']:.1f} ms)", "",
                  "| part | ms/token | % |", "|---|---:|---:|"]
        for name, ms in br["parts_ms"].items():
            lines.append(f"| {name} | {ms:.2f} | {br['parts_percent'][name]:.1f} |")
        lines.append("")
        path = br.get("critical_path", {})
        if path.get("steps"):
            lines += [f"Measured critical path (`stamen/trace.py` marks in the client and every server, one "
                      f"clock; medians over {path['steps']} decoding steps):", "", "| part | ms |", "|---|---:|"]
            lines += [f"| {name} | {ms:.2f} |" for name, ms in path["parts_ms"].items()]
            lines += [f"| **{name}** | **{ms:.2f}** |" for name, ms in path["totals_ms"].items()]
            lines.append("")
    if "train" in report:
        lines += ["### Training (`stamen.bench.train`)", "", train_table(report["train"]), ""]
    if "machine" in report:
        m = report["machine"]
        lines.append(f"Machine: {m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
                     f"load average at the end {m['load_average_at_end']}.")
    return "\n".join(lines)


def train_table(s: dict) -> str:
    lines = [
        f"training: {s['num_blocks']} blocks, batch {s['batch']} × {s['seq_len']} tokens, "
        f"{s['servers']} loopback servers, median of {s['runs']} runs (forward + backward + SGD update)",
        "| mode | local tokens/s | swarm tokens/s | swarm / local | stateless tokens/s | stateless / local |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode in TRAIN_MODES:
        m = s[mode]
        stateless = (f"{m['stateless_tokens_per_s']:.0f} | {m['stateless_over_local']:.2f}"
                     if "stateless_tokens_per_s" in m else "– | –")
        lines.append(f"| {mode} | {m['local_tokens_per_s']:.0f} | {m['swarm_tokens_per_s']:.0f} | "
                     f"{m['swarm_over_local']:.2f} | {stateless} |")
    lines += ["", "| client, 2 LoRA steps | peak RSS MB | overhead over load MB | LoRA grads MB | optimizer state MB |",
              "|---|---:|---:|---:|---:|"]
    for name, m in s["client_memory"].items():  # empty with --skip-memory
        lines.append(f"| {name} | {m['peak_rss_mb']:.0f} | {m['training_overhead_mb']:.0f} | "
                     f"{m['lora_grads_mb']:.2f} | {m['optimizer_state_mb']:.2f} |")
    return "\n".join(lines)


_SWARM_TRAIN_NAMES = {
    "local": "one local process (transformers, float32)",
    "swarm": "swarm: kept graphs, no compression, float32 (baseline)",
    "recompute": "swarm, activation recomputation (servers keep the inputs only, forward again at the backward)",
    "compression": "swarm, 8-bit activation compression between stages (blockwise8)",
    "bf16": "swarm, bf16 compute on the servers (float32 master weights; a second swarm)",
}


def swarm_train_markdown(report: dict) -> str:
    """The tables of ``stamen bench swarm-train``: averaging per cell and kind; throughput and the
    optimisations one at a time."""
    lines: list[str] = []
    if "averaging" in report:
        a = report["averaging"]
        lines += [f"### Averaging one stage's gradients (blocks {a['span']}: {a['tensors']} tensors, "
                  f"{a['values'] / 1e6:.1f}M float32 values; {a['group_size']} peers, each its own process; "
                  f"rank {a['rank']}; medians of {a['rounds']} rounds per kind, kinds alternating)", "",
                  "| link | averager | all-reduces / round | all-reduce s | step s (matchmaking incl.) | "
                  "MB sent / peer / round, averager's count | on the interface |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for cell in a["cells"]:
            for kind, k in cell["kinds"].items():
                measured = f"{k['sent_mb_measured']:.3f}" if "sent_mb_measured" in k else "–"
                lines.append(f"| {cell['bandwidth']} | {kind} | {k['allreduces_per_round']} | {k['allreduce_s']:.3f} | "
                             f"{k['step_s']:.2f} | {k['sent_mb_counted']:.3f} | {measured} |")
        lines.append("")
        for cell in a["cells"]:
            r = cell["ratios"]
            if r:
                lines.append(f"- {cell['bandwidth']}: " + ", ".join(f"{key.replace('_', ' ')} {v:.2f}×"
                                                                    for key, v in r.items()))
            for kind, errors in cell.get("failed_rounds", {}).items():
                lines.append(f"- {cell['bandwidth']}: {len(errors)} {kind} round(s) failed and ran again "
                             f"(first: {errors[0]})")
        lines += ["", f"Namespaces: {a['namespaces']}. Bytes: {a['bytes']}. Seconds: {a['seconds']}.", ""]
    if "throughput" in report:
        t = report["throughput"]
        lines += [f"### Training tokens/s: {t['stages']} stages × {t['peers_per_stage']} peers "
                  f"({', '.join(t['spans'])}) vs one local process (global batch {t['batch']} × {t['seq_len']} "
                  f"tokens in microbatches of {t['microbatch']}, {t['optimizer']}, {t['averaging']} averaging, "
                  f"synchronous steps; medians of {t['steps']} steps)", "",
                  "| contender | tokens/s | s/step | / local | / swarm baseline | kept streams | compressed | "
                  "recomputed |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, c in t["contenders"].items():
            hops = (f"{c['kept_streams']} | {c['compressed_streams']} | {c.get('recomputed_streams', '–')}"
                    if "kept_streams" in c else "– | – | –")
            note = "" if c.get("applied", True) else " (**not applied by the trainer**)"
            lines.append(f"| {_SWARM_TRAIN_NAMES.get(name, name)}{note} | {c['tokens_per_s']:.1f} | "
                         f"{c['seconds_per_step']:.2f} | {c['over_local']:.2f} | {c['over_swarm']:.2f} | {hops} |")
        lines.append("")
    if "machine" in report:
        m = report["machine"]
        lines.append(f"Machine: {m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
                     f"load average at the end {m['load_average_at_end']}; wall {report.get('wall_s', '?')} s.")
    return "\n".join(lines)
