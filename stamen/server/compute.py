"""Where a server computes: decoding steps inline on the event loop, which runs on the main
thread; longer work (prefills, forwards, backwards, loading a new span) on a short-lived thread of
its own; one computation at a time either way (the backend's compute lock).

Why inline: a decoding step handed from the loop to another thread and back costs two thread
wake-ups per step and server of the route.

Why not everything inline: while the loop computes it answers nothing, and clients ban a server
that misses a ping (2 s); a 512-token prefill chunk takes seconds on a few CPU cores.

Why a fresh thread for long work, not a pool: PyTorch's CPU build uses libgomp, which counts the
threads of every live OpenMP team in the process; once they outnumber the CPUs, libgomp makes idle
workers sleep after ~100 spins, so each of the hundreds of small parallel regions of a decoding
step pays a futex wake-up. A thread that exits takes its team with it, so between long jobs the
loop's team is the only one.
Long jobs are made of few, large parallel regions, for which the shorter spinning costs nothing.

Threads per computation: decoding steps and long work use different torch thread counts (torch's
count is per thread: ``torch.set_num_threads`` on the loop's thread sets the decoding count, each
long-work thread sets its own at its start). A decoding step is a chain of matrix-vector products
that read every weight once. MKL runs each of them on one thread whatever torch's count, so the
blocks split them over the threads themselves (``models/kernels.py: project``), and a second
thread speeds up a step. Past a few threads, more add barriers, not speed; and a team waits at
every barrier when another process holds one of its cores. ``choose_decode_threads`` measures the
count at start, one server of a host at a time (``host_measurement_lock``, held over the load
too): servers measuring side by side compete for the same cores, so their multi-thread steps look
slower than they are. Other processes starting meanwhile (a client, daemons) can still skew a
measurement, so a server measures again once, when it is idle a while after going online, and
keeps the faster sample of the two for each count (a disturbed sample is only ever slower).
Prefills, forwards and backwards are compute-bound and keep every thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import tempfile
import threading
import time
from collections.abc import Iterator

import torch

from stamen.models import KVCache
from stamen.models.span import SpanModel
from stamen.types import Span


async def in_fresh_thread(fn, *args, threads: int | None = None):
    """Run ``fn(*args)`` on a new thread that exits afterwards (with its OpenMP team); await the result.
    ``threads``: the torch thread count of that thread (default: what torch gives a new thread)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, error) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def target() -> None:
        try:
            if threads is not None:
                torch.set_num_threads(threads)
            result, error = fn(*args), None
        except BaseException as e:
            result, error = None, e
        loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name="stamen-long-compute", daemon=True).start()
    return await future


def thread_counts(limit: int) -> list[int]:
    """Candidate thread counts up to ``limit``: 1, 2, 4, ... and ``limit`` itself."""
    counts, n = [], 1
    while n < limit:
        counts.append(n)
        n *= 2
    return counts + [max(1, limit)]


@contextlib.contextmanager
def host_measurement_lock(path: str | None = None, wait: bool = True) -> Iterator[bool]:
    """Hold a lock shared by every server process of this host (an ``flock`` on a file in the
    temporary directory), so that loads and speed measurements do not run side by side. Yields
    whether the lock is held: False only with ``wait=False`` while another process holds it.
    Without access to the file (another user's), yields True unlocked."""
    path = path or os.path.join(tempfile.gettempdir(), "stamen-measure.lock")
    try:
        f = open(path, "a")
    except OSError:
        yield True
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


DECODE_THREADS_TOLERANCE = 0.10
"""Fewer decoding threads win while within this fraction of the fastest count's time."""


def choose_decode_threads(model: SpanModel, dtype: torch.dtype, device: str | torch.device, limit: int,
                          tolerance: float = DECODE_THREADS_TOLERANCE, rounds: int = 4,
                          steps: int = 4) -> tuple[int, dict[int, float]]:
    """The torch thread count for decoding steps on this thread: the fewest threads whose
    single-token step (through up to 4 blocks of ``model``) is within ``tolerance`` of the fastest
    count's. Rounds interleave the counts so that drift of a shared machine hits each alike.
    Returns (count, fastest ms per step by count); leaves this thread at the chosen count. The
    fastest, not the median: servers starting together load and measure at the same time, and the
    least disturbed sample is the closest to the machine's speed.

    Within ``tolerance``, fewer threads win because in-process timing cannot see what they save in
    a swarm: cores left to the other processes, no team waiting at barriers (``server/compute.py``).
    """
    counts = thread_counts(limit)
    if torch.device(device).type != "cpu" or len(counts) == 1:
        torch.set_num_threads(limit)
        return limit, {}
    blocks = Span(model.span.start, min(model.span.end, model.span.start + 4))
    cache = KVCache(model.config, blocks.length, 1, steps + 2, dtype, device)
    token = torch.randn(1, 1, model.config.hidden_size, dtype=dtype, device=device)
    times: dict[int, list[float]] = {n: [] for n in counts}
    with torch.inference_mode():
        for _ in range(rounds):
            for n in counts:
                torch.set_num_threads(n)
                cache.length = 0
                model.step(token, cache, blocks=blocks)  # warm-up: forms the team, touches the weights
                for _ in range(steps):
                    start = time.perf_counter()
                    model.step(token, cache, blocks=blocks)
                    times[n].append(time.perf_counter() - start)
    ms = {n: 1000 * min(t) for n, t in times.items()}
    chosen = fewest_within(ms, tolerance)
    torch.set_num_threads(chosen)
    return chosen, ms


def fastest_of(*samples: dict[int, float]) -> dict[int, float]:
    """Per thread count, the fastest of several measurements (``choose_decode_threads``'s ms): a
    sample disturbed by other processes is only ever slower."""
    counts = {n for ms in samples for n in ms}
    return {n: min(ms[n] for ms in samples if n in ms) for n in sorted(counts)}


def fewest_within(ms_by_count: dict[int, float], tolerance: float) -> int:
    """The smallest thread count whose time is within ``tolerance`` (a fraction) of the fastest."""
    best = min(ms_by_count.values())
    return min(n for n, t in ms_by_count.items() if t <= best * (1 + tolerance))
