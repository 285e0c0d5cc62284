"""Pure model math: Llama-family blocks, spans with KV caches, and checkpoint loading."""

from stamen.models.checkpoint import (
    ClientParts,
    load_block_config,
    load_client_parts,
    load_config,
    load_span,
    open_checkpoint,
)
from stamen.models.config import BlockConfig
from stamen.models.span import KVCache, SpanModel

__all__ = [
    "BlockConfig",
    "ClientParts",
    "KVCache",
    "SpanModel",
    "load_client_parts",
    "load_block_config",
    "load_config",
    "load_span",
    "open_checkpoint",
]
