"""Worker processes for tests that need several hivemind peers: each is a forked OS process with its
own DHT (joined to the first worker's), running module-level functions ``fn(env, *args)`` that the
test sends it, so that averagers and optimizers live in separate processes as they do in a swarm."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from typing import Any

import torch
from hivemind import DHT

CALL_TIMEOUT = 60.0


def _serve(conn, initial_peers: list[str]) -> None:
    torch.set_num_threads(1)
    env: dict[str, Any] = {"dht": DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial_peers)}
    conn.send([str(a) for a in env["dht"].get_visible_maddrs()])
    try:
        while (message := conn.recv()) is not None:
            fn, args = message
            try:
                conn.send((True, fn(env, *args)))
            except Exception as e:
                conn.send((False, e))
    finally:
        for close in env.pop("closers", []):
            close()
        env["dht"].shutdown()


class Worker:
    """One worker process: ``call`` runs a module-level function there (``fn(env, *args)``, where
    ``env`` is the worker's dict: its DHT under "dht"; callables appended to ``env["closers"]`` run
    when it stops); ``send``/``recv`` split a call so that several workers run one concurrently."""

    def __init__(self, initial_peers: list[str]):
        self.conn, child = mp.get_context("fork").Pipe()
        # not a daemon: its DHT and averagers are processes of their own
        self.process = mp.get_context("fork").Process(target=_serve, args=(child, initial_peers))
        self.process.start()
        if not self.conn.poll(30):
            self.stop()
            raise RuntimeError("a worker process did not start its DHT")
        self.maddrs: list[str] = self.conn.recv()

    def send(self, fn: Callable, *args) -> None:
        self.conn.send((fn, args))

    def recv(self, timeout: float = CALL_TIMEOUT) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError("the worker did not answer")
        ok, value = self.conn.recv()
        if not ok:
            raise value
        return value

    def call(self, fn: Callable, *args, timeout: float = CALL_TIMEOUT) -> Any:
        self.send(fn, *args)
        return self.recv(timeout)

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(15)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


def start_workers(n: int) -> list[Worker]:
    """``n`` workers whose DHTs form one swarm (stopped again if one fails to start)."""
    first = Worker([])
    workers = [first]
    try:
        workers += [Worker(first.maddrs) for _ in range(n - 1)]
    except BaseException:
        stop_workers(workers)
        raise
    return workers


def stop_workers(workers: list[Worker]) -> None:
    for worker in workers:
        worker.stop()


def on_all(workers: list[Worker], fn: Callable, *args, timeout: float = CALL_TIMEOUT) -> list[Any]:
    """Run ``fn(env, *args)`` on every worker at once; the results in order."""
    for worker in workers:
        worker.send(fn, *args)
    return [worker.recv(timeout) for worker in workers]
