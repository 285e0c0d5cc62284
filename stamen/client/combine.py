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
every server) would stay apart, each group paying for its own iterations on every server. So a
leader also waits for the decoding steps of this process that are in flight to the same first
server (``flying``: sent, reply not yet back) and are *due soon*: each thread keeps its round trip
(an average), a flight is due at its send time plus its thread's round trip, and the leader waits
for the flights due within ``MERGE_SHARE`` of its own round trip (and a little slack past their
due time, never more than ``MERGE_WAIT_MAX_S``). Of two groups a round trip T apart in phase, the
second is due within T/2 of the first, or the first within T/2 of the second: one of them waits,
once, the other lands in its product, and from then on they move as one and nothing is waited
for again. The share is 3/4 rather than 1/2 because the averages lag (the first decoding steps
queue behind other sessions' prompts and overestimate the next round trips); if both groups find
the other due soon, the first to land waits and the second joins it, the same outcome. (A
symmetric rule, where every leader waits a short fixed bound for whatever is in flight, makes
both groups wait in turn: neither gains on the other, and they stay apart.) A lone session never
waits.
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


MERGE_SHARE = 0.75
"""A leader waits for the flights (to its first server) due within this share of its round trip."""
MERGE_SLACK = 0.25
"""... and, past the latest of their due times, at most this share of its round trip more."""
MERGE_WAIT_MAX_S = 0.25
"""The longest a leader waits for flights, whatever the round trips say."""
_RTT_WEIGHT = 0.5
"""Weight of the newest round trip in a thread's average."""


class _Call:
    __slots__ = ("rows", "group", "result", "error", "done", "lead", "burst", "key", "rtt")

    def __init__(self, rows: torch.Tensor, group: str | None):
        self.rows, self.group, self.result, self.error = rows, group, None, None
        self.done = threading.Event()
        self.lead = False
        self.burst: Burst | None = None
        self.key: str | None = None
        """The first server of the caller's step, when it came from a flight."""
        self.rtt: float | None = None
        """The caller's round trip (average), when known."""


class _Flight:
    """A decoding step in flight: when it left, the round trip its thread usually sees, where it went."""

    __slots__ = ("sent", "rtt", "key")

    def __init__(self, sent: float, rtt: float | None, key: str | None):
        self.sent, self.rtt, self.key = sent, rtt, key


class RowCombiner:
    """Runs ``fn`` over the rows (dimension 0) of concurrent callers at once; each gets its own rows back."""

    def __init__(self):
        self._cond = threading.Condition()
        self._queue: list[_Call] = []
        self._running = False
        self._local = threading.local()
        self._flights: dict[int, _Flight] = {}
        self._rtt: float | None = None
        """Round trip of decoding steps, averaged over every thread (for threads without their own yet)."""
        self.merge_waits = 0
        """Products whose leader found flights due soon to wait for (members of its own group a
        little behind, or another group merging in)."""
        self.products = 0
        self.group_misses = 0
        """Products whose leader stopped waiting before every member of its burst queued."""
        self.rows = 0
        """Products computed and rows they covered (rows / products: the mean rows per product)."""

    @contextlib.contextmanager
    def flying(self, key: str | None = None):
        """Around a decoding step's round trip (``key``: its first server): a leader waits for the
        steps in flight that are due soon (see the module's docstring)."""
        flight = _Flight(time.monotonic(), getattr(self._local, "rtt", None), key)
        with self._cond:
            self._flights[id(flight)] = flight
            self._local.flight = flight
        try:
            yield
        finally:
            with self._cond:
                # not landed in a product (an error, or a head outside the combiner)
                if getattr(self._local, "flight", None) is flight:
                    self._local.flight = None
                    self._flights.pop(id(flight), None)
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
            flight = getattr(self._local, "flight", None)
            if flight is not None:  # this thread's step is back: no longer in flight
                self._local.flight = None
                self._flights.pop(id(flight), None)
                took = time.monotonic() - flight.sent
                rtt = getattr(self._local, "rtt", None)
                self._local.rtt = took if rtt is None else (1 - _RTT_WEIGHT) * rtt + _RTT_WEIGHT * took
                self._rtt = took if self._rtt is None else (1 - _RTT_WEIGHT) * self._rtt + _RTT_WEIGHT * took
                call.key = flight.key
            call.rtt = getattr(self._local, "rtt", None)
            call.lead = not self._running
            self._running = True
            self._cond.notify_all()
        if not call.lead:
            call.done.wait()
        if call.lead:
            self._lead(fn, expect, call)
        self._local.burst = call.burst
        if call.error is not None:
            raise call.error
        return call.result

    def _lead(self, fn: Callable[[torch.Tensor], torch.Tensor], expect: Burst | None, lead: _Call) -> None:
        with self._cond:
            start = time.monotonic()
            burst_deadline = start + GROUP_WAIT_S
            merge_deadline, awaited = self._due_soon(lead, start)
            self.merge_waits += bool(awaited)
            while True:
                now = time.monotonic()
                deadlines = []
                missing = expect is not None and sum(c.group == expect.id for c in self._queue) < expect.size
                if missing and now < burst_deadline:
                    deadlines.append(burst_deadline)
                if now < merge_deadline and any(id(f) in self._flights for f in awaited):
                    deadlines.append(merge_deadline)
                if not deadlines:
                    self.group_misses += missing
                    break
                self._cond.wait(max(deadlines) - now)
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

    def _due_soon(self, lead: _Call, now: float) -> tuple[float, list[_Flight]]:
        """The flights a leader waits for (those to its first server due within ``MERGE_SHARE`` of
        its round trip) and until when: past the latest due time by ``MERGE_SLACK`` of the round
        trip, within ``MERGE_WAIT_MAX_S``."""
        rtt = lead.rtt if lead.rtt is not None else self._rtt
        if rtt is None or not self._flights:
            return now, []
        awaited, latest = [], now
        for f in self._flights.values():
            if lead.key is not None and f.key is not None and f.key != lead.key:
                continue
            due = f.sent + (f.rtt if f.rtt is not None else rtt)
            if due - now <= MERGE_SHARE * rtt and due + MERGE_SLACK * rtt > now:
                awaited.append(f)
                latest = max(latest, due)
        if not awaited:
            return now, []
        return min(now + MERGE_WAIT_MAX_S, latest + max(GROUP_WAIT_S, MERGE_SLACK * rtt)), awaited
