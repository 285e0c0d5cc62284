"""Writing a simulation's results: a PNG plot and a JSON summary."""

from __future__ import annotations

import json
from pathlib import Path

from stamen.sim.simulate import SimSummary


def write_json(path: Path, runs: dict[str, SimSummary]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({name: run.model_dump(mode="json") for name, run in runs.items()}, indent=1))


def plot(path: Path, runs: dict[str, SimSummary], title: str) -> None:
    """Bottleneck and upper bound over time (top) and their ratio (bottom), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=[3, 2])
    first = next(iter(runs.values()))
    top.plot(first.hours, first.bound, color="black", lw=1.2, label="upper bound (capacity spread evenly)")
    for name, run in runs.items():
        top.plot(run.hours, run.bottleneck, lw=1, label=f"bottleneck, {name}")
        ratio = [b / u if u > 0 else 0.0 for b, u in zip(run.bottleneck, run.bound, strict=True)]
        bottom.plot(run.hours, ratio, lw=1,
                    label=f"{name}: mean {run.mean_ratio:.1%} after warm-up, {run.blocks_reloaded} blocks moved")
    for ax in (top, bottom):
        ax.axvspan(0, first.config.warmup_hours, color="grey", alpha=0.15, lw=0)
        ax.grid(alpha=0.3)
    bottom.axhline(0.9, color="red", ls="--", lw=0.8)
    top.set_ylabel("steps/s through the weakest block")
    bottom.set_ylabel("bottleneck / upper bound")
    bottom.set_ylim(0, 1.05)
    bottom.set_xlabel("simulated hours (shaded: warm-up)")
    top.legend(loc="lower right", fontsize=8)
    bottom.legend(loc="lower right", fontsize=8)
    top.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def describe(name: str, run: SimSummary) -> str:
    c = run.config
    return (f"{name}: {c.num_servers} servers, {c.num_blocks} blocks, {c.hours:g} h, churn {c.churn_per_hour:.0%}/h"
            f"{f', exodus at {c.exodus_hour:g} h' if c.exodus_hour is not None else ''}: "
            f"bottleneck / upper bound after {c.warmup_hours:g} h warm-up: mean {run.mean_ratio:.1%}, "
            f"p5 {run.p5_ratio:.1%}, min {run.min_ratio:.1%} (mean {run.mean_bottleneck:.1f} of "
            f"{run.mean_upper_bound:.1f} steps/s); {run.joins} joins, {run.leaves} leaves, {run.checks} checks, "
            f"{run.moves} moves reloading {run.blocks_reloaded} blocks ({run.moves_after_warmup} moves, "
            f"{run.blocks_reloaded_after_warmup} blocks after warm-up; joins loaded {run.blocks_loaded_by_joins}); "
            f"every block covered {run.covered_fraction:.4%} of the time, {run.holes} holes closed in "
            f"{run.mean_hole_seconds:.1f} s on average (longest {run.max_hole_seconds:.1f} s)"
            + (f"; {run.standbys} standbys: {run.takeovers} takeovers served {run.blocks_saved} blocks without "
               f"loading, standbys loaded {run.standby_blocks_loaded} blocks" if run.standbys else "")
            + f"; {run.runtime_s:.1f} s")


def run_and_report(config, baseline: bool, png: Path | None, json_path: Path | None) -> dict[str, SimSummary]:
    """Run the simulation (and, with ``baseline``, the same swarm without rebalancing), print and write."""
    from stamen.sim.simulate import simulate

    runs = {"rebalancing": simulate(config)} if config.rebalance else {}
    if baseline or not config.rebalance:
        runs["joins only"] = simulate(config.model_copy(update=dict(rebalance=False)))
    if config.standby_fraction > 0:  # the same swarm without the pool, side by side
        runs["no standbys"] = simulate(config.model_copy(update=dict(standby_fraction=0.0)))
    for name, run in runs.items():
        print(describe(name, run), flush=True)
    if json_path is not None:
        write_json(json_path, runs)
        print(f"wrote {json_path}")
    if png is not None:
        c = config
        plot(png, runs, f"{c.num_servers} servers, {c.num_blocks} blocks, throughput {c.min_throughput:g}–"
                        f"{c.max_throughput:g} log-uniform, memory {c.min_memory_blocks}–{c.max_memory_blocks} "
                        f"blocks, churn {c.churn_per_hour:.0%}/h"
                        + (f", exodus at {c.exodus_hour:g} h" if c.exodus_hour is not None else ""))
        print(f"wrote {png}")
    return runs
