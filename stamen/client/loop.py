"""One long-lived asyncio loop per client process, on a daemon thread (hivemind's P2P replica
must stay on the loop that created it)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def get_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None:
            import uvloop  # hivemind depends on it; faster wake-ups than asyncio's default loop

            loop = uvloop.new_event_loop()
            threading.Thread(target=loop.run_forever, name="stamen-client-loop", daemon=True).start()
            _loop = loop
        return _loop


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the client loop and wait for its result from any other thread."""
    future = asyncio.run_coroutine_threadsafe(coro, get_loop())
    try:
        return future.result(timeout)
    except BaseException:
        future.cancel()
        raise
