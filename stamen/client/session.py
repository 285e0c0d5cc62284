"""Fault-tolerant inference sessions: a chain of per-server sessions whose KV caches hold the
sequence so far.

The client keeps, for every hop of the route, the hidden states it sent to that hop. When a server
fails (lost connection, timeout, lost session), the client bans it, finds servers that cover
exactly the failed hop's blocks (one or several), replays the hop's history into them to rebuild
their caches, and retries the step. Greedy output with a failure equals output without one.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch
from hivemind.utils.timed_storage import get_dht_time

from stamen import trace
from stamen.client import loop
from stamen.client.audit import AuditRecord, relative_error, server_tolerance, tolerance
from stamen.client.retry import backoff_delay, is_retryable
from stamen.client.routing import Hop
from stamen.client.swarm import Swarm
from stamen.dht.accusations import Accusation, digest
from stamen.errors import RemoteCallError, ServerBusyError, ServerFullError, SessionLengthError
from stamen.models.config import DTYPES
from stamen.rpc.calls import call_forward, ping
from stamen.rpc.inference import InferenceStream, WireCounter
from stamen.rpc.inputs import SpanInputs
from stamen.types import PeerIDStr, Span
from stamen.wire.messages import AdapterRef, Burst, PushTarget
from stamen.wire.tensors import STREAM_PART_BYTES

logger = logging.getLogger(__name__)


class Rewound(Exception):  # noqa: N818 (a signal to the caller, not an error)
    """An audit caught a server returning wrong outputs: the session rolled back to ``position``
    (the last position every audit vouched for), replaced the server, and the step's outputs (and
    every output since ``position``) must be computed again. ``generate`` does that by itself."""

    def __init__(self, position: int, peer_id: str):
        super().__init__(f"rolled back to position {position}: {peer_id} returned wrong outputs")
        self.position, self.peer_id = position, peer_id


@dataclass
class _StepInputs:
    """What every hop receives for one step besides its hidden states."""

    step_id: int
    position: int
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    hypo_ids: torch.Tensor | None = None

    def span_inputs(self, hidden: torch.Tensor) -> SpanInputs:
        """What a hop receives for this step with ``hidden`` as its hidden states."""
        return SpanInputs(hidden, self.attention_mask, self.position_ids, self.hypo_ids)


@dataclass
class SessionTuning:
    """Trained parameters a session applies: ``prefix`` (P, H) prompt embeddings run before the
    first token (positions the caller never sees), and ``prepare(peer, blocks)``, which makes sure
    the server holds the adapter and returns the deep prompts and adapter reference for its blocks."""

    prefix: torch.Tensor | None
    prepare: Callable[[PeerIDStr, Span], Awaitable[tuple[torch.Tensor | None, AdapterRef | None]]]


@dataclass
class _Held:
    """A hop's input that the client has not fetched: the previous hop's output of a chained
    decoding step, which that server holds (``Step.hold_reply``) until asked or until it holds a few."""

    source: InferenceStream
    """The previous hop's stream, whose reply to ``step_id`` is the input."""
    step_id: int
    num_elements: int
    dtype: torch.dtype
    keep: int | None = None
    """Positions kept after a rollback (None: all)."""
    _fetching: asyncio.Future | None = None
    """The one fetch of the reply (a replay and an audit may want it at once; a reply is read once)."""

    async def fetch(self) -> torch.Tensor:
        if self._fetching is None:
            if not self.source.has_reply(self.step_id):
                self.source.flush()
            self._fetching = asyncio.ensure_future(self.source.result(self.step_id, self.num_elements))
        return self.settled(await asyncio.shield(self._fetching))

    def settled(self, output: torch.Tensor) -> torch.Tensor:
        """The history entry that the previous hop's ``output`` of this step makes."""
        output = output.to(self.dtype)
        return output if self.keep is None else output[:, : self.keep]


@dataclass
class _AuditSession:
    """A hop's audit inference session on its auditor: the hop's inputs fed in the same order, so
    that an audit sends only the positions since the last one (``InferenceSession._audit``)."""

    peer_id: str
    stream: InferenceStream
    cached: int = 0
    """Wire positions of the hop's inputs that the auditor's cache holds for sure (a step sent at a
    position below its length rewinds it there, as a route's hops are on a replay)."""


@dataclass
class _LiveHop:
    hop: Hop
    stream: InferenceStream
    wire_dtype: torch.dtype
    history: list[torch.Tensor | _Held] = field(default_factory=list)
    """Hidden states sent to this hop, one per step, aligned with the session's steps (``_Held``:
    still with the previous hop's server, fetched when a replay needs it)."""
    reply_s: float | None = None
    """Moving average of the seconds from having this hop's input to its reply (decoding steps)."""
    late_copies: int = 0
    """Consecutive decoding steps whose pushed input did not answer within the grace time."""
    token_s: float | None = None
    """Moving average of this hop's seconds per token of a step (reply time / tokens, every step
    awaited hop by hop), seeded by the open's round trip: the base of its hang deadline."""
    verified: int = 0
    """Positions (on the wire) whose outputs from this server an audit vouched for."""
    since_audit: int = 0
    """Steps since this hop's last audit started (starts at a random phase: hops take turns)."""
    audit: asyncio.Task | None = None
    """The audit in flight (at most one per hop)."""
    audit_started: int = 0
    """The session's step count when that audit started (one still running ``audit_every`` / 2
    steps later is awaited)."""
    auditor: _AuditSession | None = None
    """The audit inference session on this hop's auditor (at most one; kept while the auditor lives)."""
    joined_step: int = 0
    """The session's step count when this server joined the route (detection latency)."""
    extra_tolerance: float = 0.0
    """Added to this hop's audit tolerance: a failover filled inputs this hop got from a failed
    server with a replacement's outputs, which may differ by both servers' precision."""

    def hang_deadline(self, tokens: int, floor: float, factor: float) -> float:
        """Seconds this hop may take over a step of ``tokens`` tokens before it is suspected of
        hanging: ``factor`` × its usual time for that many tokens, at least ``floor``. A per-token
        average over decoding steps overstates a long step's time per token, so long steps (prompts,
        replays) get generous deadlines rather than tight ones."""
        return max(floor, factor * (self.token_s or 0.0) * max(1, tokens))

    def observe_tokens(self, seconds: float, tokens: int) -> None:
        sample = seconds / max(1, tokens)
        self.token_s = sample if self.token_s is None else 0.8 * self.token_s + 0.2 * sample

    @property
    def copy_grace(self) -> float | None:
        """Seconds to wait for the reply to a pushed input before sending the client's own copy
        (None: send it at once: no estimate yet, or pushes to this hop keep failing)."""
        if self.reply_s is None or self.late_copies >= _MAX_LATE_COPIES:
            return None
        return max(_MIN_GRACE_S, 1.5 * self.reply_s + 0.002)

    def observe(self, seconds: float, late: bool) -> None:
        self.reply_s = seconds if self.reply_s is None else 0.8 * self.reply_s + 0.2 * seconds
        self.late_copies = self.late_copies + 1 if late else 0


