"""The one retry policy: which failures are network faults worth retrying, and the backoff."""

from __future__ import annotations

import random
from dataclasses import dataclass

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


@dataclass
class RetryBudget:
    """Retries left to one piece of work (a sub-batch, a microbatch): network faults and re-uploads
    together; ``spend`` raises the error once they are used up."""

    max_retries: int
    used: int = 0

    def spend(self, error: BaseException) -> None:
        if self.used >= self.max_retries:
            raise error
        self.used += 1


def backoff_delay(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base · 2^attempt))."""
    return random.uniform(0, min(cap, base * 2**attempt))
