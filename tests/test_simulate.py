"""`stamen simulate`: the real placement code over many virtual servers."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from stamen.cli.main import app
from stamen.sim.simulate import SimConfig, simulate

SMALL = dict(num_servers=200, num_blocks=40, max_memory_blocks=20, hours=3.0, warmup_hours=1.0, join_minutes=10.0)


def test_a_churning_swarm_stays_near_its_upper_bound():
    run = simulate(SimConfig(**SMALL))
    assert run.mean_ratio >= 0.9 and run.min_ratio > 0.5
    assert run.joins > 120 and run.leaves > 0 and run.checks > 0
    assert all(b <= u + 1e-6 for b, u in zip(run.bottleneck, run.bound, strict=True))  # it is an upper bound


def test_rebalancing_recovers_from_an_exodus_that_joins_alone_do_not():
    config = SimConfig(**SMALL, exodus_hour=2.0)
    with_moves, joins_only = simulate(config), simulate(config.model_copy(update=dict(rebalance=False)))

    def after_exodus(run) -> float:
        hours, ratio = np.array(run.hours), np.array(run.bottleneck) / np.maximum(run.bound, 1e-9)
        return float(ratio[(hours >= 2.25) & (hours < 3.0)].mean())

    assert with_moves.moves > 0 and joins_only.moves == 0
    assert after_exodus(with_moves) >= 0.85 and after_exodus(with_moves) > after_exodus(joins_only) + 0.1


def test_simulate_command_writes_a_plot_and_a_summary(tmp_path):
    png, summary = tmp_path / "sim.png", tmp_path / "sim.json"
    result = CliRunner().invoke(app, ["simulate", "--servers", "60", "--blocks", "16", "--hours", "1",
                                      "--warmup-hours", "0.5", "--baseline", "--png", str(png), "--json", str(summary)])
    assert result.exit_code == 0, result.output
    assert "bottleneck / upper bound" in result.output
    assert png.read_bytes().startswith(b"\x89PNG")
    runs = json.loads(summary.read_text())
    assert set(runs) == {"rebalancing", "joins only"} and 0 < runs["rebalancing"]["mean_ratio"] <= 1


def test_a_standby_pool_closes_holes_without_loading():
    """An exodus opens a hole: without standbys it stays until a server's rebalancing check moves
    there and loads the blocks; a standby holding them goes online within its ping period."""
    config = SimConfig(**SMALL, exodus_hour=2.0, standby_fraction=0.05, seed=1)
    pool, none = simulate(config), simulate(config.model_copy(update=dict(standby_fraction=0.0)))
    assert none.holes >= 1 and pool.holes >= 1
    assert pool.takeovers >= 1 and pool.blocks_saved > 0 and pool.standbys == 10
    # (with seed 0 the exodus opens a hole wider than any standby's blocks: it then lasts until a
    # standby has loaded the rest, 80 s against 96 s without the pool)
    assert pool.max_hole_seconds <= config.standby_detect_seconds + config.standby_jitter + 1e-6
    assert pool.mean_hole_seconds * 10 <= none.mean_hole_seconds
    assert pool.covered_fraction > none.covered_fraction
    # standbys count nothing toward routing: the upper bound is the same servers' either way
    assert abs(np.mean(pool.bound) - np.mean(none.bound)) / np.mean(none.bound) < 0.1


def test_standby_placement_spreads_the_pool_then_prefers_the_blocks_with_fewest_servers():
    from stamen.server.placement import plan_standby, standby_start
    from stamen.types import Span

    counts = np.array([5, 5, 1, 2, 5, 5, 5, 5], dtype=float)
    totals = np.array([9, 9, 3, 1, 9, 9, 9, 9], dtype=float)
    none = np.zeros(8)
    assert standby_start(counts, none, totals, 2) == 2  # the block with one server first
    assert standby_start(np.full(4, 2.0), np.zeros(4), np.array([5, 1, 5, 5.0]), 1) == 1  # ties: less throughput
    held = np.array([0, 0, 1, 1, 0, 0, 0, 0], dtype=float)  # another standby holds [2:4)
    assert standby_start(counts, held, totals, 2) == 0  # blocks nobody holds come first
    assert plan_standby(counts, none, totals, Span(2, 4)) is None  # already there
    assert plan_standby(counts, none, totals, Span(5, 7)) == Span(2, 4)
    assert plan_standby(np.array([10, 10, 9, 10.0]), np.zeros(4), np.ones(4), Span(0, 1)) is None  # not worth it
    assert plan_standby(counts, held, totals, Span(2, 4)) == Span(0, 2)  # a block no standby holds
