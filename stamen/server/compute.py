"""A server's event loop and all its torch work share the process's main thread.

Why one thread: PyTorch's CPU build uses libgomp, which counts the threads of every OpenMP team in
the process, the initial thread included. A team started by any other thread adds to that count, and
once it exceeds the CPUs libgomp makes every team's idle workers sleep after ~100 spins instead of
~300 000, so each of the hundreds of parallel regions in a decoding step pays a futex wake-up. On
the 2-core development machine, 16 blocks of the 246M Llama took 32.5 ms per decoding step on the
main thread alone and 41-43 ms as soon as a second thread had run a parallel region.

Why the loop's thread: a decoding step handed from the loop to another thread and back costs two
thread wake-ups (~0.2 ms a step on that machine, per server of the route). Computing inline costs
none; the loop does not read messages while a long prefill or forward runs, but the span's compute
is serial anyway, and messages wait in the libp2p daemon meanwhile.
"""

from __future__ import annotations

from concurrent.futures import Executor, Future


class InlineExecutor(Executor):
    """``submit`` runs the call at once on the calling thread (the loop's) and returns its done future,
    so ``loop.run_in_executor(InlineExecutor(), ...)`` computes inline."""

    def __init__(self):
        self._closed = False

    def submit(self, fn, /, *args, **kwargs) -> Future:
        if self._closed:
            raise RuntimeError("the compute executor is shut down")
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:
            future.set_exception(e)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True
