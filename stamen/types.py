"""Small shared types: spans of blocks and distinct ID types."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NewType

PeerIDStr = NewType("PeerIDStr", str)
"""A libp2p peer id in its base58 text form."""

SessionID = NewType("SessionID", str)
"""An inference session id chosen by the client (uuid4 hex)."""

ModelName = NewType("ModelName", str)
"""The DHT prefix that names a model in the swarm (e.g. ``tiny-llama``)."""


@dataclass(frozen=True, order=True)
class Span:
    """A half-open range of transformer blocks ``[start, end)``."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not (0 <= self.start < self.end):
            raise ValueError(f"invalid span [{self.start}, {self.end}): need 0 <= start < end")

    @property
    def length(self) -> int:
        return self.end - self.start

    def __contains__(self, block: object) -> bool:
        return isinstance(block, int) and self.start <= block < self.end

    def covers(self, other: Span) -> bool:
        return self.start <= other.start and other.end <= self.end

    def __str__(self) -> str:
        return f"[{self.start}:{self.end})"

    @classmethod
    def parse(cls, text: str) -> Span:
        """Parse ``"A:B"`` into ``Span(A, B)``."""
        try:
            start, end = (int(part) for part in text.split(":"))
        except ValueError as e:
            raise ValueError(f"expected blocks as START:END, got {text!r}") from e
        return cls(start, end)


def missing_blocks(num_blocks: int, spans: Iterable[Span]) -> list[int]:
    """The blocks of ``[0, num_blocks)`` that no span covers."""
    covered = [False] * num_blocks
    for span in spans:
        for b in range(span.start, min(span.end, num_blocks)):
            covered[b] = True
    return [b for b, c in enumerate(covered) if not c]


def default_dht_prefix(model: str) -> ModelName:
    """A model's swarm name: the hub id or directory name, with characters the DHT key can hold."""
    name = model.rstrip("/")
    if Path(name).is_dir():
        name = Path(name).resolve().name
    return ModelName("".join(c if c.isalnum() or c in "-_" else "-" for c in name))
