"""Small shared types: spans of blocks and distinct ID types."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NewType

PeerIDStr = NewType("PeerIDStr", str)
"""A libp2p peer id in its base58 text form."""

SessionID = NewType("SessionID", str)
"""An inference session id chosen by the client (uuid4 hex)."""

ModelName = NewType("ModelName", str)
"""The DHT prefix that names a model in the swarm (e.g. ``tiny-llama``)."""

MAX_RECORD_TTL = 300.0
"""The furthest ahead of now (seconds) a DHT record may expire: five times servers' default
``--record-ttl`` (leaving minutes of clock skew between peers); every peer refuses a record written
to last longer (``stamen/dht/node.py``)."""

DtypeName = Literal["float32", "bfloat16", "float16"]
"""A compute dtype by name (``stamen.models.config.DTYPES`` maps it to torch's)."""

Compression = Literal["none", "blockwise8"]
"""How activations travel: ``none``: the tensor's own dtype; ``blockwise8``: int8 codes with one
float32 absmax per 64 values (``stamen.wire.compression``)."""


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


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"512MiB"``, ``"8GB"``, ``"1.5g"`` or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a size like 512MiB or 8GB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
