"""Concurrent calls that share one computation: the LM head of the decoding steps of several
sessions generating at once in threads of one process (the HTTP API, or a program's threads).

A decoding step's LM head multiplies a few hidden states by the whole head weight (32 000 × 1024
on the 246M Llama: 8.3 ms for one row here, 25 ms for eight). Threads that need it at the same
time join one product: the first caller leads and computes for every caller queued by then;
callers that arrive while it computes queue for the next product, led by the first of them. A
lone caller computes its own at once, as before.

Keeping sessions in step: replies that left a server's iteration together carry a ``Burst``
(``wire/messages.py``). A leader whose own reply came in a burst waits (at most
``GROUP_WAIT_S``) until the other members of that burst have queued, so their product is one and
their next steps leave together, again as a burst (``take_burst``), which the first
server takes into one iteration.

Merging groups: sessions that fell out of step (two groups, one an iteration behind the other at
every server) would stay apart. So a leader also waits, within the same bound, for the decoding
steps of this process still in flight (``flying``: sent, reply not yet back): a group an
iteration behind joins the product, and from then on the two move as one. A group too far behind
to arrive within the bound still gains on the one that waited, so they meet within a few tokens;
once together, nothing is waited for.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable

import torch

from stamen.wire.messages import Burst

GROUP_WAIT_S = 0.010
"""Longest a leader waits for the other members of its reply's burst (they were answered
together and are being decoded by their threads)."""


class _Call:
    __slots__ = ("rows", "group", "result", "error", "done", "lead", "burst")

    def __init__(self, rows: torch.Tensor, group: str | None):
        self.rows, self.group, self.result, self.error = rows, group, None, None
        self.done = threading.Event()
        self.lead = False
        self.burst: Burst | None = None


class RowCombiner:
    """Runs ``fn`` over the rows (dimension 0) of concurrent callers at once; each gets its own rows back."""

    def __init__(self):
        self._cond = threading.Condition()
        self._queue: list[_Call] = []
        self._running = False
        self._local = threading.local()
        self._flying = 0
        self.products = 0
        self.group_misses = 0
        """Products whose leader stopped waiting before every member of its burst queued."""
        self.rows = 0
        """Products computed and rows they covered (rows / products: the mean rows per product)."""

    @contextlib.contextmanager
    def flying(self):
        """Around a decoding step's round trip: a leader waits (briefly) for the steps in flight."""
        with self._cond:
            self._flying += 1
            self._local.flying = True
        try:
            yield
        finally:
            with self._cond:
                if self._local.flying:  # not landed in a product (an error, or a head outside the combiner)
                    self._local.flying = False
                    self._flying -= 1
                    self._cond.notify_all()

    def take_burst(self) -> Burst | None:
        """The burst of this thread's last product, if it was shared (the steps its callers send
        next leave together); forgotten once taken."""
        burst, self._local.burst = getattr(self._local, "burst", None), None
        return burst

    def __call__(self, rows: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor],
                 expect: Burst | None = None) -> torch.Tensor:
        """``fn(rows)``, computed with the rows of callers queued at the same time. ``expect``: the
        burst this caller's input came in; a leader waits briefly for its other members."""
        call = _Call(rows, expect.id if expect is not None else None)
        with self._cond:
            self._queue.append(call)
            if getattr(self._local, "flying", False):  # this thread's step is back: no longer in flight
                self._local.flying = False
                self._flying -= 1
            call.lead = not self._running
            self._running = True
            self._cond.notify_all()
        if not call.lead:
            call.done.wait()
        if call.lead:
            self._lead(fn, expect)
        self._local.burst = call.burst
        if call.error is not None:
            raise call.error
        return call.result

    def _lead(self, fn: Callable[[torch.Tensor], torch.Tensor], expect: Burst | None) -> None:
        with self._cond:
            deadline = time.monotonic() + GROUP_WAIT_S
            while (expect is not None and sum(c.group == expect.id for c in self._queue) < expect.size) \
                    or self._flying:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.group_misses += 1
                    break
                self._cond.wait(left)
            batch, self._queue = self._queue, []
        burst = Burst(id=uuid.uuid4().hex, size=len(batch)) if len(batch) > 1 else None
        try:
            out = fn(batch[0].rows if len(batch) == 1 else torch.cat([c.rows for c in batch]))
            parts = [out] if len(batch) == 1 else out.split([c.rows.shape[0] for c in batch])
            for c, part in zip(batch, parts, strict=True):
                c.result, c.burst = part, burst
        except BaseException as e:  # every caller of the product gets its error
            for c in batch:
                c.error = e
        with self._cond:
            self.products += 1
            self.rows += sum(c.rows.shape[0] for c in batch)
            nxt = self._queue[0] if self._queue else None
            if nxt is None:
                self._running = False
            else:
                nxt.lead = True  # the next product is led by the first caller that queued for it
        for c in batch:
            c.done.set()
        if nxt is not None:
            nxt.done.set()