_DEFER_TOKENS = 8
"""Steps of at most this many tokens (decoding) may skip the client's copy of a pushed input."""
_MIN_GRACE_S = 0.005
_MAX_LATE_COPIES = 3
_HOP_BY_HOP_STEPS = 32
"""Decoding steps taken hop by hop after ``_MAX_LATE_COPIES`` late chains in a row, before the
chain is tried again."""


_FETCH_HELD_S = 10.0
"""Most seconds to fetch, from a convicted server, the outputs it holds for the next hop."""
_CONNECT_TIMEOUT_S = 10.0
"""Most seconds to get a stream to a server when opening a session (the daemon may take 20 s to give
up on a dead peer, whose DHT record can outlive its ban); the open's reply has ``request_timeout``."""
_AUDIT_CACHE_ROOM = 2
"""An audit session opens only on an auditor announcing cache for this many sessions of its size:
it never takes the room of a server's last route session (else audits there are stateless)."""
_pings: set[asyncio.Task] = set()
"""Pings of suspected servers that outlived their wait, accusations being published, and audit
sessions being opened or closed in the background (held: the loop keeps tasks only weakly)."""


def _close_opened(opening: asyncio.Future) -> None:
    """Close the stream of an audit session that opened after its audit was cancelled."""
    _pings.discard(opening)
    if not opening.cancelled() and opening.exception() is None:
        task = asyncio.ensure_future(opening.result().close())
        _pings.add(task)
        task.add_done_callback(_pings.discard)


async def _ping_within(swarm: Swarm, peer_id: PeerIDStr, timeout: float) -> float | None:
    """A ping's round trip, or None if no answer came within ``timeout`` seconds. The wait does not
    hang on the call's cancellation (a call to a stopped peer may not end until its connection
    does): a ping still running then finishes in the background."""
    task = asyncio.ensure_future(ping(swarm.p2p, swarm.peer(peer_id), timeout))
    done, _ = await asyncio.wait([task], timeout=timeout + 0.05)
    if not done:
        _pings.add(task)
        task.add_done_callback(_pings.discard)
        return None
    return task.result()


