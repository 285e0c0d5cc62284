"""One long-lived asyncio loop per client process, on a daemon thread (hivemind's P2P replica
must stay on the loop that created it)."""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def get_loop() -> asyncio.AbstractEventLoop:
    global _loop, _thread
    with _lock:
        if _loop is None:
            import uvloop  # hivemind depends on it; faster wake-ups than asyncio's default loop

            loop = uvloop.new_event_loop()
            _thread = threading.Thread(target=loop.run_forever, name="stamen-client-loop", daemon=True)
            _thread.start()
            _loop = loop
        return _loop


def on_loop_thread() -> bool:
    """Whether the caller runs on the client loop's thread (where ``run`` would wait for itself)."""
    return _thread is not None and threading.current_thread() is _thread


def is_running() -> bool:
    """Whether the client loop exists and runs (not before its first use, not after ``shutdown``)."""
    return _loop is not None and _loop.is_running()


def shutdown(timeout: float = 5.0) -> None:
    """Cancel what still runs on the client loop, let it finish, stop the loop and close it (a later
    ``get_loop`` starts a new one). Runs at interpreter exit: tasks left pending on a loop that
    simply stops are destroyed during finalization, each with a "Task was destroyed but it is
    pending" warning on stderr."""
    global _loop, _thread
    with _lock:
        loop, thread, _loop, _thread = _loop, _thread, None, None
    if loop is None or loop.is_closed():
        return

    async def cancel_the_rest() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    try:
        asyncio.run_coroutine_threadsafe(cancel_the_rest(), loop).result(timeout + 1)
    except Exception:  # noqa: BLE001 (a loop that does not answer in time is closed as it is)
        pass
    loop.call_soon_threadsafe(loop.stop)
    if thread is not None:
        thread.join(timeout)
    if not loop.is_running():
        loop.close()


atexit.register(shutdown)


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the client loop and wait for its result from any other thread."""
    future = asyncio.run_coroutine_threadsafe(coro, get_loop())
    try:
        return future.result(timeout)
    except BaseException:
        future.cancel()
        raise
