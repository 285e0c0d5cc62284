"""Iteration-level batching of inference steps across sessions (``stamen server``, on by default;
``--no-batching`` turns it off).

Every inference step of every session goes to one ``StepBatcher``. Its loop takes what is ready
(it never waits for a batch to fill), runs it as one ``SpanModel.step_batch`` (each weight read
once for all of them; attention per session over its own cache) and hands each session its output.
Steps that arrive while an iteration computes wait for the next one.

What one iteration takes (``_take``), in rounds over the peers that own queued steps, starting one
peer further each iteration (round-robin admission, so one peer's many sessions cannot crowd out
another peer's one):

1. decoding steps (at most ``DECODE_ROWS`` rows: a few sequences × one new token), one per peer
   and round, up to ``max_batch_tokens`` rows in all;
2. then prefills, one per peer and round, in chunks that fill the rest of the budget (at most
   ``PREFILL_SHARE_WHILE_DECODING`` of it when the iteration carries decoding steps): a long
   prompt takes several iterations, and the decoding steps of other sessions go on between its
   chunks instead of waiting for the whole prompt. A chunk's positions attend to the chunks before
   it through the session's cache, so chunked and whole prefills give the same outputs.

An iteration of at most ``inline_tokens`` rows (decoding) runs inline on the event loop, like a
lone decoding step did before batching; a larger one (a prefill chunk) on a short-lived thread
with every torch thread (``server/compute.py``). Both take the backend's compute lock, so
iterations, stateless forwards and backwards run one at a time.

A step whose iteration fails (a bug, an allocator refusal) is rerun alone, each session of the
iteration from where it was, so one session's failure is that session's error only.

Bursts (``wire.messages.Burst``): the steps that finish in one iteration and go the same way (pushed
to the same next server, or replied to the same client) leave tagged as one burst. An iteration
that holds some members of a burst waits for the rest, at most ``BURST_WAIT_S`` after the first
arrived: they were sent together and are on the wire, so sessions that move in step stay in step
down the chain. Untagged steps never wait; a sender whose bursts keep missing members is no longer
waited for (``_trusted``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from stamen import trace
from stamen.errors import ServerBusyError, SessionClosedError
from stamen.models.span import StepPart
from stamen.wire.messages import Burst

logger = logging.getLogger(__name__)

DECODE_ROWS = 8
"""Steps of at most this many rows (sequences × new tokens) count as decoding steps."""
BURST_WAIT_S = 0.010
"""Longest an iteration waits for the members of a burst (``Burst``) it holds some of: they were
sent together and are on their way, a few hundred microseconds behind the first."""
PREFILL_SHARE_WHILE_DECODING = 0.25
"""While sessions are decoding here (an iteration carries decoding steps, or one did within
``DECODING_HOLD_S``), prefill chunks get at most this share of ``max_batch_tokens`` rows per
iteration: a decoding step waits for the iteration in progress and then for its own, so both stay
short (64 rows of the default 256 through the 246M Llama's 5-block span: about 60 ms on 2 CPU
cores, against 25 ms for 8 decoding steps alone). A prefill with nobody decoding still runs in
chunks of the whole budget."""
DECODING_HOLD_S = 1.0
"""How long after its last decoding step a server expects more (a session's next token is due
within a round trip of the route)."""
SETTLE_ROUNDS = 6
"""Before an iteration, the loop runs at most this many rounds of its other work (reading the steps
that already arrived), stopping after two rounds that brought none: cheap (microseconds), and it
never waits for steps that have not arrived. Skipped while only one session is open here."""


@dataclass(eq=False)
class StepWork:
    """One session's inference step, queued for the iterations that compute it."""

    session: object
    """The backend's ``Session``: its cache, deep prompts, adapters and span."""
    hidden: torch.Tensor
    """(B, T, H): the step's new positions."""
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    hypo_ids: torch.Tensor | None
    owner: str
    future: asyncio.Future
    burst: Burst | None = None
    """The burst this step arrived in."""
    push_peer: str | None = None
    """The server its output is pushed to (None: it goes back to the client)."""
    sender: str = ""
    """The peer the step came from (the session's owner, or the server that pushed it)."""
    done: int = 0
    """Positions computed so far (chunks of a prefill)."""
    outputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def rows_left(self) -> int:
        return self.hidden.shape[0] * (self.hidden.shape[1] - self.done)

    def part(self, positions: int) -> StepPart:
        """The next ``positions`` of this step as a part of an iteration."""
        s, cut = self.session, slice(self.done, self.done + positions)
        return StepPart(self.hidden[:, cut], s.cache,
                        None if self.attention_mask is None else self.attention_mask[:, cut],
                        None if self.position_ids is None else self.position_ids[:, cut],
                        s.prompts, s.adapters)


