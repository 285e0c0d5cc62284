"""Errors on the wire: a server answers every failure with a typed ``ErrorReply``; a client
raises the same ``StamenError`` class from it."""

from __future__ import annotations

import logging
from collections.abc import Callable

from stamen.errors import RemoteCallError, RequestError, request_error_from_code
from stamen.rpc.protocol import Response
from stamen.wire.messages import ErrorReply, encode

logger = logging.getLogger(__name__)

on_error: Callable[[str], None] | None = None
"""Called with the code of every error reply built here (a server counts its refusals with it)."""


def error_response(e: Exception, step_id: int | None = None) -> Response:
    """The typed reply to a failed request: the error's own code for the project's request
    errors, ``internal`` (logged with its traceback) for anything else."""
    if on_error is not None:
        on_error(e.code if isinstance(e, RequestError) else "internal")
    if isinstance(e, RequestError):
        return Response(metadata=encode(ErrorReply(code=e.code, message=str(e), step_id=step_id,
                                                   retry_after=getattr(e, "retry_after", None))))
    logger.exception("internal error while serving a request")
    return Response(metadata=encode(ErrorReply(code="internal", message=f"internal server error: {e!r}",
                                               step_id=step_id)))


def raise_if_error(reply) -> None:
    if isinstance(reply, ErrorReply):
        raise request_error_from_code(reply.code, reply.message, reply.retry_after)


def check_complete(peer, what: str, messages: int, expected: int) -> None:
    """A counted reply whose stream ended early (the transport cut it) is a network fault, retried
    like one, never a tensor decoded from some of its parts."""
    if messages < expected:
        raise RemoteCallError(f"the {what} reply from {peer} ended after {messages} of {expected} messages")
