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


def test_a_leader_waits_briefly_for_steps_in_flight_and_for_its_burst():
    """Sessions out of step merge: a leader waits (at most ``GROUP_WAIT_S``) while another thread's
    decoding step is in flight, and both land in one product, which hands out a burst."""
    from stamen.client.combine import GROUP_WAIT_S
    from stamen.wire.messages import Burst

    combiner = RowCombiner()
    weight = torch.randn(8, 8)
    landed = threading.Event()
    bursts = {}

    def late():
        with combiner.flying():
            landed.wait(5)  # its reply is on the way
            time.sleep(GROUP_WAIT_S / 4)
            combiner(torch.randn(1, 8), lambda rows: rows @ weight)
            bursts["late"] = combiner.take_burst()

    thread = threading.Thread(target=late)
    thread.start()
    time.sleep(0.05)  # the late thread is in flight
    landed.set()
    combiner(torch.randn(1, 8), lambda rows: rows @ weight)
    bursts["leader"] = combiner.take_burst()
    thread.join(5)
    assert combiner.products == 1 and combiner.rows == 2
    assert bursts["leader"] == bursts["late"] and bursts["leader"].size == 2
    # a lone caller with a burst whose other members never come waits the bound, then goes on
    start = time.perf_counter()
    combiner(torch.randn(1, 8), lambda rows: rows @ weight, Burst(id="gone", size=3))
    assert GROUP_WAIT_S * 0.9 <= time.perf_counter() - start < GROUP_WAIT_S + 1.0
    assert combiner.take_burst() is None
