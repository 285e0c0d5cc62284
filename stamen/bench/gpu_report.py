"""The GPU bench's report (``stamen.bench.gpu``) as Markdown tables: parity, decode steps eager vs CUDA
graphs, prefill, transformers' generate."""

from __future__ import annotations

from typing import Any


def table(report: dict[str, Any]) -> str:
    """The report as markdown tables."""
    lines = [f"device: {report['device']}, torch {report['torch']}, transformers {report['transformers']}", "",
             "| model | dtype | vs | prefill max abs | prefill rel | decode max abs | decode rel |",
             "|---|---|---|---:|---:|---:|---:|"]
    for name, entry in report["models"].items():
        for dtype_name, res in entry["dtypes"].items():
            for vs, errs in res["parity"].items():
                if vs == "transformers_cached_vs_recompute":
                    lines.append(f"| {name} | {dtype_name} | transformers: its KV-cached decode vs its recompute | | | "
                                 f"{errs['max_abs']:.2e} | {errs['rel']:.2e} |")
                elif "prefill" in errs:
                    p, d = errs["prefill"], errs["decode_worst"]
                    lines.append(f"| {name} | {dtype_name} | {vs} | {p['max_abs']:.2e} | {p['rel']:.2e} | "
                                 f"{d['max_abs']:.2e} | {d['rel']:.2e} |")
                else:
                    lines.append(f"| {name} | {dtype_name} | {vs} (full sequence) | {errs['max_abs']:.2e} | "
                                 f"{errs['rel']:.2e} | | |")
            s = res["static_step_parity"]
            if "error" in s:
                lines.append(f"| {name} | {dtype_name} | static step vs eager step | {s['error']} | | | |")
            else:
                lines.append(f"| {name} | {dtype_name} | static step vs eager step | | | {s['max_abs']:.2e} | "
                             f"{s['rel']:.2e} |")
    lines += ["", "| model | dtype | B | context | eager step ms | graph of step (frozen position) ms | "
              "static step eager ms | static step graph ms | eager / static graph | kernels/step | kernel µs |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    nan = {"median_ms": float("nan")}
    for name, entry in report["models"].items():
        for dtype_name, res in entry["dtypes"].items():
            for d in res["decode"]:
                eager = d["eager"]["median_ms"]
                frozen, static_eager, static = (d.get(k, nan)["median_ms"] for k in (
                    "graph_frozen_position", "static_step_eager", "graph_static_step"))
                k = d.get("eager_kernels")
                kern = f"{k['count']} | {k['device_us']:.0f}" if isinstance(k, dict) else " | "
                lines.append(f"| {name} | {dtype_name} | {d['batch']} | {d['context']} | {eager:.3f} | "
                             f"{frozen:.3f} | {static_eager:.3f} | {static:.3f} | {eager / static:.1f}× | {kern} |")
    lines += ["", "| model | dtype | prefill tokens | ours ms | transformers layers ms | ours tokens/s |",
              "|---|---|---:|---:|---:|---:|"]
    for name, entry in report["models"].items():
        for dtype_name, res in entry["dtypes"].items():
            for p in res["prefill"]:
                ms = p["ours"]["median_ms"]
                lines.append(f"| {name} | {dtype_name} | {p['tokens']} | {ms:.2f} | "
                             f"{p['transformers_layers']['median_ms']:.2f} | {p['tokens'] / ms * 1000:,.0f} |")
    lines += ["", "| model | dtype | B | transformers generate ms/token |", "|---|---|---:|---:|"]
    for name, entry in report["models"].items():
        for dtype_name, res in entry["dtypes"].items():
            for g in res["generate"]:
                lines.append(f"| {name} | {dtype_name} | {g['batch']} | {g['ms_per_token']:.2f} |")
    return "\n".join(lines)
