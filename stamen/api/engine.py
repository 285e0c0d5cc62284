"""Text in, text out over the swarm: prompts from chat messages, one inference session per request,
incremental text with stop strings, finish reasons and token counts. No HTTP here; the app and the
terminal chat both drive it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation import StoppingCriteriaList

from stamen.client.session import InferenceSession
from stamen.errors import InvalidRequestError, SwarmNotReadyError
from stamen.types import missing_blocks

logger = logging.getLogger(__name__)

GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily (as vLLM does): dividing logits by 1e-300 overflows to
infinities, and sampling from them fails."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Started:
    """The request's session is open on the servers; text follows."""

    route: str


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: str
    """``stop`` (end of sequence, a stop string or cancelled) or ``length``."""
    prompt_tokens: int
    completion_tokens: int
    text: str
    first_token_s: float = 0.0
    """Seconds from the open session to the first generated token (the prompt's pass)."""
    ms_per_token: float = 0.0
    """Mean time per token after the first (0 with fewer than two tokens)."""


Event = Started | TextDelta | Finished


class TextTracker:
    """Turns generated token ids into safe text deltas: holds back an incomplete UTF-8 character and
    any tail that could still become a stop string, and cuts the text at the first stop string.

    Decoding is incremental (a few tokens of context per step, as vLLM does), so a token costs the
    same at position 10 and at position 10 000: the tokens since the last stable point are decoded
    with and without the newest ones, and the difference is the new text."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), eos_token_ids: tuple[int, ...] = ()):
        self.tokenizer, self.stop, self.eos = tokenizer, tuple(s for s in stop if s), set(eos_token_ids)
        self.tokens: list[int] = []
        self.count = 0
        """Tokens generated, end-of-sequence included."""
        self.emitted = ""
        self.finish_reason: str | None = None
        self._text = ""
        """Stable text so far (may still hold a possible stop-string prefix not yet emitted)."""
        self._prefix = 0
        self._read = 0
        self._max_stop = max((len(s) for s in self.stop), default=0)

    def add(self, token: int) -> str:
        """Record one generated token; returns the text that may be shown now ('' if none)."""
        self.count += 1
        if self.finish_reason is not None:
            return ""
        if token in self.eos:
            self.finish_reason = "stop"
            return self._flush(self._text)
        self.tokens.append(token)
        grown = self._decode_new()
        if not grown:  # no complete character yet (or an invisible token)
            return ""
        searched_from = max(0, len(self._text) - len(grown) - self._max_stop + 1)
        cut = min((i for i in (self._text.find(s, searched_from) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.finish_reason = "stop"
            self._text = self._text[:cut]
            return self._flush(self._text)
        return self._flush(self._text[: len(self._text) - self._stop_prefix_len(self._text)])

    def _decode_new(self) -> str:
        """Append the text the newest tokens complete to ``_text``; returns it."""
        decode = self.tokenizer.decode
        before = decode(self.tokens[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self.tokens[self._prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        grown = after[len(before):]
        self._text += grown
        self._prefix, self._read = self._read, len(self.tokens)
        return grown

    def finish(self) -> str:
        """The text still held back once generation has ended (by length or cancellation)."""
        if self.finish_reason is None:
            before = self.tokenizer.decode(self.tokens[self._prefix : self._read], skip_special_tokens=True)
            after = self.tokenizer.decode(self.tokens[self._prefix :], skip_special_tokens=True).rstrip("\ufffd")
            if len(after) > len(before):
                self._text += after[len(before):]
        return self._flush(self._text)

    @property
    def text(self) -> str:
        return self.emitted

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of ``text`` that starts some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if s.startswith(text[-n:]):
                    best = n
                    break
        return best

    def _flush(self, text: str) -> str:
        if not text.startswith(self.emitted):  # decoding changed earlier text: never unsay it
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta


class _Run:
    """One generate call's streamer (transformers' put/end protocol) and stopping criterion."""

    def __init__(self, tracker: TextTracker, emit: Callable[[Event], None], cancel: threading.Event,
                 route: Callable[[], str]):
        self.tracker, self.emit, self.cancel, self.route = tracker, emit, cancel, route
        self._started = False
        self.start = time.perf_counter()
        self.token_times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if not self._started:  # the prompt: the session is open
            self._started = True
            self.start = time.perf_counter()
            self.emit(Started(self.route()))
            return
        self.token_times.append(time.perf_counter())
        for token in value.reshape(-1).tolist():
            delta = self.tracker.add(int(token))
            if delta:
                self.emit(TextDelta(delta))

    def end(self) -> None:
        pass

    def timing(self) -> tuple[float, float]:
        """(seconds to the first token, ms per later token)."""
        times = self.token_times
        if not times:
            return 0.0, 0.0
        per = (times[-1] - times[0]) / (len(times) - 1) * 1000 if len(times) > 1 else 0.0
        return times[0] - self.start, per

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = self.cancel.is_set() or self.tracker.finish_reason is not None
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool)


@dataclass
class Engine:
    """A distributed model with its tokenizer, serving text requests (thread-safe: every request
    runs in its own thread and its own inference session)."""

    model: Any
    """A ``DistributedModelForCausalLM``."""
    tokenizer: Any
    model_id: str
    """The name clients use (``model`` in requests)."""
    default_max_tokens: int = 256
    """New tokens when a request names no limit (also capped by the context)."""
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise InvalidRequestError(f"{self.model_id} has no chat template: use /v1/completions")
        from jinja2 import TemplateError  # transformers renders chat templates with jinja2

        try:
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=True)["input_ids"])
        except TemplateError as e:  # the template refuses these messages (a role it lacks, an order it forbids)
            raise InvalidRequestError(f"the model's chat template refuses these messages: {e}") from None

    def text_prompt(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def check_ready(self) -> None:
        """Raise SwarmNotReadyError (fast, from the cached DHT view) if some block has no server."""
        swarm = self.model.swarm
        missing = missing_blocks(swarm.num_blocks, (s.span for s in swarm.servers()))
        if missing:
            raise SwarmNotReadyError(f"no online servers for blocks {missing[0]}..{missing[-1]} of "
                                     f"{swarm.model_name}: the swarm does not cover the model yet", missing)

    def resolve_max_tokens(self, prompt_tokens: int, requested: int | None) -> int:
        """New tokens for a request, or InvalidRequestError when prompt + completion exceed the context."""
        context = self.context_length
        if requested is None:
            requested = min(self.default_max_tokens, context - prompt_tokens)
        if prompt_tokens + requested > context or requested < 1:
            raise InvalidRequestError(
                f"this model's maximum context length is {context} tokens; the request needs "
                f"{prompt_tokens + max(requested, 0)} ({prompt_tokens} in the prompt, {requested} for the completion)")
        return requested

    def generate(self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[Event], None],
                 cancel: threading.Event | None = None, session: Any = None) -> Finished:
        """Generate in the calling thread, emitting Started, TextDelta... and a final Finished
        (also returned). ``cancel`` ends generation early (finish reason ``stop``); the request's
        inference session is closed on return, freeing the servers' cache. With ``session``, the
        tokens that session has already seen are not sent again (multi-turn chat)."""
        cancel = cancel or threading.Event()
        tracker = TextTracker(self.tokenizer, params.stop, self.eos_token_ids)
        generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        sampling = params.temperature >= GREEDY_BELOW
        kwargs: dict[str, Any] = {"do_sample": sampling}
        if sampling:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        with contextlib.ExitStack() as stack:
            if session is None:  # not model.inference_session: that one is shared by the model's users
                session = stack.enter_context(
                    InferenceSession(self.model.swarm, len(prompt_ids) + params.max_new_tokens))
            run = _Run(tracker, emit, cancel, session.describe_route)
            self.model.generate(torch.tensor([prompt_ids], dtype=torch.long), max_new_tokens=params.max_new_tokens,
                                streamer=run, stopping_criteria=StoppingCriteriaList([run]), session=session,
                                generator=generator, **kwargs)
        tail = tracker.finish()
        if tail:
            emit(TextDelta(tail))
        reason = tracker.finish_reason or ("stop" if cancel.is_set() else "length")
        done = Finished(reason, len(prompt_ids), tracker.count, tracker.text, *run.timing())
        emit(done)
        return done
