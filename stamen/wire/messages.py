"""Typed wire messages. Every RPC payload is an ``ExpertRequest``/``ExpertResponse`` protobuf whose
``metadata`` is one of these models as JSON, validated once at the boundary."""

from __future__ import annotations

import functools
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from stamen.errors import InvalidRequestError
from stamen.types import Compression, Span


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


class AdapterRef(_Msg):
    """The LoRA adapters of the requested blocks, named by content hash (one per block, in block
    order). The server must hold them: else it replies ``unknown_adapter`` and the client uploads
    them with ``PutAdapters``."""

    hashes: list[str] = Field(min_length=1, max_length=4096)


# --- inference stream: client -> server ---


class OpenSession(_Msg):
    """Open a session: the server reserves KV cache for ``batch_size`` × ``max_length`` tokens.
    With ``has_prompts`` a tensor follows: deep prompts (n_blocks, P, H) added to positions [0, P)
    at every block's input; ``adapter`` applies LoRA adapters to every step."""

    kind: Literal["open"] = "open"
    session_id: str = Field(min_length=1, max_length=64)
    blocks: SpanRef
    max_length: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    has_prompts: bool = False
    adapter: AdapterRef | None = None
    compression: Compression | None = None
    """How the server sends this session's step outputs back and pushes them on (None: the
    server's default, ``stamen server --compression``)."""


class PushTarget(_Msg):
    """A later hop of the route: where a server pushes its output."""

    peer_id: str = Field(min_length=1, max_length=128)
    session_id: str = Field(min_length=1, max_length=64)


MAX_BURST = 256
"""The most steps one burst may announce (``Burst.size``)."""


class Burst(_Msg):
    """Steps that left one sender together: the outputs of one batched iteration pushed to the
    same next server (or replied to the same client), or the steps a client sent after one shared
    LM-head product. A receiver that holds some members of a burst may take the rest, which are
    already on their way, into the same batch (waiting a millisecond or two at most), so sessions
    that move in step stay in step down the chain."""

    id: str = Field(min_length=1, max_length=80)
    size: int = Field(ge=1, le=MAX_BURST)


class Step(_Msg):
    """Append new hidden states at ``position``; tensors: hidden (B, T, H), then optional
    attention_mask (B, T), position_ids (B, T) and hypo_ids (B,) as flagged. ``position`` below the server's
    current length rolls the cache back to it.

    ``step_id`` grows with every step of a session: a step whose id was already processed (the
    client's copy of an input that a previous server already pushed) is ignored, except that it
    makes the server send the replies it holds. ``push_to`` lists the following hops: the server
    sends its output to the first with the rest attached.

    ``hold_reply``: a server that pushes this step's output on may hold the client's copy of it
    and send it later with others (see ``FlushReplies``): the client of a decoding chain waits
    for the last hop only, and a copy sent at once would wake the client and the daemons while the
    next hops compute."""

    kind: Literal["step"] = "step"
    session_id: str = Field(min_length=1, max_length=64)
    step_id: int = Field(ge=0)
    position: int = Field(ge=0)
    has_attention_mask: bool = False
    has_position_ids: bool = False
    has_hypo_ids: bool = False
    """A (B,) tensor follows: reorder the cached sequences by it before this step (beam search)."""
    push_to: list[PushTarget] = Field(default_factory=list, max_length=256)
    hold_reply: bool = False
    burst: Burst | None = None
    """The burst this step left its sender in (``Burst``)."""


class FlushReplies(_Msg):
    """Send every reply held for the session now (a server also sends them once it holds
    ``HELD_REPLIES_MAX``, on a duplicate step, and with any reply it does not hold). No reply of its own."""

    kind: Literal["flush"] = "flush"
    session_id: str = Field(min_length=1, max_length=64)


HELD_REPLIES_MAX = 16
"""Replies a server holds per session before it sends them all (``Step.hold_reply``)."""


class CloseSession(_Msg):
    kind: Literal["close"] = "close"
    session_id: str = Field(min_length=1, max_length=64)


InferenceRequest = Annotated[OpenSession | Step | FlushReplies | CloseSession, Field(discriminator="kind")]

# --- inference stream: server -> client ---


class Opened(_Msg):
    kind: Literal["opened"] = "opened"
    session_id: str


