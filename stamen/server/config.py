"""Server settings: one validated object, kept apart from the model config."""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from stamen.types import Span

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ServerConfig(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: str
    """A Hugging Face model directory or hub id."""
    initial_peers: list[str] = Field(default_factory=list)
    """Multiaddrs of DHT peers to join (empty: start a new swarm)."""
    blocks: Span | None = None
    """The span to host; exclusive with ``num_blocks``."""
    num_blocks: int | None = Field(default=None, gt=0)
    """Host this many blocks, placed where the swarm lacks them."""
    dht_prefix: str | None = None
    """The model's name in the swarm; default: derived from ``model``."""
    dtype: str = "float32"
    """Compute dtype: float32, bfloat16 or float16 (activations travel in it)."""
    device: str = "cpu"
    """Torch device for weights and caches."""
    max_cache_tokens: int = Field(default=8192, gt=0)
    """KV cache budget, in tokens (batch × length) across all open sessions, for the whole span."""
    max_step_tokens: int = Field(default=8192, gt=0)
    """Most tokens (batch × new tokens) one inference step or forward may carry."""
    session_timeout: float = Field(default=300.0, gt=0)
    """Seconds an inference session may idle before its cache is freed."""
    request_timeout: float = Field(default=600.0, gt=0)
    """Seconds a stateless forward may take before it is abandoned."""
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = Field(default=0, ge=0, lt=65536)
    """TCP port to listen on (0: any free port)."""
    announce_maddrs: list[str] = Field(default_factory=list)
    """Multiaddrs to announce instead of the listening ones (for servers behind NAT)."""
    identity: Path | None = None
    """Private key file for a stable peer id."""
    throughput: float | None = Field(default=None, gt=0)
    """Override the measured throughput (steps per second per block)."""
    record_ttl: float = Field(default=60.0, gt=1)
    """Seconds a DHT record lives; the server re-announces every ttl/3."""
    public_name: str | None = None
    """A human-readable name shown by health tools."""
    torch_threads: int | None = Field(default=None, gt=0)
    """torch intra-op threads (default: torch's choice)."""

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
        return value

    @model_validator(mode="after")
    def _one_of_blocks(self) -> ServerConfig:
        if (self.blocks is None) == (self.num_blocks is None):
            raise ValueError("give exactly one of blocks (--blocks A:B) or num_blocks (--num-blocks N)")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def default_dht_prefix(model: str) -> str:
    """A model's swarm name: the hub id or directory name, with characters the DHT key can hold."""
    name = model.rstrip("/")
    if Path(name).is_dir():
        name = Path(name).resolve().name
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
