"""``RowCombiner``: concurrent callers share one product and each gets exactly its own rows."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from stamen.client.combine import RowCombiner


def test_concurrent_callers_share_products_and_get_their_rows():
    weight = torch.randn(16, 40)
    combiner = RowCombiner()
    started = threading.Barrier(12)
    results, inputs = {}, {i: torch.randn(1 + i % 3, 16) for i in range(12)}

    def slow_product(rows):
        time.sleep(0.02)  # long enough for the other threads to queue behind the first product
        return rows @ weight

    def call(i):
        started.wait()
        results[i] = combiner(inputs[i], slow_product)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for i, x in inputs.items():
        torch.testing.assert_close(results[i], x @ weight)
    assert combiner.rows == sum(x.shape[0] for x in inputs.values())
    assert combiner.products < 12  # callers that arrived during a product shared the next one


def test_a_lone_caller_computes_at_once_and_errors_reach_every_caller():
    combiner = RowCombiner()
    x = torch.randn(2, 4)
    assert torch.equal(combiner(x, lambda rows: rows * 2), x * 2)
    assert combiner.products == 1

    def failing(rows):
        time.sleep(0.02)
        raise ValueError("bad head")

    errors = []

    def call():
        try:
            combiner(torch.randn(1, 4), failing)
        except ValueError as e:
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(errors) == 4
    with pytest.raises(ValueError):
        combiner(torch.randn(1, 4), failing)
    assert torch.equal(combiner(x, lambda rows: rows + 1), x + 1)  # still usable


def _flight(combiner, seconds, weight, key="first", landed=None):
    """One decoding step of this thread: in flight for ``seconds``, then its head product; its burst."""
    with combiner.flying(key):
        time.sleep(seconds)
        if landed is not None:
            landed.append(time.perf_counter())
        combiner(torch.randn(1, weight.shape[0]), lambda rows: rows @ weight)
    return combiner.take_burst()


def _two_threads(leader_trip, follower_trip, keys=("first", "first")):
    """Both threads learn a 0.4 s round trip (one flight each, one after the other), then send a
    step at the same moment; the leader's reply is back after ``leader_trip``, the follower's
    after ``follower_trip``. Returns the combiner, both bursts and when the leader's product ended."""
    combiner, weight = RowCombiner(), torch.randn(8, 8)
    learned, go = threading.Event(), threading.Barrier(2)
    out = {}

    def follower():
        learned.wait(5)
        _flight(combiner, 0.4, weight)
        go.wait(5)
        out["follower"] = _flight(combiner, follower_trip, weight, keys[1])

    thread = threading.Thread(target=follower)
    thread.start()
    _flight(combiner, 0.4, weight)
    learned.set()
    go.wait(5)  # the follower reaches the barrier once its learning flight's product is done
    products = combiner.products
    sent = time.perf_counter()
    out["leader"] = _flight(combiner, leader_trip, weight, keys[0])
    out["leader_s"] = time.perf_counter() - sent
    thread.join(5)
    return combiner, combiner.products - products, out


def test_a_leader_waits_for_a_flight_due_soon_and_both_share_one_product():
    """Two sessions out of step merge: the reply back first waits for the other, due within half a
    round trip, and both leave one product in one burst (their next steps move together)."""
    combiner, products, out = _two_threads(0.3, 0.4)
    assert products == 1 and combiner.merge_waits == 1
    assert out["leader"] is not None and out["leader"] == out["follower"] and out["leader"].size == 2
    assert out["leader_s"] >= 0.38  # it waited for the follower


def test_a_flight_due_late_is_not_waited_for():
    """One-sided: a flight due more than half a round trip away is not waited for (its own leader
    will find this thread's next step due soon instead)."""
    combiner, products, out = _two_threads(0.1, 0.4)
    assert products == 2 and combiner.merge_waits == 0
    assert out["leader"] is None and out["follower"] is None
    assert out["leader_s"] < 0.3  # did not wait for the follower's reply at 0.4 s


def test_a_leader_does_not_wait_for_flights_to_another_server():
    """As in the first case, but the two steps went to different first servers: no wait."""
    combiner, products, out = _two_threads(0.3, 0.4, keys=("a", "b"))
    assert products == 2 and combiner.merge_waits == 0
    assert out["leader_s"] < 0.38


def test_a_leader_waits_at_most_the_bound_for_its_burst():
    from stamen.client.combine import GROUP_WAIT_S
    from stamen.wire.messages import Burst

    combiner = RowCombiner()
    weight = torch.randn(8, 8)
    start = time.perf_counter()
    combiner(torch.randn(1, 8), lambda rows: rows @ weight, Burst(id="gone", size=3))
    assert GROUP_WAIT_S * 0.9 <= time.perf_counter() - start < GROUP_WAIT_S + 1.0
    assert combiner.take_burst() is None and combiner.group_misses == 1
