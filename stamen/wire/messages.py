"""Typed wire messages. Every RPC payload is an ``ExpertRequest``/``ExpertResponse`` protobuf whose
``metadata`` is one of these models as JSON, validated once at the boundary."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from stamen.errors import InvalidRequestError
from stamen.types import Span


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SpanRef(_Msg):
    """Blocks ``[start, end)`` that a request asks a server to run."""

    start: int = Field(ge=0)
    end: int = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> SpanRef:
        if self.end <= self.start:
            raise ValueError("end must be greater than start")
        return self

    @property
    def span(self) -> Span:
        return Span(self.start, self.end)

    @classmethod
    def of(cls, span: Span) -> SpanRef:
        return cls(start=span.start, end=span.end)


# --- inference stream: client -> server ---


class OpenSession(_Msg):
    """Open a session: the server reserves KV cache for ``batch_size`` × ``max_length`` tokens."""

    kind: Literal["open"] = "open"
    session_id: str = Field(min_length=1, max_length=64)
    blocks: SpanRef
    max_length: int = Field(gt=0)
    batch_size: int = Field(gt=0)


class PushTarget(_Msg):
    """A later hop of the route: where a server pushes its output."""

    peer_id: str = Field(min_length=1, max_length=128)
    session_id: str = Field(min_length=1, max_length=64)


class Step(_Msg):
    """Append new hidden states at ``position``; tensors: hidden (B, T, H), then optional
    attention_mask (B, T), position_ids (B, T) and hypo_ids (B,) as flagged. ``position`` below the server's
    current length rolls the cache back to it.

    ``step_id`` grows with every step of a session: a step whose id was already processed (the
    client's copy of an input that a previous server already pushed) is ignored. ``push_to``
    lists the following hops: the server sends its output to the first with the rest attached."""

    kind: Literal["step"] = "step"
    session_id: str = Field(min_length=1, max_length=64)
    step_id: int = Field(ge=0)
    position: int = Field(ge=0)
    has_attention_mask: bool = False
    has_position_ids: bool = False
    has_hypo_ids: bool = False
    """A (B,) tensor follows: reorder the cached sequences by it before this step (beam search)."""
    push_to: list[PushTarget] = Field(default_factory=list, max_length=256)


class CloseSession(_Msg):
    kind: Literal["close"] = "close"
    session_id: str = Field(min_length=1, max_length=64)


InferenceRequest = Annotated[OpenSession | Step | CloseSession, Field(discriminator="kind")]

# --- inference stream: server -> client ---


class Opened(_Msg):
    kind: Literal["opened"] = "opened"
    session_id: str


class StepDone(_Msg):
    """Tensors: the span's output hidden states (B, T, H) in the server's compute dtype."""

    kind: Literal["step_done"] = "step_done"
    session_id: str
    step_id: int
    position: int
    """The session's length after this step."""
    compute_ms: float = 0.0
    """Time the server spent computing this step (for latency breakdowns)."""


class Closed(_Msg):
    kind: Literal["closed"] = "closed"
    session_id: str


class ErrorReply(_Msg):
    """A typed error (see ``stamen.errors``); the server goes on serving."""

    kind: Literal["error"] = "error"
    code: str
    message: str
    step_id: int | None = None
    """The step that failed, when the error belongs to one."""




InferenceReply = Annotated[Opened | StepDone | Closed | ErrorReply, Field(discriminator="kind")]

# --- stateless forward ---


class ForwardRequest(_Msg):
    """Tensors (streamed in parts): hidden (B, T, H), then optional attention_mask and position_ids."""

    kind: Literal["forward"] = "forward"
    blocks: SpanRef
    has_attention_mask: bool = False
    has_position_ids: bool = False


class ForwardDone(_Msg):
    kind: Literal["forward_done"] = "forward_done"


ForwardReply = Annotated[ForwardDone | ErrorReply, Field(discriminator="kind")]

# --- server info (ping) ---


class InfoRequest(_Msg):
    kind: Literal["info"] = "info"


class InfoReply(_Msg):
    kind: Literal["info_reply"] = "info_reply"
    peer_id: str
    blocks: SpanRef
    dtype: str
    cache_tokens_left: int
    version: str
    pushed_steps: int = 0
    """Steps this server computed from an input another server pushed (before the client's copy)."""


_inference_request = TypeAdapter(InferenceRequest)
_inference_reply = TypeAdapter(InferenceReply)
_forward_reply = TypeAdapter(ForwardReply)


def encode(msg: BaseModel) -> bytes:
    return msg.model_dump_json().encode()


def decode_inference_request(raw: bytes) -> OpenSession | Step | CloseSession:
    return _parse(_inference_request, raw)


def decode_inference_reply(raw: bytes) -> Opened | StepDone | Closed | ErrorReply:
    return _parse(_inference_reply, raw)


def decode_forward_request(raw: bytes) -> ForwardRequest:
    return _parse(TypeAdapter(ForwardRequest), raw)


def decode_forward_reply(raw: bytes) -> ForwardDone | ErrorReply:
    return _parse(_forward_reply, raw)


def decode_step(raw: bytes) -> Step:
    return _parse(TypeAdapter(Step), raw)


def decode_push_reply(raw: bytes) -> ErrorReply:
    return _parse(TypeAdapter(ErrorReply), raw)


def decode_info_reply(raw: bytes) -> InfoReply:
    return _parse(TypeAdapter(InfoReply), raw)


def _parse(adapter: TypeAdapter, raw: bytes):
    try:
        return adapter.validate_json(raw)
    except ValidationError as e:
        errors = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5])
        raise InvalidRequestError(f"malformed message: {errors}") from None
