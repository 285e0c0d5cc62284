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