class StepDone(_Msg):
    """Tensors: the span's output hidden states (B, T, H) in the server's compute dtype (compressed
    as the session asked)."""

    kind: Literal["step_done"] = "step_done"
    session_id: str
    step_id: int
    position: int
    """The session's length after this step."""
    compute_ms: float = 0.0
    """Time the server spent computing this step (for latency breakdowns)."""
    burst: Burst | None = None
    """The replies to one client that left this server's iteration together (``Burst``)."""


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
    retry_after: float | None = Field(default=None, ge=0)
    """Seconds after which a retry may succeed (``server_busy``)."""




InferenceReply = Annotated[Opened | StepDone | Closed | ErrorReply, Field(discriminator="kind")]

# --- stateless forward ---


class ForwardRequest(_Msg):
    """Tensors (streamed in parts): hidden (B, T, H), then optional attention_mask, position_ids and
    deep prompts (n_blocks, P, H) as flagged. ``adapter`` names the LoRA adapters to apply."""

    kind: Literal["forward"] = "forward"
    blocks: SpanRef
    has_attention_mask: bool = False
    has_position_ids: bool = False
    has_prompts: bool = False
    adapter: AdapterRef | None = None
    compression: Compression | None = None
    """How the server sends the outputs back (None: the server's default)."""


class ForwardDone(_Msg):
    kind: Literal["forward_done"] = "forward_done"
    parts: int = Field(default=1, ge=1, le=1 << 20)
    """Stream messages of the reply (this metadata rides on the first): a client that gets fewer
    knows the stream was cut."""


ForwardReply = Annotated[ForwardDone | ErrorReply, Field(discriminator="kind")]

# --- stateless backward ---


class BackwardRequest(_Msg):
    """Gradients of a span's inputs from its inputs and the gradients of its outputs; the server
    recomputes the span's activations. Tensors (streamed in parts): hidden (B, T, H),
    grad_outputs (B, T, H), then optional attention_mask, position_ids and deep prompts
    (n_blocks, P, H) as flagged."""

    kind: Literal["backward"] = "backward"
    blocks: SpanRef
    has_attention_mask: bool = False
    has_position_ids: bool = False
    has_prompts: bool = False
    adapter: AdapterRef | None = None
    train_lora_a: bool = True
    """Return gradients of LoRA A matrices too (False for LoRA-FA, where A is frozen)."""
    compression: Compression | None = None
    """How the server sends grad_inputs back (None: uncompressed; the server's default applies to
    inference and forwards only). Prompt and LoRA gradients always go uncompressed."""


class BackwardDone(_Msg):
    """Tensors: grad_inputs (B, T, H); grad_prompts (n_blocks, P, H) if ``has_prompt_grads``; then
    ``num_adapter_grads`` LoRA gradients: per block, per target in canonical order, A (if trained) then B."""

    kind: Literal["backward_done"] = "backward_done"
    has_prompt_grads: bool = False
    num_adapter_grads: int = Field(default=0, ge=0)
    parts: int = Field(default=1, ge=1, le=1 << 20)
    """Stream messages of the reply, as in ``ForwardDone``."""
    accumulated: bool = False
    """A training microbatch's weight gradient was added to the stage's accumulators by this call
    (False: not asked, or this peer already held it)."""
    stage_epoch: int | None = None
    """The epoch the stage's peer was in when it counted the microbatch."""


BackwardReply = Annotated[BackwardDone | ErrorReply, Field(discriminator="kind")]

# --- training stream: forward with autograd, then backward on the kept graph, in one call ---


class Microbatch(_Msg):
    """A training microbatch on a server whose blocks train (``stamen server --train``): the backward
    also adds the gradient of the span's weights to the stage's accumulators, once per ``id`` and
    epoch, counting ``samples`` towards the stage's target batch."""

    id: str = Field(min_length=1, max_length=128)
    samples: int = Field(ge=1, le=1 << 20)
    epoch: int | None = Field(default=None, ge=0)
    """The stage epoch the trainer computed this microbatch for (synchronous training: another
    epoch is a ``stage_epoch`` error); None: count it in the epoch the stage is in."""
    accumulate: bool = True
    """False: only the forward and backward (a rerun whose gradient this stage already holds)."""


