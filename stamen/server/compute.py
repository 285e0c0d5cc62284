"""A server's torch work runs on the process's main thread; its event loop runs on another.

Why: PyTorch's CPU build uses libgomp, which counts the threads of every OpenMP team in the
process, the initial thread included. A team started by any other thread adds to that count, and
once it exceeds the CPUs libgomp makes every team's idle workers sleep after ~100 spins instead of
~300 000, so each of the hundreds of parallel regions in a decoding step pays a futex wake-up. On
the 2-core development machine, 16 blocks of the 246M Llama took 32.5 ms per decoding step on the
main thread alone and 41-43 ms as soon as a second thread had run a parallel region (decoding on
the event loop and prefills on a compute thread, as servers did). So servers keep one OpenMP team:
the main thread serves ``MainThreadExecutor`` and nothing else computes, and ``limit_omp_to_one_thread``
keeps the loop thread's small tensor work (decoding and checking messages) from starting a team.
"""

from __future__ import annotations

import ctypes
import queue
from concurrent.futures import Executor, Future


class MainThreadExecutor(Executor):
    """``submit`` from any thread; ``serve`` runs the work on the calling (main) thread until
    ``shutdown``."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False

    def submit(self, fn, /, *args, **kwargs) -> Future:
        if self._closed:
            raise RuntimeError("the compute executor is shut down")
        future: Future = Future()
        self._queue.put((future, fn, args, kwargs))
        return future

    def serve(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=0.5)  # wakes up for signal handlers
            except queue.Empty:
                continue
            if item is None:
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:
                future.set_exception(e)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True
        self._queue.put(None)


def limit_omp_to_one_thread() -> None:
    """Make OpenMP parallel regions started by the calling thread run on that thread alone (the
    thread's own OpenMP setting; torch's and MKL's settings, and other threads', are unchanged)."""
    import torch

    torch.get_num_threads()  # torch sets this thread's OpenMP threads on first use; do it before us
    for line in open("/proc/self/maps"):
        path = line.split()[-1]
        if "libgomp" in path:
            ctypes.CDLL(path).omp_set_num_threads(1)
            return
