"""Timing and reporting helpers shared by every bench: a token clock for ``generate``, medians and
rounding, progress on stderr, and what machine a run was on."""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections.abc import Callable

import torch


class TokenClock:
    """A transformers-style streamer that timestamps every new token (``put``); ``times[0]`` is the
    prompt, put before any compute. ``on_put`` runs after the timestamp (e.g. to drop the page
    cache); its own time is excluded from the next gap."""

    def __init__(self, on_put: Callable[[], float | None] | None = None):
        self.times: list[float] = []
        self.starts: list[float] = []
        self.on_put = on_put
        self.extra: list[float] = []
        """What ``on_put`` returned at every put (e.g. the servers' compute so far)."""

    def put(self, value) -> None:
        now = time.perf_counter()
        self.times.append(now)
        if self.on_put is not None:
            self.extra.append(self.on_put())
        self.starts.append(time.perf_counter())

    def end(self) -> None:
        pass

    def gaps_ms(self) -> list[float]:
        """Time of every decode step after the first token (prefill excluded)."""
        return [1000 * (b - a) for a, b in zip(self.starts[1:], self.times[2:], strict=False)]

    def ms_per_token(self) -> float:
        """The median decode step (robust to the spikes of a shared machine)."""
        return statistics.median(self.gaps_ms())

    def first_token_ms(self) -> float:
        return 1000 * (self.times[1] - self.starts[0])


def run_together(jobs: list[Callable[[], object]], start_timeout: float = 60.0) -> list:
    """Run the callables at once, a thread each, started together (a barrier); their results in
    order, or the first error raised (after every thread ended)."""
    results: list = [None] * len(jobs)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def run(i: int, job: Callable[[], object]) -> None:
        try:
            barrier.wait(timeout=start_timeout)
            results[i] = job()
        except BaseException as e:  # re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def emit_report(report: dict, table: str, out, stem: str, json_only: bool) -> None:
    """A benchmark's result: ``out``/``stem``.json and .md when ``out`` is set; on stdout the JSON
    (``json_only``) or the Markdown table, with the JSON on stderr."""
    import json

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
        (out / f"{stem}.md").write_text(table + "\n")
    if json_only:
        print(json.dumps(report, indent=2))
    else:
        print(table)
        print(json.dumps(report), file=sys.stderr)


def median_or_nan(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rounded(x: float, digits: int = 2) -> float:
    return round(x, digits)


def say_to(json_only: bool) -> Callable[[str], None]:
    """Progress messages on stderr, or nothing when only JSON is printed."""
    def say(msg: str) -> None:
        if not json_only:
            print(msg, file=sys.stderr, flush=True)
    return say


def machine_info() -> dict:
    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average_at_end": [round(x, 2) for x in load], "cuda": torch.cuda.is_available()}
