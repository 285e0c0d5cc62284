"""Where a server computes: decoding steps inline on the event loop, which runs on the main
thread; longer work (prefills, forwards, backwards, loading a new span) on a short-lived thread of
its own; one computation at a time either way (the backend's compute lock).

Why inline: a decoding step handed from the loop to another thread and back costs two thread
wake-ups (~0.2 ms a step on the development machine, per server of the route).

Why not everything inline: while the loop computes it answers nothing, and clients ban a server
that misses a ping (2 s); a 512-token prefill chunk of the 246M Llama takes ~2.5 s on 2 cores.

Why a fresh thread for long work, not a pool: PyTorch's CPU build uses libgomp, which counts the
threads of every live OpenMP team in the process; once they outnumber the CPUs, libgomp makes idle
workers sleep after ~100 spins, so each of the hundreds of small parallel regions of a decoding
step pays a futex wake-up (on a Xeon development machine 16 blocks of the 246M Llama took 32.5 ms
per step with one team and 41-43 ms as soon as a second thread had run a parallel region). A
thread that exits takes its team with it, so between long jobs the loop's team is the only one.
Long jobs are made of few, large parallel regions, for which the shorter spinning costs nothing.
"""

from __future__ import annotations

import asyncio
import threading


async def in_fresh_thread(fn, *args):
    """Run ``fn(*args)`` on a new thread that exits afterwards (with its OpenMP team); await the result."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, error) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def target() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as e:
            result, error = None, e
        loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name="stamen-long-compute", daemon=True).start()
    return await future
