"""Block selection and rebalancing are pure functions: tested on synthetic swarms."""

from __future__ import annotations

import numpy as np
import pytest

from stamen.server.placement import (
    PlacementSettings,
    block_throughputs,
    choose_span,
    choose_start,
    plan_move,
    quality,
    rest_of_hole,
    takeover_blocks,
    upper_bound,
)
from stamen.types import Span


def totals(num_blocks: int, *servers: tuple[int, int, float]) -> np.ndarray:
    return block_throughputs(num_blocks, [(Span(s, e), t) for s, e, t in servers])


def test_block_throughputs_add_up_per_block():
    assert totals(6, (0, 3, 2.0), (2, 6, 1.5)).tolist() == [2.0, 2.0, 3.5, 1.5, 1.5, 1.5]
    assert totals(4).tolist() == [0.0] * 4
    assert totals(4, (0, 2, 0.1), (0, 2, 0.2), (0, 2, -0.3)).tolist() == [0.0] * 4  # no float residue


def test_empty_swarm_takes_the_first_blocks():
    assert choose_span(10, 4, []) == Span(0, 4)
    assert choose_span(3, 8, []) == Span(0, 3)  # a server larger than the model hosts all of it


def test_gaps_come_first_even_beside_a_weak_server():
    # [0:4) weakly covered, [4:6) uncovered, [6:10) strongly covered
    existing = [(Span(0, 4), 1.0), (Span(6, 10), 100.0)]
    assert choose_span(10, 2, existing) == Span(4, 6)
    assert choose_span(10, 3, existing) in (Span(3, 6), Span(4, 7))  # both hold both uncovered blocks
    # more uncovered blocks beat a lower covered bottleneck
    assert choose_start(np.array([0.0, 5.0, 0.0, 0.0, 9.0]), 2) == 2


def test_one_dominant_server_is_not_doubled():
    existing = [(Span(0, 6), 1000.0), (Span(6, 12), 1.0)]
    assert choose_span(12, 6, existing) == Span(6, 12)
    assert choose_span(12, 4, existing) == Span(6, 10)


def test_leximin_breaks_ties_on_the_second_weakest_block():
    # both windows have 1.0 as their weakest block; the right one's next block is weaker
    assert choose_start(np.array([1.0, 9.0, 9.0, 1.0, 2.0]), 2) == 3


def test_ties_keep_the_current_window():
    flat = np.full(8, 5.0)
    assert choose_start(flat, 4) == 0
    assert choose_start(flat, 4, current=3) == 3


def test_balanced_swarm_does_not_move():
    others = totals(8, (0, 4, 10.0), (4, 8, 10.0), (4, 8, 10.0))
    decision = plan_move(others, Span(0, 4), 10.0)
    assert not decision.move and "weakest" in decision.reason or "balanced" in decision.reason


def test_a_redundant_server_moves_into_the_gap_a_leaver_opened():
    # A and C hosted [0:2), B hosted [2:4); B left
    a, c = (Span(0, 2), 10.0), (Span(0, 2), 4.0)
    others_of_c = block_throughputs(4, [a])
    decision = plan_move(others_of_c, *c)
    assert decision.move and decision.target == Span(2, 4) and "uncovered" in decision.reason
    # once C's move is announced, A (fresh look at the DHT) sees no reason to follow: no herd
    others_of_a = block_throughputs(4, [(decision.target, 4.0)])
    assert not plan_move(others_of_a, *a).move


def test_the_only_server_of_its_blocks_does_not_open_a_new_gap():
    others = totals(6, (2, 6, 5.0))  # we host [0:2) alone; [2:6) has 5
    assert not plan_move(others, Span(0, 2), 50.0).move


def test_small_gains_are_not_worth_a_reload():
    # out of balance ([0:4) at 10, [4:8) at 20) but a slow-server move barely helps
    others = totals(8, (0, 4, 10.0), (4, 8, 19.0))
    settings = PlacementSettings(balance_quality=0.95, min_gain=0.5)
    move = plan_move(others, Span(4, 8), 1.0, settings)
    assert move.move and move.target == Span(0, 4) and move.gain == pytest.approx(1.0)
    # a fast server moving there would leave its old blocks at 12: the weakest touched block rises by 2 < 8 / 2
    others = totals(8, (0, 4, 10.0), (4, 8, 12.0))
    fast = plan_move(others, Span(4, 8), 8.0, settings)
    assert not fast.move and fast.target == Span(4, 8) and fast.gain == pytest.approx(2.0) and "gain" in fast.reason


def test_quality_gate():
    others = totals(8, (0, 4, 10.0), (4, 8, 10.5))
    assert 0.9 < quality(others + totals(8, (4, 8, 1.0))) < 0.95
    assert plan_move(others, Span(4, 8), 1.0, PlacementSettings(balance_quality=0.95)).move
    assert not plan_move(others, Span(4, 8), 1.0, PlacementSettings(balance_quality=0.8)).move