class TrainRequest(_Msg):
    """Message 1 of ``rpc_train``: run a span forward keeping its autograd graph for the backward
    that follows in the same call. Tensors (``parts`` stream messages, this metadata on the first):
    hidden (B, T, H), then optional attention_mask, position_ids and deep prompts as flagged."""

    kind: Literal["train"] = "train"
    blocks: SpanRef
    parts: int = Field(ge=1, le=1 << 20)
    has_attention_mask: bool = False
    has_position_ids: bool = False
    has_prompts: bool = False
    adapter: AdapterRef | None = None
    train_lora_a: bool = True
    """Return gradients of LoRA A matrices too (False for LoRA-FA, where A is frozen)."""
    compression: Compression | None = None
    """How the server sends the outputs and grad_inputs back (None: uncompressed, as for
    ``BackwardRequest``)."""
    microbatch: Microbatch | None = None
    """Train the span's own weights on this microbatch (servers started with ``--train`` only)."""
    recompute: bool = False
    """Keep only the inputs between the messages and recompute the forward with autograd when the
    gradient arrives (activation recomputation: less memory held, one more forward)."""


class TrainForwardDone(_Msg):
    """The span's outputs (B, T, H) follow in ``parts`` stream messages; the graph is kept until the
    client sends ``TrainBackward``, closes the stream or lets the server's timeout pass."""

    kind: Literal["train_forward_done"] = "train_forward_done"
    parts: int = Field(ge=1)


class TrainBackward(_Msg):
    """Message 2 of ``rpc_train``: grad_outputs (B, T, H) in ``parts`` stream messages. The reply is
    ``BackwardDone`` with the gradients ``rpc_backward`` returns; the call then ends."""

    kind: Literal["train_backward"] = "train_backward"
    parts: int = Field(ge=1, le=1 << 20)


TrainForwardReply = Annotated[TrainForwardDone | ErrorReply, Field(discriminator="kind")]

# --- a training stage's state: parameters, optimizer and averager state, for joiners and exports ---


class StageStateRequest(_Msg):
    kind: Literal["stage_state"] = "stage_state"
    blocks: SpanRef
    """The span whose state is asked for: the server's whole span."""
    optimizer: bool = True
    """Include the optimizer's and the averager's state (False: the parameters only, for exports)."""


class StageState(_Msg):
    """A stage's state at ``epoch``: ``len(names)`` tensors follow in ``parts`` stream messages, in
    the order of ``names`` ("param.<name>" for the span's parameters in ``SpanModel`` naming,
    "optim.<i>.<key>" and "averager.<i>" for the rest)."""

    kind: Literal["stage_state_reply"] = "stage_state_reply"
    epoch: int = Field(ge=0)
    names: list[str] = Field(max_length=1 << 16)
    optimizer_meta: dict[str, Any] = Field(default_factory=dict)
    """The optimizer's non-tensor state (param groups, per-parameter step counts)."""
    parts: int = Field(default=1, ge=1, le=1 << 20)


StageStateReply = Annotated[StageState | ErrorReply, Field(discriminator="kind")]


class TrainerStateRequest(_Msg):
    """The trainers' shared state (their client parts' parameters, optimizer and averager state),
    asked of a trainer by one that fell behind or joined late; the reply is a ``StageState`` with
    "param.<name>" for the client parts ("embed_tokens.weight", "norm.weight", "lm_head.weight")."""

    kind: Literal["trainer_state"] = "trainer_state"
    model: str = Field(min_length=1, max_length=256)
    """The model (its DHT prefix) the asking trainer trains: a trainer answers only for its own."""
    optimizer: bool = True

# --- LoRA adapters, content-addressed ---


class AdapterMeta(_Msg):
    """One block's adapter: its tensors are A (r, in) and B (out, r) for each target, in order."""

    hash: str = Field(min_length=1, max_length=128)
    """``stamen.models.lora.adapter_hash`` of the weights; the server checks it."""
    targets: list[str] = Field(min_length=1, max_length=7)
    rank: int = Field(gt=0, le=4096)
    scaling: float


class PutAdapters(_Msg):
    """Upload adapters (tensors streamed in parts, in the order of ``adapters``) into the server's cache."""

    kind: Literal["put_adapters"] = "put_adapters"
    adapters: list[AdapterMeta] = Field(min_length=1, max_length=4096)


class AdaptersStored(_Msg):
    kind: Literal["adapters_stored"] = "adapters_stored"
    hashes: list[str]


