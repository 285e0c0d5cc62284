"""Inference sessions: a chain of per-server sessions whose KV caches hold the sequence so far."""

from __future__ import annotations

import asyncio
import logging
import uuid

import torch

from stamen.client import loop
from stamen.client.routing import Hop
from stamen.client.swarm import Swarm
from stamen.errors import SessionLengthError
from stamen.server.config import DTYPES
from stamen.server.handler import InferenceStream

logger = logging.getLogger(__name__)


class InferenceSession:
    """Open with ``max_length`` (positions per sequence) and ``batch_size``; ``step`` appends hidden
    states and returns the last block's outputs. ``input_ids`` tracks the tokens sent so far, so that
    generate calls passing the whole sequence only send what the servers have not seen."""

    def __init__(self, swarm: Swarm, max_length: int, batch_size: int = 1):
        self.swarm, self.max_length, self.batch_size = swarm, max_length, batch_size
        self.session_id = uuid.uuid4().hex
        self.route: list[Hop] = []
        self._streams: list[InferenceStream] = []
        self._wire_dtypes: list[torch.dtype] = []
        self.position = 0
        self.input_ids: torch.Tensor | None = None
        """(B, position) token ids behind the cached positions, kept by the model's generate."""
        self.closed = False

    def __enter__(self) -> InferenceSession:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        self.route = self.swarm.route(min_cache_tokens=self.max_length * self.batch_size)
        self._wire_dtypes = [DTYPES.get(self.swarm.dtype_of(h.peer_id), torch.float32) for h in self.route]
        self._streams = loop.run(self._open_streams(self.route))
        logger.info("session %s route: %s", self.session_id[:8], self.describe_route())

    async def _open_streams(self, route: list[Hop]) -> list[InferenceStream]:
        timeout = self.swarm.config.request_timeout
        results = await asyncio.gather(
            *(InferenceStream.open(self.swarm.p2p, self.swarm.peer(h.peer_id), h.blocks, self.session_id,
                                   self.max_length, self.batch_size, timeout) for h in route),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await asyncio.gather(*(r.close() for r in results if isinstance(r, InferenceStream)))
            raise errors[0]
        return list(results)

    def describe_route(self) -> str:
        return " -> ".join(f"{h.peer_id[-6:]}{h.blocks}" for h in self.route)

    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run hidden (B, T, H) through every block at the current position; returns (B, T, H)."""
        if self.closed:
            raise SessionLengthError("the inference session is closed")
        num_new = hidden.shape[1]
        if self.position + num_new > self.max_length:
            raise SessionLengthError(
                f"session max_length {self.max_length} exceeded: {self.position} positions + {num_new} new"
            )
        out = loop.run(self._step(hidden, attention_mask, position_ids))
        self.position += num_new
        return out.to(hidden.dtype)

    async def _step(self, hidden, attention_mask, position_ids) -> torch.Tensor:
        for wire_dtype, stream in zip(self._wire_dtypes, self._streams, strict=False):
            hidden = await stream.step(hidden.to(wire_dtype), self.position, attention_mask, position_ids)
        return hidden

    def rollback(self, position: int) -> None:
        """Forget positions from ``position`` on; the next step overwrites them."""
        if not 0 <= position <= self.position:
            raise SessionLengthError(f"cannot roll back to {position}: the session holds {self.position}")
        self.position = position
        if self.input_ids is not None:
            self.input_ids = self.input_ids[:, :position]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._streams:
            loop.run(self._close_streams())

    async def _close_streams(self) -> None:
        await asyncio.gather(*(s.close() for s in self._streams), return_exceptions=True)