class InferenceSession:
    """Open with ``max_length`` (positions per sequence) and ``batch_size``; ``step`` appends hidden
    states and returns the last block's outputs. ``input_ids`` tracks the tokens sent so far, so that
    generate calls passing the whole sequence only send what the servers have not seen."""

    def __init__(self, swarm: Swarm, max_length: int, batch_size: int = 1, tuning: SessionTuning | None = None):
        self.swarm, self.max_length, self.batch_size = swarm, max_length, batch_size
        self.tuning = tuning
        self.prefix_length = tuning.prefix.shape[0] if tuning is not None and tuning.prefix is not None else 0
        """Positions taken by trained prompt embeddings before the caller's first token."""
        self.session_id = uuid.uuid4().hex
        self.next_burst: Burst | None = None
        """Sent with the next decoding step: the steps that leave with it (``client/combine.py``)."""
        self.reply_burst: Burst | None = None
        """Came with the last step's reply: the replies that left the last server with it."""
        self._hops: list[_LiveHop] = []
        self._steps: list[_StepInputs] = []
        self._next_step_id = 0
        self.position = 0
        self.input_ids: torch.Tensor | None = None
        """(B, position) token ids behind the cached positions, kept by the model's generate."""
        self.closed = False
        self.recoveries = 0
        """How many times a failed hop was replaced (for logs and tests)."""
        self.recovery_s: list[float] = []
        """Seconds each replacement took: routing, opening the new hops and replaying into them
        (``stamen bench failover`` subtracts it from a stall to get the time to detect the failure)."""
        self.sent_tokens = 0
        """Positions sent through the chain over the session's life (rolled-back ones count again)."""
        self._retired = WireCounter()
        """Traffic of hops that were replaced."""
        self._chain_s: float | None = None
        """Moving average of a decoding step's seconds through the whole chain (None: not yet timed)."""
        self._late_chains = 0
        self._hop_by_hop = 0
        """Decoding steps still to take hop by hop (after late chains)."""
        self.chained_steps = 0
        """Decoding steps that went down the push chain waiting for the last hop only (``_chain_step``)."""
        self.verify = swarm.config.verify
        self._outputs: list[torch.Tensor] = []
        """The last hop's outputs, one per step (what audits of the last hop compare), while auditing."""
        self.steps_taken = 0
        """``step`` calls over the session's life (a step redone after a rewind counts again)."""
        self.audits: list[AuditRecord] = []
        """Every audit this session ran."""
        self.detections: list[tuple[str, int]] = []
        """(peer id, steps since it joined the route) of every server caught returning wrong outputs."""
        self.unaudited: str | None = None
        """Why audits stopped for this session (beam search reorders caches: no stateless replay)."""
        self._verdicts: list[tuple[_LiveHop, int]] = []
        """Convicted hops and the wire position since which their outputs are wrong, to rewind."""
        self._epoch = 0
        """Incremented on every rollback and replacement: an audit started before is stale."""
        self._rng = random.Random()

    def __enter__(self) -> InferenceSession:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self._hops]

    @property
    def first_server(self) -> str | None:
        """The peer the session's steps go to first (None before the route is open)."""
        return str(self._hops[0].hop.peer_id) if self._hops else None

    def open(self) -> None:
        self._hops = loop.run(self._open_route(None))  # None: every block
        logger.info("session %s route: %s", self.session_id[:8], self.describe_route())
        if self.prefix_length:  # the prompt embeddings: the first step, replayed like any other
            prefix = self.tuning.prefix.expand(self.batch_size, -1, -1)
            inputs = _StepInputs(self._next_step_id, 0, None, None)
            self._next_step_id += 1
            out = loop.run(self._step(prefix, inputs))
            self._steps.append(inputs)
            if self.verify != "off":
                self._outputs.append(out)

    async def _open_route(self, blocks: Span | None) -> list[_LiveHop]:
        """Open streams covering ``blocks``, rerouting around servers that fail to open.

        A server that answers "full" is under load, not faulty: it is never banned, only avoided
        by this session's next route; when every route passes such servers, the session waits for
        free cache (rechecking with backoff) up to ``full_wait`` seconds, then raises ``ServerFullError``
        (the last server's own ``ServerBusyError`` when it refused this peer over its share, with
        its retry hint). A busy server's hint sets the first recheck."""
        cfg = self.swarm.config
        faults, delay = 0, 0.05
        full: set[PeerIDStr] = set()
        busy: ServerBusyError | None = None
        full_until = time.monotonic() + cfg.full_wait
        while True:
            try:
                route = await self.swarm.route_async(
                    blocks, min_cache_tokens=(self.max_length + self.prefix_length) * self.batch_size, avoid=full)
            except ServerFullError:  # every route passes a server that just said it is full
                left = full_until - time.monotonic()
                if left <= 0:
                    if busy is not None:
                        raise busy from None
                    raise
                wait = max(delay, busy.retry_after or 0) if busy else delay
                await asyncio.sleep(min(wait, left))  # queue briefly: sessions end and free their cache
                delay, full = min(2 * delay, 1.0), set()
                continue
            results = await asyncio.gather(*(self._open_hop(h) for h in route), return_exceptions=True)
            opened = [r for r in results if isinstance(r, _LiveHop)]
            failures = [(h, r) for h, r in zip(route, results, strict=True) if isinstance(r, BaseException)]
            if not failures:
                return opened
            await asyncio.gather(*(h.stream.close() for h in opened), return_exceptions=True)
            faulty = False
            for hop, error in failures:
                if isinstance(error, ServerFullError):
                    logger.info("session %s: %s is full (%s): routing around it", self.session_id[:8],
                                hop.peer_id[-6:], error)
                    full.add(hop.peer_id)
                    busy = error if isinstance(error, ServerBusyError) else busy
                    continue
                if not is_retryable(error) or faults == cfg.max_retries:
                    raise error
                self.swarm.ban(hop.peer_id, f"cannot open a session for blocks {hop.blocks}: {error}")
                faulty = True
            if faulty:
                await asyncio.sleep(backoff_delay(faults))
                faults += 1

    async def _open_hop(self, hop: Hop) -> _LiveHop:
        prompts, adapter = await self.tuning.prepare(hop.peer_id, hop.blocks) if self.tuning else (None, None)
        start = time.perf_counter()
        stream = await InferenceStream.open(
            self.swarm.p2p, self.swarm.peer(hop.peer_id), hop.blocks, uuid.uuid4().hex,
            max_length=self.max_length + self.prefix_length, batch_size=self.batch_size,
            timeout=self.swarm.config.request_timeout, prompts=prompts, adapter=adapter,
            compression=self.swarm.config.compression,
            connect_timeout=min(self.swarm.config.request_timeout, _CONNECT_TIMEOUT_S),
        )
        live = _LiveHop(hop, stream, DTYPES.get(self.swarm.dtype_of(hop.peer_id), torch.float32))
        live.token_s = time.perf_counter() - start  # until a step is timed: the open's round trip per token
        live.joined_step = self.steps_taken
        live.since_audit = self._rng.randrange(self.swarm.config.audit_every)
        return live

    async def _reply(self, live: _LiveHop, step_id: int, num_elements: int, tokens: int, start: float) -> torch.Tensor:
        """A hop's output of a step whose input it had at ``start``, with hang detection: a hop
        later than its deadline (``_LiveHop.hang_deadline``) is pinged; one that does not answer the
        ping is hung and raises ``RemoteCallError`` (the caller bans and replaces it as if it had
        died), one that answers is busy (a long step of another session) and gets another deadline,
        up to ``request_timeout`` in all. Its late reply, if it ever comes, is dropped unread."""
        cfg = self.swarm.config
        deadline = live.hang_deadline(tokens, cfg.hang_timeout, cfg.hang_factor)
        give_up = start + cfg.request_timeout
        while not await live.stream.answered_within(step_id, min(deadline, max(0.0, give_up - time.perf_counter()))):
            if time.perf_counter() >= give_up:
                break  # result() below raises at once
            rtt = await _ping_within(self.swarm, live.hop.peer_id, cfg.hang_ping_timeout)
            if rtt is not None or live.stream.has_reply(step_id):  # (a reply during the ping: only slow)
                logger.info("session %s: %s is late on step %d but answers pings: waiting", self.session_id[:8],
                            live.hop.peer_id[-6:], step_id)
            elif await self.swarm.find_alternative(live.hop.peer_id, live.hop.blocks):
                raise RemoteCallError(
                    f"{live.hop.peer_id} hangs: no reply to step {step_id} ({tokens} tokens) within "
                    f"{time.perf_counter() - start:.1f} s (deadline {deadline:.2f} s) and no answer to a ping")
            else:  # a machine too loaded to answer looks hung too: without a replacement, keep waiting
                logger.warning("session %s: %s looks hung (step %d), but no other server covers %s: waiting",
                               self.session_id[:8], live.hop.peer_id[-6:], step_id, live.hop.blocks)
        out = await live.stream.result(step_id, num_elements, timeout=max(0.0, give_up - time.perf_counter()))
        live.observe_tokens(time.perf_counter() - start, tokens)
        return out

    def hop_counters(self) -> list[WireCounter]:
        """Per hop of the current route: messages and serialized bytes this client sent to and
        received from it (steps, their outputs, open and close; a replaced hop's new streams start at 0)."""
        return [WireCounter() + h.stream.counter for h in self._hops]

    @property
    def counter(self) -> WireCounter:
        """The session's traffic with every server it used, replaced ones included."""
        total = WireCounter() + self._retired
        for h in self._hops:
            total = total + h.stream.counter
        return total

    @property
    def bytes_sent(self) -> int:
        return self.counter.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.counter.bytes_received

    def describe_route(self) -> str:
        """The hops, each marked "(unaudited)" when audits are on but no second server covers its blocks."""
        def mark(live: _LiveHop) -> str:
            if self.verify == "off":
                return ""
            if self.unaudited is not None:
                return f" (unaudited: {self.unaudited})"
            return "" if self._auditors(live) else " (unaudited: no second server)"
        return " -> ".join(f"{h.hop.peer_id[-6:]}{h.hop.blocks}{mark(h)}" for h in self._hops)

    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None, hypo_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run hidden (B, T, H) through every block at the current position; returns (B, T, H).
        ``hypo_ids`` (B,) first reorders the cached sequences (beam search).
        Long inputs go in several steps so that each message stays under the transport's cap."""
        if self.closed:
            raise SessionLengthError("the inference session is closed")
        B, T, H = hidden.shape
        if self.position + T > self.max_length:
            raise SessionLengthError(
                f"session max_length {self.max_length} exceeded: {self.position} positions + {T} new"
            )
        if hypo_ids is not None and self.verify != "off" and self.unaudited is None:
            self.unaudited = "beam search"  # reordered caches have no stateless equivalent
            logger.warning("session %s: audits stop: beam search reorders the servers' caches", self.session_id[:8])
        chunk = max(1, STREAM_PART_BYTES * 2 // (B * H * 4))
        outputs = []
        for start in range(0, T, chunk):
            end = min(T, start + chunk)
            inputs = _StepInputs(
                self._next_step_id, self.position + self.prefix_length,
                None if attention_mask is None else attention_mask[:, start:end],
                None if position_ids is None else position_ids[:, start:end] + self.prefix_length,
                hypo_ids if start == 0 else None,
            )
            self._next_step_id += 1
            trace.mark("c.step", inputs.step_id)
            outputs.append(loop.run(self._step_and_audit(hidden[:, start:end], inputs, end == T, prefill=T > 1)))
            trace.mark("c.main", inputs.step_id)
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        return out.to(hidden.dtype)

    async def _step_and_audit(self, hidden: torch.Tensor, inputs: _StepInputs, last: bool,
                              prefill: bool) -> torch.Tensor:
        """``_step``, its bookkeeping, and after the last part of a ``step`` call the audits' turn
        (``_audit_tick``): one trip to the client loop per step."""
        out = await self._step(hidden, inputs)
        self._steps.append(inputs)
        if self.verify != "off":
            self._outputs.append(out)
        self.position += hidden.shape[1]
        self.sent_tokens += hidden.shape[1]
        if last:
            self.steps_taken += 1
            if self.verify != "off" and self.unaudited is None:
                await self._audit_tick(prefill)
        return out

    def _push_chain(self, after: int) -> list[PushTarget]:
        if not self.swarm.config.use_push:
            return []
        return [PushTarget(peer_id=h.hop.peer_id, session_id=h.stream.session_id) for h in self._hops[after:]]

    async def _step(self, hidden: torch.Tensor, inputs: _StepInputs) -> torch.Tensor:
        """One step through the chain. Hop 0 gets the input with the rest of the chain attached, so
        each server pushes its output to the next. The client also sends every later hop its input
        (ignored if the push came first), which covers failed pushes: at once for prompts, but for
        decoding steps only when the hop has not answered within ``copy_grace`` (1.5× its usual
        reply time), so that a working push chain carries each hidden state once. A hop whose
        pushes keep arriving late gets its copies at once again."""
        for live in self._hops:  # register before sending: a pushed reply may come back first
            live.stream.expect(inputs.step_id)
        decoding = self.swarm.config.use_push and hidden.shape[0] * hidden.shape[1] <= _DEFER_TOKENS
        if decoding and len(self._hops) > 1:
            if self._chain_s is not None and self._hop_by_hop == 0:
                out = await self._chain_step(hidden, inputs)
                if out is not None:
                    return out
            self._hop_by_hop = max(0, self._hop_by_hop - 1)
        start = time.perf_counter()
        out = await self._hop_by_hop_step(hidden, inputs, decoding)
        if decoding:
            self._observe_chain(time.perf_counter() - start)
        return out

    def _observe_chain(self, seconds: float) -> None:
        self._chain_s = seconds if self._chain_s is None else 0.8 * self._chain_s + 0.2 * seconds

    async def _chain_step(self, hidden: torch.Tensor, inputs: _StepInputs) -> torch.Tensor | None:
        """A decoding step down the push chain, waiting for the last hop only: the other servers
        hold their copies of the outputs (``Step.hold_reply``), which become the later hops'
        history as ``_Held``. Returns None when the last hop did not answer within 1.5× the usual
        chain time (or a send failed): every server is then asked for what it holds and the step
        goes on hop by hop, where late or failed hops get the client's copies or are replaced."""
        first, last = self._hops[0], self._hops[-1]
        start = time.perf_counter()
        grace = max(_MIN_GRACE_S * len(self._hops), 1.5 * self._chain_s + 0.002)
        sent = hidden.to(first.wire_dtype)
        out = None
        try:
            first.stream.send_step(inputs.step_id, inputs.position, inputs.span_inputs(sent), self._push_chain(1),
                                   hold_reply=True, burst=self.next_burst)
            if await last.stream.answered_within(inputs.step_id, grace):
                out = await last.stream.result(inputs.step_id, hidden.numel())
                self.reply_burst = last.stream.last_burst
        except Exception as e:
            logger.info("session %s: chained step %d failed (%s); going hop by hop", self.session_id[:8],
                        inputs.step_id, e)
        if out is None:
            self._late_chains += 1
            if self._late_chains >= _MAX_LATE_COPIES:
                self._late_chains, self._hop_by_hop = 0, _HOP_BY_HOP_STEPS
            for live in self._hops:
                live.stream.flush()
            return None
        self._late_chains = 0
        self.chained_steps += 1
        self._observe_chain(time.perf_counter() - start)
        first.history.append(sent)
        for previous, live in zip(self._hops, self._hops[1:], strict=False):
            live.history.append(_Held(previous.stream, inputs.step_id, hidden.numel(), live.wire_dtype))
        return out

    def settle(self) -> None:
        """Fetch every hop's history that servers still hold (``_Held``): afterwards every reply of
        the session's steps is in (benchmarks count the servers' compute and bytes from them).
        A replay fetches what it needs by itself."""
        loop.run(self._settle())

    async def _settle(self) -> None:
        for live in self._hops:
            await self._fetch_history(live)

    async def _fetch_history(self, live: _LiveHop) -> None:
        for k, entry in enumerate(live.history):
            if isinstance(entry, _Held):
                live.history[k] = await entry.fetch()

    async def _hop_by_hop_step(self, hidden: torch.Tensor, inputs: _StepInputs, decoding: bool) -> torch.Tensor:
        i = 0
        burst = self.next_burst  # the client forwards each hop's output in the burst it came back in
        while i < len(self._hops):
            live = self._hops[i]
            for attempt in range(self.swarm.config.max_retries + 1):
                try:
                    hidden = hidden.to(live.wire_dtype)
                    start = time.perf_counter()
                    grace = live.copy_grace if decoding and i > 0 and attempt == 0 else None
                    late = grace is not None and not await live.stream.answered_within(inputs.step_id, grace)
                    if grace is None or late:
                        live.stream.send_step(inputs.step_id, inputs.position, inputs.span_inputs(hidden),
                                              self._push_chain(i + 1), burst=burst if attempt == 0 else None)
                    out = await self._reply(live, inputs.step_id, hidden.numel(), hidden.shape[0] * hidden.shape[1],
                                            start)
                    if decoding and i > 0 and attempt == 0:
                        live.observe(time.perf_counter() - start, late)
                    break
                except Exception as e:
                    if not is_retryable(e) or attempt == self.swarm.config.max_retries:
                        raise
                    logger.warning("session %s: server %s failed on blocks %s at position %d: %s",
                                   self.session_id[:8], live.hop.peer_id, live.hop.blocks, inputs.position, e)
                    self.swarm.ban(live.hop.peer_id, str(e))
                    await asyncio.sleep(backoff_delay(attempt))
                    live = await self._replace(i)
                    for new in self._hops:
                        new.stream.expect(inputs.step_id)
            live.history.append(hidden)
            hidden = out
            came = live.stream.last_burst
            burst = None if came is None else Burst(id=f"{came.id[:60]}.fwd", size=came.size)
            i += 1
        self.reply_burst = live.stream.last_burst
        return hidden

    async def _replace(self, i: int) -> _LiveHop:
        """Swap hop ``i`` for fresh servers covering exactly its blocks and replay its history into them.
        Returns the first new hop (the others follow it in ``self._hops``)."""
        failed = self._hops[i]
        started = time.perf_counter()
        await self._fetch_history(failed)  # inputs the previous hop still holds
        asyncio.ensure_future(failed.stream.close())  # best effort; the server may be gone
        self._retired = self._retired + failed.stream.counter
        for attempt in range(self.swarm.config.max_retries + 1):
            new_hops = await self._open_route(failed.hop.blocks)
            try:
                outputs = await self._replay(new_hops, failed.history)
                break
            except Exception as e:
                await asyncio.gather(*(h.stream.close() for h in new_hops), return_exceptions=True)
                for h in new_hops:
                    self._retired = self._retired + h.stream.counter
                if not is_retryable(e) or attempt == self.swarm.config.max_retries:
                    raise
                await asyncio.sleep(backoff_delay(attempt))
        self._hops[i : i + 1] = new_hops
        self._epoch += 1
        if failed.audit is not None:
            failed.audit.cancel()
        self._drop_auditor(failed, "the hop was replaced")
        following = i + len(new_hops)
        if following < len(self._hops):  # its inputs that the failed server held: the replay's outputs
            history = self._hops[following].history
            refilled = False
            for k, entry in enumerate(history):
                if isinstance(entry, _Held):
                    history[k] = entry.settled(outputs[k])
                    refilled = True
            if refilled:  # its cache came from the failed server's outputs, its history from the replacement's
                self._hops[following].extra_tolerance += server_tolerance(*self._precision(failed.hop.peer_id)) + \
                    max(server_tolerance(*self._precision(h.hop.peer_id)) for h in new_hops)
        self.recoveries += 1
        self.recovery_s.append(time.perf_counter() - started)
        logger.warning("session %s: replaced %s%s by %s, replayed %d positions", self.session_id[:8],
                       failed.hop.peer_id[-6:], failed.hop.blocks,
                       " + ".join(f"{h.hop.peer_id[-6:]}{h.hop.blocks}" for h in new_hops), self.position)
        return new_hops[0]

    async def _replay(self, new_hops: list[_LiveHop], history: list[torch.Tensor]) -> list[torch.Tensor]:
        """Feed the failed hop's inputs through the new hops; each one's outputs are the next one's
        inputs. Returns the last new hop's outputs, one per step."""
        for live in new_hops:
            outputs = []
            try:
                for inputs, hidden in zip(self._steps, history, strict=True):
                    hidden = hidden.to(live.wire_dtype)
                    live.history.append(hidden)
                    start = time.perf_counter()
                    live.stream.send_step(inputs.step_id, inputs.position, inputs.span_inputs(hidden))
                    outputs.append(await self._reply(live, inputs.step_id, hidden.numel(),
                                                     hidden.shape[0] * hidden.shape[1], start))
            except Exception as e:
                if is_retryable(e):
                    self.swarm.ban(live.hop.peer_id, f"failed during replay: {e}")
                raise
            history = outputs
        return history

    def rollback(self, position: int) -> None:
        """Forget positions from ``position`` on; the next step overwrites them."""
        if not 0 <= position <= self.position:
            raise SessionLengthError(f"cannot roll back to {position}: the session holds {self.position}")
        self._truncate(position + self.prefix_length)  # the prompt prefix is never rolled back
        self.position = position
        if self.input_ids is not None:
            self.input_ids = self.input_ids[:, :position]

    def _truncate(self, wire_position: int) -> None:
        """Forget the steps' inputs and outputs from ``wire_position`` on."""
        self._epoch += 1
        keep: list[_StepInputs] = []
        for step_index, inputs in enumerate(self._steps):
            if inputs.position >= wire_position:
                break
            keep.append(inputs)
            num = wire_position - inputs.position  # tokens of this step to keep
            for live in self._hops:
                if step_index >= len(live.history):
                    continue
                entry = live.history[step_index]
                if isinstance(entry, _Held):
                    entry.keep = num if entry.keep is None else min(entry.keep, num)
                elif entry.shape[1] > num:
                    live.history[step_index] = entry[:, :num]
            if step_index < len(self._outputs) and self._outputs[step_index].shape[1] > num:
                self._outputs[step_index] = self._outputs[step_index][:, :num]
            if inputs.attention_mask is not None or inputs.position_ids is not None:
                keep[-1] = _StepInputs(
                    inputs.step_id,
                    inputs.position,
                    None if inputs.attention_mask is None else inputs.attention_mask[:, :num],
                    None if inputs.position_ids is None else inputs.position_ids[:, :num],
                    inputs.hypo_ids,
                )
        for live in self._hops:
            del live.history[len(keep):]
            live.verified = min(live.verified, wire_position)
            if live.auditor is not None:  # its next audit step rewinds the auditor's cache to here or before
                live.auditor.cached = min(live.auditor.cached, wire_position)
        del self._outputs[len(keep):]
        self._steps = keep

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._hops:
            loop.run(self._close_streams())

    async def _close_streams(self) -> None:
        auditors = []
        for live in self._hops:
            if live.audit is not None:
                live.audit.cancel()
            if live.auditor is not None:
                auditors.append(live.auditor.stream)
                live.auditor = None
        await asyncio.gather(*(h.stream.close() for h in self._hops), *(s.close() for s in auditors),
                             return_exceptions=True)

    # --- audits (``ClientConfig.verify``) ---

    @property
    def _wire_position(self) -> int:
        return self.position + self.prefix_length

    def _index(self, live: _LiveHop) -> int | None:
        return next((k for k, h in enumerate(self._hops) if h is live), None)

    def _auditors(self, live: _LiveHop, exclude: tuple[str, ...] = ()) -> list:
        """Other servers that host all of the hop's blocks (banned and convicted ones left out)."""
        return self.swarm.covering(live.hop.blocks, {live.hop.peer_id, *exclude})

    def _precision(self, peer_id: str) -> tuple[str, str | None]:
        record = self.swarm.record_of(PeerIDStr(peer_id))
        return (record.dtype, record.quant) if record is not None else ("float32", None)

    def _pick(self, candidates: list, against: str):
        """The candidate whose precision gives the tightest tolerance against ``against``'s, spare
        servers (not in this route) first, at random among equals; None if there is none."""
        if not candidates:
            return None
        in_route = {h.hop.peer_id for h in self._hops}
        mine = self._precision(against)
        return min(candidates, key=lambda s: (tolerance(mine, self._precision(s.peer_id)), s.peer_id in in_route,
                                              self._rng.random()))

    async def _audit_tick(self, prefill: bool) -> None:
        """After a step: start the audits that are due (a prefill, ``audit_every`` steps since the hop's
        last, an accused server: every step, strict: every hop every step, awaited), then act on
        verdicts that came in (``_apply_verdicts`` raises ``Rewound``)."""
        accused = self.swarm.accused()
        every = self.swarm.config.audit_every
        wait = []
        for live in self._hops:
            live.since_audit += 1
            now = self.verify == "strict" or live.hop.peer_id in accused  # every step, awaited
            lagging = self.steps_taken - live.audit_started >= max(1, every // 2)
            if (now or lagging) and live.audit is not None and not live.audit.done():
                await asyncio.wait([live.audit])  # bounds how many steps a lie can go unnoticed
            if (now or prefill or live.since_audit >= every) and (live.audit is None or live.audit.done()) \
                    and live.verified < self._wire_position:
                self._start_audit(live)
                if now and live.audit is not None:
                    wait.append(live.audit)
        if wait:
            await asyncio.gather(*wait, return_exceptions=True)
        await self._apply_verdicts()

    def _start_audit(self, live: _LiveHop) -> None:
        if not self._auditors(live):
            return
        live.since_audit, live.audit_started = 0, self.steps_taken
        live.audit = asyncio.ensure_future(self._audit(live, len(self._steps), self._epoch))

    def audit_all(self) -> None:
        """Audit every hop's outputs not yet vouched for and wait for the verdicts (``generate`` calls
        it before returning). Raises ``Rewound`` when a server lied."""
        if self.verify != "off" and self.unaudited is None and not self.closed and self._hops:
            loop.run(self._audit_all())

    async def _audit_all(self) -> None:
        for _ in range(3):  # an audit in flight may cover fewer positions than there are now
            tasks = []
            for live in self._hops:
                if live.audit is None or live.audit.done():
                    if live.verified < self._wire_position:
                        self._start_audit(live)
                if live.audit is not None and not live.audit.done():
                    tasks.append(live.audit)
            if not tasks:
                break
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._apply_verdicts()

    async def _forward_on(self, peer_id: str, blocks: Span, hidden: torch.Tensor, mask: torch.Tensor | None,
                          position_ids: torch.Tensor | None) -> torch.Tensor:
        prompts, adapter = await self.tuning.prepare(PeerIDStr(peer_id), blocks) if self.tuning else (None, None)
        inputs = SpanInputs(hidden, mask, position_ids, None, prompts, adapter)
        return await call_forward(self.swarm.p2p, self.swarm.peer(PeerIDStr(peer_id)), blocks, inputs,
                                  timeout=self.swarm.config.request_timeout, compression="none")

    def _auditor_for(self, live: _LiveHop) -> str | None:
        """The hop's auditor: the server its audit session is on while that one may audit (not
        banned, convicted or gone; the session is dropped otherwise), else ``_pick``'s choice."""
        candidates = self._auditors(live)
        if live.auditor is not None:
            if any(s.peer_id == live.auditor.peer_id for s in candidates):
                return live.auditor.peer_id
            self._drop_auditor(live, "no longer an auditor (banned, convicted or gone)")
        choice = self._pick(candidates, live.hop.peer_id)
        return None if choice is None else choice.peer_id

    async def _open_auditor(self, live: _LiveHop, peer_id: str) -> _AuditSession | None:
        """Open the hop's audit session on ``peer_id`` (the session's max length, batch size, deep
        prompts and adapter, as the hop's own), closing one on another auditor. None when it cannot
        be opened (full, busy, unreachable) or would take the room of the server's last session of
        this size as announced (route sessions come first): that audit is a stateless forward, the
        next tries again."""
        self._drop_auditor(live, f"auditing on {peer_id[-6:]} from now on")
        blocks = live.hop.blocks
        need = (self.max_length + self.prefix_length) * self.batch_size
        record = self.swarm.record_of(PeerIDStr(peer_id))
        if record is not None and record.cache_tokens_left < _AUDIT_CACHE_ROOM * need:
            logger.debug("session %s: %s announces %d tokens of cache left: auditing %s%s statelessly",
                         self.session_id[:8], peer_id[-6:], record.cache_tokens_left, live.hop.peer_id[-6:], blocks)
            return None
        try:
            prompts, adapter = await self.tuning.prepare(PeerIDStr(peer_id), blocks) if self.tuning else (None, None)
            opening = asyncio.ensure_future(InferenceStream.open(
                self.swarm.p2p, self.swarm.peer(PeerIDStr(peer_id)), blocks, uuid.uuid4().hex,
                max_length=self.max_length + self.prefix_length, batch_size=self.batch_size,
                timeout=self.swarm.config.request_timeout, prompts=prompts, adapter=adapter, compression="none",
                connect_timeout=min(self.swarm.config.request_timeout, _CONNECT_TIMEOUT_S)))
            try:
                stream = await asyncio.shield(opening)
            except asyncio.CancelledError:  # the session closed or the hop was replaced: close it once open
                _pings.add(opening)
                opening.add_done_callback(_close_opened)
                raise
        except Exception as e:
            logger.info("session %s: cannot open an audit session for %s%s on %s (%s): a stateless forward "
                        "stands in", self.session_id[:8], live.hop.peer_id[-6:], blocks, peer_id[-6:], e)
            return None
        live.auditor = _AuditSession(peer_id, stream)
        logger.debug("session %s: audit session for %s%s opened on %s", self.session_id[:8], live.hop.peer_id[-6:],
                     blocks, peer_id[-6:])
        return live.auditor

    def _drop_auditor(self, live: _LiveHop, why: str, session: _AuditSession | None = None) -> None:
        """Close the hop's audit session (``session``: that one, whether or not it is still the hop's)
        in the background; the next audit opens another, which first gets every position again."""
        session = session or live.auditor
        if session is None:
            return
        if live.auditor is session:
            live.auditor = None
        if session.stream.closed:
            return
        logger.info("session %s: closing the audit session of %s%s on %s: %s", self.session_id[:8],
                    live.hop.peer_id[-6:], live.hop.blocks, session.peer_id[-6:], why)
        task = asyncio.ensure_future(session.stream.close())
        _pings.add(task)
        task.add_done_callback(_pings.discard)

    async def _audit_step(self, live: _LiveHop, session: _AuditSession, lo: int, hidden: torch.Tensor,
                          mask: torch.Tensor | None, position_ids: torch.Tensor | None, epoch: int) -> torch.Tensor:
        """The auditor's outputs for the hop's inputs from wire position ``lo`` on (``hidden`` and its
        mask and position ids), sent on the audit session at ``lo``: a server rewinds a cache that
        is ahead (rolled-back positions) to a step's position. Long inputs (a fresh session catching
        up) go in parts like ``step``'s. A failed or cancelled step drops the session."""
        session.cached = min(session.cached, lo)  # while the step runs, only [0, lo) is known
        B, T, H = hidden.shape
        chunk = max(1, STREAM_PART_BYTES * 2 // (B * H * 4))
        outputs = []
        try:
            for a in range(0, T, chunk):
                b = min(T, a + chunk)
                outputs.append(await session.stream.step(hidden[:, a:b], lo + a, None if mask is None else mask[:, a:b],
                                                         None if position_ids is None else position_ids[:, a:b]))
        except BaseException as e:
            self._drop_auditor(live, f"audit step failed: {e!r}", session)
            raise
        if epoch == self._epoch:
            session.cached = lo + T
            if epoch != self._epoch:  # rolled back (on the caller's thread) just now: what is cached is unsure
                self._drop_auditor(live, "rolled back during the audit", session)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    @staticmethod
    async def _inputs_from(steps: list[_StepInputs], entries: list, lo: int) -> tuple[
            torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Hidden states (``entries``, one per step, aligned with ``steps``), attention mask and
        position ids (None when no step had them) for wire positions [lo, the end of ``steps``);
        held entries are fetched from the step holding ``lo`` on only."""
        k = max(0, bisect.bisect_right([s.position for s in steps], lo) - 1)
        steps = steps[k:]
        parts = [await e.fetch() if isinstance(e, _Held) else e for e in entries[k:]]
        hidden = torch.cat(parts, dim=1)
        batch, skip = hidden.shape[0], lo - steps[0].position
        mask = position_ids = None
        if any(s.attention_mask is not None for s in steps):
            mask = torch.cat([s.attention_mask if s.attention_mask is not None
                              else torch.ones(batch, x.shape[1], dtype=torch.long)
                              for s, x in zip(steps, parts, strict=True)], 1)[:, skip:]
        if any(s.position_ids is not None for s in steps):
            position_ids = torch.cat([s.position_ids if s.position_ids is not None else
                                      torch.arange(s.position, s.position + x.shape[1]).expand(batch, -1)
                                      for s, x in zip(steps, parts, strict=True)], 1)[:, skip:]
        return hidden[:, skip:], mask, position_ids

    async def _audit(self, live: _LiveHop, upto: int, epoch: int) -> None:
        """Check the hop's outputs for positions [verified, the first ``upto`` steps) on another
        server. The hop's audit session there (``_AuditSession``: opened by its first audit, kept
        while the auditor may audit) is fed the hop's inputs in order, so an audit sends only the
        positions since the last one ([verified, total); all of them to a fresh session) and
        costs the auditor as much as the hop's own steps. When the session cannot be opened or its
        step fails, a stateless forward of all the inputs so far stands in. On a mismatch a third
        server decides from a stateless forward of all the inputs. Never raises: the verdict goes
        to ``self.audits`` (and ``_verdicts``)."""
        peer, blocks, start = live.hop.peer_id, live.hop.blocks, live.verified
        record = AuditRecord(peer, "", (blocks.start, blocks.end), (start, start), 0.0, 0.0, "failed", self.steps_taken)
        try:
            index = self._index(live)
            if index is None:
                return
            outputs_of = self._hops[index + 1].history if index + 1 < len(self._hops) else self._outputs
            steps, inputs, outputs = self._steps[:upto], list(live.history[:upto]), list(outputs_of[:upto])
            if len(inputs) < upto or len(outputs) < upto or not steps:
                return
            auditor = self._auditor_for(live)
            if auditor is None:
                return
            session = live.auditor if live.auditor is not None and live.auditor.peer_id == auditor else \
                await self._open_auditor(live, auditor)
            lo = 0 if session is None else min(start, session.cached)
            hidden, mask, position_ids = await self._inputs_from(steps, inputs, lo)
            total = lo + hidden.shape[1]
            if epoch != self._epoch or start >= total:
                return  # rolled back or replaced meanwhile: the next audit covers it
            claimed = (await self._inputs_from(steps, outputs, start))[0].float()
            kept = min((o.dtype for o in outputs), key=lambda d: torch.finfo(d).bits)
            valid = None if mask is None else mask[:, start - lo:].bool()
            compressed = live.stream.received_compressed or self.swarm.config.compression == "blockwise8"
            record.auditor, record.positions = auditor, (start, total)
            reference = None
            if session is not None:
                try:
                    reference = (await self._audit_step(live, session, lo, hidden, mask, position_ids, epoch)).float()
                    reference, record.sent = reference[:, start - lo:], total - lo
                except Exception as e:
                    logger.info("session %s: audit session of %s%s on %s failed (%r): a stateless forward stands in",
                                self.session_id[:8], peer[-6:], blocks, auditor[-6:], e)
            full = (hidden, mask, position_ids) if lo == 0 else None
            if reference is None:
                full = full or await self._inputs_from(steps, inputs, 0)
                reference = (await self._forward_on(auditor, blocks, *full)).float()[:, start:]
                record.sent = total
            tol = tolerance(self._precision(peer), self._precision(auditor), kept, compressed) + live.extra_tolerance
            record.tolerance = tol
            record.error = relative_error(claimed, reference, valid)
            if record.error <= tol:
                record.verdict = "passed"
                if epoch == self._epoch:
                    live.verified = max(live.verified, total)
                return
            logger.warning("session %s: audit of %s%s at positions [%d, %d) on %s: error %.3g over tolerance %.3g; "
                           "asking a third server", self.session_id[:8], peer[-6:], blocks, start, total,
                           auditor[-6:], record.error, tol)
            referee = self._pick(self._auditors(live, (auditor,)), peer)
            if referee is None:
                record.verdict = "disputed"
                logger.warning("session %s: %s and %s disagree on %s and no third server covers them: nobody banned",
                               self.session_id[:8], peer[-6:], auditor[-6:], blocks)
                return
            record.referee = referee.peer_id
            full = full or await self._inputs_from(steps, inputs, 0)  # the rare path: every input, stateless
            third = (await self._forward_on(referee.peer_id, blocks, *full)).float()[:, start:]
            referee_prec = self._precision(referee.peer_id)
            server_wrong = relative_error(claimed, third, valid) > tolerance(
                self._precision(peer), referee_prec, kept, compressed) + live.extra_tolerance
            auditor_wrong = relative_error(reference, third, valid) > tolerance(self._precision(auditor), referee_prec)
            if server_wrong and not auditor_wrong:
                record.verdict = "liar"
                self.detections.append((peer, self.steps_taken - live.joined_step))
                await self._convict(peer, blocks, full[0], claimed, reference, [auditor, referee.peer_id], record)
                self._verdicts.append((live, start))
            elif auditor_wrong and not server_wrong:
                record.verdict = "auditor lied"
                if epoch == self._epoch:
                    live.verified = max(live.verified, total)
                self._drop_auditor(live, "it returned wrong outputs")
                await self._convict(auditor, blocks, full[0], reference, third, [peer, referee.peer_id], record)
            else:
                record.verdict = "disputed"
                logger.warning("session %s: no majority among %s, %s and %s on %s: nobody banned", self.session_id[:8],
                               peer[-6:], auditor[-6:], referee.peer_id[-6:], blocks)
        except asyncio.CancelledError:
            record.verdict = "cancelled"
            raise
        except Exception as e:  # an audit that cannot run proves nothing; the next one tries again
            logger.info("session %s: audit of %s%s failed: %r", self.session_id[:8], peer[-6:], blocks, e)
        finally:
            self.audits.append(record)

    async def _convict(self, peer_id: str, blocks: Span, hidden: torch.Tensor, wrong: torch.Tensor,
                       majority: torch.Tensor, witnesses: list[str], record: AuditRecord) -> None:
        """Ban a server for good and accuse it in the DHT, signed by this client's key."""
        self.swarm.convict(PeerIDStr(peer_id), f"outputs for blocks {blocks} off by {record.error:.3g} "
                                               f"(tolerance {record.tolerance:.3g}) against {', '.join(witnesses)}")
        # published in a task of its own: replacing the liar cancels this audit, not the evidence
        task = asyncio.ensure_future(self.swarm.accuse(Accusation(
            accused=peer_id, start=blocks.start, end=blocks.end, inputs_digest=digest(hidden),
            accused_digest=digest(wrong), majority_digest=digest(majority), witnesses=witnesses,
            error=min(record.error, 1e30), tolerance=record.tolerance, at=get_dht_time())))
        _pings.add(task)
        task.add_done_callback(_pings.discard)

    async def _apply_verdicts(self) -> None:
        """Act on convicted hops: roll back to the earliest position since which a liar's outputs are
        unchecked, replace the liar (replaying its blocks' history into an honest server) and raise
        ``Rewound`` so that the caller computes those positions again."""
        if not self._verdicts:
            return
        verdicts, self._verdicts = self._verdicts, []
        position = min(min(p for _, p in verdicts), self._wire_position)
        rerun_prefix = position < self.prefix_length
        self._truncate(0 if rerun_prefix else position)
        for live, _ in verdicts:
            index = self._index(live)
            if index is not None:
                if index + 1 < len(self._hops):  # what the next hop really got (checked up to the rewind)
                    with contextlib.suppress(Exception):  # else the replacement's replay outputs stand in
                        await asyncio.wait_for(self._fetch_history(self._hops[index + 1]),
                                               min(self.swarm.config.request_timeout, _FETCH_HELD_S))
                await self._replace(index)
        if rerun_prefix:  # the prompt embeddings' outputs were wrong too: run them again
            inputs = _StepInputs(self._next_step_id, 0, None, None)
            self._next_step_id += 1
            out = await self._step(self.tuning.prefix.expand(self.batch_size, -1, -1), inputs)
            self._steps.append(inputs)
            self._outputs.append(out)
            position = self.prefix_length
        self.position = position - self.prefix_length
        if self.input_ids is not None:
            self.input_ids = self.input_ids[:, : self.position]
        raise Rewound(self.position, verdicts[0][0].hop.peer_id)