@dataclass
class BatchStats:
    """What the batcher did (``rpc_info`` and the metrics report it)."""

    iterations: int = 0
    steps: int = 0
    """Session steps (or prefill chunks) computed, summed over iterations: steps / iterations is
    the mean batch size."""
    chunks: int = 0
    """Prefill chunks computed (parts of a step that did not fit one iteration)."""
    burst_waits: int = 0
    """Iterations that waited for members of a burst on the wire."""
    burst_misses: int = 0
    """Bursts whose wait ended before every member arrived."""


class StepBatcher:
    """Queues the inference steps of a ``SpanBackend``'s sessions and computes them in iterations."""

    def __init__(self, backend, max_batch_tokens: int, inline_tokens: int, max_peer_queued: int,
                 observe: Callable[[int, int], None] | None = None):
        self.backend = backend
        self.max_batch_tokens = max_batch_tokens
        self.inline_tokens = inline_tokens
        self.max_peer_queued = max_peer_queued
        self.observe = observe
        """Called with (steps, rows) after every iteration (the server's metrics)."""
        self.stats = BatchStats()
        self._queues: dict[str, deque[StepWork]] = {}
        self._turn = 0
        self._decoding_until = 0.0
        """Until when sessions count as decoding here (``DECODING_HOLD_S`` after the last decoding step)."""
        self._queued_sum, self._queued_samples = 0, 0
        self._bursts: dict[str, list] = {}
        """Bursts with members here: id -> [size, members arrived, deadline]."""
        self._past_bursts: OrderedDict[str, None] = OrderedDict()
        """Bursts recently waited for: a member arriving after its burst's iteration does not wait."""
        self._burst_record: dict[str, list[int]] = {}
        """Per sending peer: [bursts, missed]; a peer whose bursts keep missing members is not waited for."""
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        """Steps waiting for (the rest of) their computation."""
        return sum(len(q) for q in self._queues.values())

    async def run(self, work: StepWork) -> torch.Tensor:
        """Queue a step; its output (B, T, H) once its last chunk is computed."""
        queue = self._queues.setdefault(work.owner, deque())
        if len(queue) >= self.max_peer_queued:
            raise ServerBusyError(f"server busy: {len(queue)} steps of {work.owner[-6:] or 'this peer'} are "
                                  f"queued, at most {self.max_peer_queued}", retry_after=0.1)
        queue.append(work)
        if work.burst is not None and work.burst.id not in self._past_bursts and self._trusted(work.sender):
            entry = self._bursts.get(work.burst.id)
            if entry is None:
                entry = self._bursts[work.burst.id] = [work.burst.size, 0,
                                                       asyncio.get_running_loop().time() + BURST_WAIT_S, work.sender]
            entry[1] += 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop())
        self._wake.set()
        return await work.future

    def take_mean_queued(self) -> float:
        """Steps left waiting by the iterations since the last call (then reset), on average: the
        steps that did not fit the iteration they could have joined (the server's load)."""
        mean = self._queued_sum / self._queued_samples if self._queued_samples else 0.0
        self._queued_sum, self._queued_samples = 0, 0
        return mean

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for queue in self._queues.values():
            for work in queue:
                if not work.future.done():
                    work.future.set_exception(SessionClosedError("the server is shutting down"))
        self._queues.clear()

    # --- the loop ---

    async def _loop(self) -> None:
        while True:
            if not self._queued_any():
                self._wake.clear()
                await self._wake.wait()
            if len(self.backend.sessions) > 1:  # with one session open, no other step can join
                await self._settle()
            await self._await_bursts()
            batch = self._take()
            self._queued_sum += self.queued - len(batch)  # left waiting for a later iteration
            self._queued_samples += 1
            if batch:
                await self._iterate(batch)

    def _queued_any(self) -> bool:
        return any(self._queues.values())

    async def _settle(self) -> None:
        """Let the loop read steps that already arrived (a burst of pushes from the previous
        server) so they join this iteration; stops after two rounds in a row that brought none."""
        idle = 0
        for _ in range(SETTLE_ROUNDS):
            before = self.queued
            await asyncio.sleep(0)
            idle = idle + 1 if self.queued == before else 0
            if idle == 2:  # a frame on its way takes a round or two from the socket to the queue
                return

    async def _await_bursts(self) -> None:
        """Wait (at most ``BURST_WAIT_S`` after each burst's first member) for the rest of the
        bursts whose members are here: they left their sender together and are on the wire."""
        loop = asyncio.get_running_loop()
        waited = False
        while True:
            now = loop.time()
            waiting = [e[2] for e in self._bursts.values() if e[1] < e[0] and e[2] > now]
            if not waiting:
                break
            waited = True
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), min(waiting) - now)
            except TimeoutError:
                pass
            await self._settle()
        self.stats.burst_waits += waited
        for burst_id in list(self._bursts):  # this iteration takes them: later members do not wait
            size, arrived, _, sender = self._bursts.pop(burst_id)
            record = self._burst_record.setdefault(sender, [0, 0])
            record[0] += 1
            record[1] += arrived < size
            self.stats.burst_misses += arrived < size
            if record[0] >= 64:  # a moving window: halve the history
                record[0], record[1] = record[0] // 2, record[1] // 2
            self._past_bursts[burst_id] = None
        while len(self._burst_record) > 4096:
            self._burst_record.pop(next(iter(self._burst_record)))
        while len(self._past_bursts) > 4096:
            self._past_bursts.popitem(last=False)

    def _trusted(self, sender: str) -> bool:
        """Whether bursts of ``sender`` are waited for: not once most of its recent ones missed
        members (a peer announcing bursts it does not send would delay every iteration)."""
        bursts, missed = self._burst_record.get(sender, (0, 0))
        return missed < 4 or 2 * missed < bursts

    def _take(self) -> list[tuple[StepWork, int]]:
        """(work, positions) of the next iteration: decoding steps first, then prefill chunks,
        each in rounds over the peers (see the module's docstring)."""
        for owner in [o for o, q in self._queues.items() if not q]:
            del self._queues[owner]
        owners = list(self._queues)
        if not owners:
            return []
        start = self._turn % len(owners)
        self._turn += 1
        order = owners[start:] + owners[:start]
        budget, taken = self.max_batch_tokens, []
        picked: set[int] = set()
        for decoding in (True, False):
            if not decoding and (taken or asyncio.get_running_loop().time() < self._decoding_until):
                # decoding steps wait for this iteration (or will arrive during it): prefills get a share
                budget = min(budget, max(DECODE_ROWS, int(self.max_batch_tokens * PREFILL_SHARE_WHILE_DECODING)))
            progress = True
            while progress and budget > 0:
                progress = False
                for owner in order:
                    work = next((w for w in self._queues[owner] if id(w) not in picked and self._live(w)
                                 and (w.rows_left <= DECODE_ROWS) == decoding), None)
                    if work is None:
                        continue
                    batch = work.hidden.shape[0]
                    positions = min(work.hidden.shape[1] - work.done, budget // batch)
                    if positions <= 0:
                        if taken:
                            continue
                        positions = 1  # a lone step wider than the budget still moves
                    taken.append((work, positions))
                    picked.add(id(work))
                    budget -= batch * positions
                    progress = True
        self._drop_dead()
        return taken

    @staticmethod
    def _live(work: StepWork) -> bool:
        return not work.future.done() and not work.session.closed

    def _drop_dead(self) -> None:
        """Forget steps whose caller went away or whose session closed meanwhile."""
        for queue in self._queues.values():
            for work in [w for w in queue if not self._live(w)]:
                queue.remove(work)
                if not work.future.done():
                    work.future.set_exception(SessionClosedError(f"session {work.session.id} was closed"))

    async def _iterate(self, batch: list[tuple[StepWork, int]]) -> None:
        rows = sum(w.hidden.shape[0] * n for w, n in batch)
        backend = self.backend
        try:
            if rows <= self.inline_tokens:
                outs = await backend.run_inline(self._compute, batch)
            else:
                outs = await backend.run_long(self._compute, batch)
        except Exception as e:
            if len(batch) == 1:
                self._fail(batch[0][0], e)
                return
            logger.warning("an iteration of %d steps failed (%r): computing them one by one", len(batch), e)
            for item in batch:
                await self._iterate([item])
            return
        stats = self.stats
        stats.iterations += 1
        if any(w.hidden.shape[0] * w.hidden.shape[1] <= DECODE_ROWS for w, _ in batch):
            self._decoding_until = asyncio.get_running_loop().time() + DECODING_HOLD_S
        stats.steps += len(batch)
        if self.observe is not None:
            self.observe(len(batch), rows)
        self._tag_bursts([w for (w, n) in batch if w.done + n >= w.hidden.shape[1]])
        for (work, positions), out in zip(batch, outs, strict=True):
            work.outputs.append(out)
            work.done += positions
            if work.done < work.hidden.shape[1]:
                stats.chunks += 1
                continue
            queue = self._queues.get(work.owner)
            if queue is not None and work in queue:
                queue.remove(work)
            if not work.future.done():
                work.future.set_result(work.outputs[0] if len(work.outputs) == 1 else torch.cat(work.outputs, 1))

    @staticmethod
    def _tag_bursts(finished: list[StepWork]) -> None:
        """The steps that finish in one iteration leave together: those pushed to the same server,
        and those replied to the same client, each get a burst (``session.out_bursts``)."""
        tag = uuid.uuid4().hex[:16]
        groups: dict[tuple[str, str], list[StepWork]] = {}
        for w in finished:
            key = ("push", w.push_peer) if w.push_peer is not None else ("reply", w.owner)
            groups.setdefault(key, []).append(w)
        for (kind, whom), members in groups.items():
            burst = Burst(id=f"{tag}.{kind}.{whom[-12:]}", size=len(members)) if len(members) > 1 else None
            for w in members:
                w.session.out_bursts = (burst, None) if kind == "push" else (None, burst)

    def _fail(self, work: StepWork, error: Exception) -> None:
        queue = self._queues.get(work.owner)
        if queue is not None and work in queue:
            queue.remove(work)
        if not work.future.done():
            work.future.set_exception(error)

    def _compute(self, batch: list[tuple[StepWork, int]]) -> list[torch.Tensor]:
        """One iteration (on the loop or a compute thread): the parts grouped by the span they run
        on (sessions opened before the server moved keep their old span), each group one batch.
        A failure restores every part's cache length, so a retry starts where the step was."""
        lengths = [w.session.cache.length for w, _ in batch]
        trace.mark("s.c0")
        try:
            with torch.inference_mode():
                for work, _ in batch:
                    if work.hypo_ids is not None:  # beam search: once, before the step's first chunk
                        work.session.cache.reorder(work.hypo_ids)
                        work.hypo_ids = None
                groups: dict[tuple[int, int, int], list[int]] = {}
                for i, (work, _) in enumerate(batch):
                    s = work.session
                    model = s.model or self.backend.model
                    groups.setdefault((id(model), s.blocks.start, s.blocks.end), []).append(i)
                outs: list[torch.Tensor | None] = [None] * len(batch)
                for members in groups.values():
                    s = batch[members[0]][0].session
                    model = s.model or self.backend.model
                    results = model.step_batch([batch[i][0].part(batch[i][1]) for i in members], s.blocks)
                    for i, out in zip(members, results, strict=True):
                        outs[i] = out
        except BaseException:
            for (work, _), length in zip(batch, lengths, strict=True):
                if work.session.cache is not None:
                    work.session.cache.length = length
            raise
        trace.mark("s.c1")
        return outs  # type: ignore[return-value]