PutAdaptersReply = Annotated[AdaptersStored | ErrorReply, Field(discriminator="kind")]

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
    kept_backwards: int = 0
    """Backwards served from a graph kept since the forward of the same ``rpc_train`` call."""
    recomputed_backwards: int = 0
    """Stateless backwards (``rpc_backward``), which recompute the span's activations."""
    train_graphs_held: int = 0
    """Training graphs held now (``rpc_train`` calls between their forward and backward)."""
    compression: Compression = "none"
    """The server's default compression of what it sends (``stamen server --compression``)."""
    push_messages: int = 0
    """Steps this server pushed to next servers."""
    push_bytes: int = 0
    """Serialized bytes (protobuf size) of those pushes."""
    batching: bool = False
    """Whether the server batches the inference steps of concurrent sessions."""
    batch_iterations: int = 0
    """Batched iterations computed; ``batch_steps / batch_iterations`` is the mean batch size."""
    batch_steps: int = 0
    """Session steps (and prefill chunks) those iterations computed, summed."""
    batch_chunks: int = 0
    """Prefill chunks: parts of a step that did not fit one iteration."""
    burst_waits: int = 0
    """Iterations that waited for members of a ``Burst`` still on the wire."""
    burst_misses: int = 0
    """Bursts whose wait ended before every member arrived."""


# --- bandwidth probe ---


class BandwidthDone(_Msg):
    """The reply to a bandwidth probe: how many payload bytes arrived."""

    kind: Literal["bandwidth_done"] = "bandwidth_done"
    received: int = Field(ge=0)


_inference_request = TypeAdapter(InferenceRequest)
_inference_reply = TypeAdapter(InferenceReply)
_forward_reply = TypeAdapter(ForwardReply)
_adapter = functools.cache(TypeAdapter)
"""One TypeAdapter per message type, built once: building one costs more than the validation it does."""


def encode(msg: BaseModel) -> bytes:
    """Compact JSON: fields at their defaults are left out (the receiver fills them in again), all
    but ``kind``, which tags the message."""
    fields = msg.model_dump(mode="json", exclude_defaults=True)
    if "kind" in type(msg).model_fields:
        fields = {"kind": msg.kind, **fields}
    return json.dumps(fields, separators=(",", ":")).encode()


def decode_inference_request(raw: bytes) -> OpenSession | Step | FlushReplies | CloseSession:
    return _parse(_inference_request, raw)


def decode_inference_reply(raw: bytes) -> Opened | StepDone | Closed | ErrorReply:
    return _parse(_inference_reply, raw)


def decode_forward_request(raw: bytes) -> ForwardRequest:
    return _parse(_adapter(ForwardRequest), raw)


def decode_forward_reply(raw: bytes) -> ForwardDone | ErrorReply:
    return _parse(_forward_reply, raw)


def decode_backward_request(raw: bytes) -> BackwardRequest:
    return _parse(_adapter(BackwardRequest), raw)


def decode_backward_reply(raw: bytes) -> BackwardDone | ErrorReply:
    return _parse(_adapter(BackwardReply), raw)


def decode_train_request(raw: bytes) -> TrainRequest:
    return _parse(_adapter(TrainRequest), raw)


def decode_train_forward_reply(raw: bytes) -> TrainForwardDone | ErrorReply:
    return _parse(_adapter(TrainForwardReply), raw)


def decode_train_backward(raw: bytes) -> TrainBackward:
    return _parse(_adapter(TrainBackward), raw)


def decode_stage_state_request(raw: bytes) -> StageStateRequest:
    return _parse(_adapter(StageStateRequest), raw)


def decode_stage_state_reply(raw: bytes) -> StageState | ErrorReply:
    return _parse(_adapter(StageStateReply), raw)


def decode_trainer_state_request(raw: bytes) -> TrainerStateRequest:
    return _parse(_adapter(TrainerStateRequest), raw)


def decode_put_adapters(raw: bytes) -> PutAdapters:
    return _parse(_adapter(PutAdapters), raw)


def decode_put_adapters_reply(raw: bytes) -> AdaptersStored | ErrorReply:
    return _parse(_adapter(PutAdaptersReply), raw)


def decode_step(raw: bytes) -> Step:
    return _parse(_adapter(Step), raw)


def decode_push_reply(raw: bytes) -> ErrorReply:
    return _parse(_adapter(ErrorReply), raw)


def decode_bandwidth_reply(raw: bytes) -> BandwidthDone:
    return _parse(_adapter(BandwidthDone), raw)


def decode_info_reply(raw: bytes) -> InfoReply:
    return _parse(_adapter(InfoReply), raw)


def _parse(adapter: TypeAdapter, raw: bytes):
    try:
        return adapter.validate_json(raw)
    except ValidationError as e:
        errors = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5])
        raise InvalidRequestError(f"malformed message: {errors}") from None
