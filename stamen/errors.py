"""Typed errors. Server-side errors carry a stable ``code`` so that they cross the wire intact."""

from __future__ import annotations


class StamenError(Exception):
    """Base class of every error Stamen raises on purpose."""

    code = "internal"


class UnsupportedModelError(StamenError):
    """The model's architecture or settings are not implemented."""

    code = "unsupported_model"


class CheckpointError(StamenError):
    """A model directory or hub id could not be read (missing files or tensors)."""

    code = "checkpoint"


class QuantizationError(StamenError):
    """Weights cannot be quantized as asked (unknown method, weights not loaded)."""

    code = "quantization"


# --- errors a server returns for a request (the server keeps serving) ---


class RequestError(StamenError):
    """Base class of errors caused by a request; a server replies with it and keeps serving."""

    code = "bad_request"


class InvalidRequestError(RequestError):
    """Malformed metadata or tensors: wrong shape, dtype, size, or missing fields."""

    code = "invalid_request"


class WrongBlocksError(RequestError):
    """The request names blocks this server does not host."""

    code = "wrong_blocks"


class ServerFullError(RequestError):
    """The server's KV cache budget cannot hold the requested session."""

    code = "server_full"


class ServerBusyError(ServerFullError):
    """The requesting peer is over its share of the server (open sessions, KV cache or queued
    steps) while other peers use it: retry after ``retry_after`` seconds, or use another server."""

    code = "server_busy"

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class UnknownSessionError(RequestError):
    """The request names a session that this server never opened (or already freed)."""

    code = "unknown_session"


class SessionClosedError(RequestError):
    """The session was closed (by the client or for idling) and cannot take more steps."""

    code = "session_closed"


class SessionLengthError(RequestError):
    """A step would go past the session's max length, or starts at a position the server lacks."""

    code = "session_length"


class UnknownAdapterError(RequestError):
    """The request names LoRA adapters (by content hash) that the server does not hold: upload them."""

    code = "unknown_adapter"


class NotTrainingError(RequestError):
    """The request asks a server to train its blocks (a microbatch, the stage's state), but it
    serves them frozen (started without ``--train``)."""

    code = "not_training"


class StageEpochError(RequestError):
    """A microbatch names another epoch than the one the stage's peer is in: the peer is behind
    (it loads the stage's state, try another peer) or the stage already stepped past it."""

    code = "stage_epoch"


_REQUEST_ERRORS: dict[str, type[RequestError]] = {
    cls.code: cls
    for cls in (
        RequestError,
        InvalidRequestError,
        WrongBlocksError,
        ServerFullError,
        ServerBusyError,
        UnknownSessionError,
        SessionClosedError,
        SessionLengthError,
        UnknownAdapterError,
        NotTrainingError,
        StageEpochError,
    )
}


def request_error_from_code(code: str, message: str, retry_after: float | None = None) -> RequestError:
    """Rebuild the typed error a server sent (unknown codes become a plain RequestError)."""
    cls = _REQUEST_ERRORS.get(code, RequestError)
    return cls(message, retry_after) if cls is ServerBusyError else cls(message)


# --- client-side errors ---


class RemoteCallError(StamenError):
    """A remote call failed for a network reason (lost connection, timeout, crashed peer)."""

    code = "remote_call"


class SwarmNotReadyError(StamenError):
    """Online servers do not cover every block of the model within the wait timeout."""

    code = "swarm_not_ready"

    def __init__(self, message: str, missing_blocks: list[int] | None = None):
        super().__init__(message)
        self.missing_blocks = missing_blocks or []