def _sorted(t: np.ndarray) -> tuple[float, ...]:
    return tuple(np.round(np.sort(t), 9))


@pytest.mark.parametrize("seed", range(5))
def test_moves_strictly_improve_the_sorted_block_throughputs_and_settle(seed):
    """Servers checking one at a time in random order: every move is a leximin improvement of the
    swarm, so rebalancing stops, and the bottleneck ends close to the even spread (60 servers from
    random spans: integral spans cost more here than with hundreds)."""
    rng = np.random.default_rng(seed)
    num_blocks, n = 40, 60
    lengths = rng.integers(3, 15, n)
    speeds = np.exp(rng.uniform(0, np.log(10), n))
    spans = [Span(int(s), int(s) + int(length)) for s, length in
             zip(rng.integers(0, num_blocks - lengths + 1), lengths, strict=True)]  # random, unbalanced
    current = block_throughputs(num_blocks, zip(spans, speeds, strict=True))
    moves = 0
    for _ in range(50):
        moved = False
        for i in rng.permutation(n):
            others = current.copy()
            others[spans[i].start : spans[i].end] -= speeds[i]
            decision = plan_move(others, spans[i], float(speeds[i]), PlacementSettings(balance_quality=1.0))
            if decision.move:
                new = others.copy()
                new[decision.target.start : decision.target.end] += speeds[i]
                assert _sorted(new) > _sorted(current)
                spans[i], current, moved, moves = decision.target, new, True, moves + 1
        if not moved:
            break
    assert not moved and moves > 0
    assert current.min() >= 0.85 * upper_bound(num_blocks, zip(speeds, lengths, strict=True))


def test_upper_bound_is_the_linear_programme_optimum():
    """max T s.t. Σ_i t_i x_ib ≥ T for every block, Σ_b x_ib ≤ mem_i, 0 ≤ x ≤ 1 (scipy's HiGHS)."""
    from scipy.optimize import linprog

    rng = np.random.default_rng(0)
    num_blocks, n = 7, 5
    speeds, mems = rng.uniform(1, 10, n), rng.integers(1, 9, n)
    # variables: x (n × blocks), then T; minimise -T
    c = np.r_[np.zeros(n * num_blocks), -1.0]
    a_ub, b_ub = [], []
    for b in range(num_blocks):  # T - Σ_i t_i x_ib ≤ 0
        row = np.zeros(n * num_blocks + 1)
        row[[i * num_blocks + b for i in range(n)]] = -speeds
        row[-1] = 1.0
        a_ub.append(row)
        b_ub.append(0.0)
    for i in range(n):  # Σ_b x_ib ≤ mem_i
        row = np.zeros(n * num_blocks + 1)
        row[i * num_blocks : (i + 1) * num_blocks] = 1.0
        a_ub.append(row)
        b_ub.append(float(mems[i]))
    result = linprog(c, A_ub=a_ub, b_ub=b_ub, bounds=[(0, 1)] * (n * num_blocks) + [(0, None)], method="highs")
    assert result.success
    assert upper_bound(num_blocks, zip(speeds, mems, strict=True)) == pytest.approx(-result.fun, rel=1e-6)


def test_of_standbys_claiming_one_hole_only_the_earliest_takes_it():
    a, b = (10.0, "QmA"), (10.2, "QmB")
    assert takeover_blocks(Span(2, 4), [2, 3], [(b, Span(2, 4))], a) == [2, 3]  # a claimed first
    assert takeover_blocks(Span(2, 4), [2, 3], [(a, Span(2, 4))], b) == []  # b backs off
    assert takeover_blocks(Span(2, 4), [2, 3], [((10.0, "QmB"), Span(2, 4))], a) == [2, 3]  # same time: peer id
    assert takeover_blocks(Span(2, 4), [3, 4], [(a, Span(2, 3))], b) == [3]  # what the earlier claim leaves
    assert takeover_blocks(Span(2, 4), [0, 1], [], a) == []  # not its blocks


def test_a_standby_that_took_over_moves_only_to_cover_more_of_the_hole():
    # the others without it: [0:1) and [3:4) live, [1:3) lost; it holds [2:4): [1:3) covers the hole
    assert rest_of_hole(totals(4, (0, 1, 100.0), (3, 4, 5.0)), Span(2, 4)) == Span(1, 3)
    assert rest_of_hole(totals(4, (0, 2, 100.0)), Span(2, 4)) is None  # the hole was its blocks only
    assert rest_of_hole(totals(4), Span(2, 4)) is None  # wider than its length: as good where it is
