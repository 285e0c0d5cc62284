"""A cross-process timeline of decoding steps, off unless ``STAMEN_TRACE_DIR`` is set.

Every process (client, servers) appends ``(monotonic ns, event, step)`` marks in memory and writes
them to ``$STAMEN_TRACE_DIR/<role>-<pid>.jsonl`` at exit; CLOCK_MONOTONIC is shared by all
processes of one machine, so the files merge into one timeline (``stamen.bench.timeline``).
"""

from __future__ import annotations

import atexit
import json
import os
import time

_DIR = os.environ.get("STAMEN_TRACE_DIR")
_events: list[tuple[int, str, int]] | None = [] if _DIR else None
_role = "proc"


def enabled() -> bool:
    return _events is not None


def enable(directory: str) -> None:
    """Start marking in this process (as if ``STAMEN_TRACE_DIR`` had been set at import)."""
    global _DIR, _events
    if _events is None:
        _events = []
        atexit.register(flush)
    _DIR = directory


def disable() -> None:
    """Write what was marked and stop marking."""
    global _events
    flush()
    _events = None


def set_role(role: str) -> None:
    global _role
    _role = role


def mark(event: str, step: int = -1) -> None:
    if _events is not None:
        _events.append((time.monotonic_ns(), event, step))


def flush() -> None:
    if _events:
        os.makedirs(_DIR, exist_ok=True)
        with open(os.path.join(_DIR, f"{_role}-{os.getpid()}.jsonl"), "a") as f:
            for t, event, step in _events:
                f.write(json.dumps([t, event, step]) + "\n")
        _events.clear()


if _events is not None:
    atexit.register(flush)


def load(directory: str) -> list[tuple[int, str, str, int]]:
    """Every process's marks in ``directory``, merged: ``(ns, role, event, step)`` in time order."""
    events = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".jsonl"):
            role = name.rsplit("-", 1)[0]
            with open(os.path.join(directory, name)) as f:
                events += [(t, role, event, step) for t, event, step in map(json.loads, f)]
    return sorted(events)
