"""The one retry policy: which failures are network faults worth retrying, and the backoff."""

from __future__ import annotations

import random

from stamen.errors import (
    RemoteCallError,
    ServerFullError,
    SessionClosedError,
    UnknownSessionError,
    WrongBlocksError,
)

RETRYABLE = (RemoteCallError, ServerFullError, SessionClosedError, UnknownSessionError, WrongBlocksError)
"""A lost connection, a timeout, a crashed or restarted server (its sessions are gone), a server
that filled up or moved to other blocks since we read its record. Anything else (TypeError,
ValueError, InvalidRequestError, SessionLengthError...) is a bug or bad input and is raised at once.
Of these, only a server that is full is not a fault: it is routed around or waited for, never
banned (``InferenceSession._open_route``); a server late on a step is a fault only when it also
fails a ping (``InferenceSession._reply``)."""


def is_retryable(error: BaseException) -> bool:
    return isinstance(error, RETRYABLE)


def backoff_delay(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base · 2^attempt))."""
    return random.uniform(0, min(cap, base * 2**attempt))
