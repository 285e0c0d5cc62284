"""Client settings, validated in one place."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from stamen.types import Compression

Verify = Literal["audit", "strict", "off"]


class ClientConfig(BaseModel):
    """How a client joins and uses the swarm; the client commands (``stamen generate``, ``api``,
    ``chat``, ``health``) take their swarm options from these fields, the docstrings being their help."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    initial_peers: list[str]
    """Multiaddrs of DHT peers to join."""
    dht_prefix: str | None = None
    """The model's name in the swarm; default: derived from the model path or hub id."""
    connect_timeout: float = Field(default=60.0, gt=0)
    """Seconds to wait for online servers to cover every block."""
    request_timeout: float = Field(default=60.0, gt=0)
    """Seconds to wait for one server's reply before treating it as failed."""
    hang_timeout: float = Field(default=1.0, gt=0)
    """Seconds a server of an inference session may take over a step before it is suspected of
    hanging: its deadline is the larger of this and ``hang_factor`` × its usual time for the step's
    tokens (a moving average of its own replies). A late server that does not answer a ping within
    ``hang_ping_timeout`` is treated as failed (banned, routed around, its history replayed into a
    replacement); one that answers is only busy and gets another deadline, up to ``request_timeout``."""
    hang_factor: float = Field(default=8.0, ge=1)
    """A step's deadline in multiples of the server's usual time for that many tokens (see ``hang_timeout``)."""
    hang_ping_timeout: float = Field(default=0.5, gt=0)
    """Seconds a late server has to answer a ping before it is taken for hung (see ``hang_timeout``)."""
    full_wait: float = Field(default=5.0, ge=0)
    """Seconds to wait for free cache when every route passes servers that answered "full" (a load
    signal, not a fault: such servers are avoided, never banned); then ``ServerFullError``."""
    allowed_servers: list[str] | None = None
    """Use only these peer ids (None: any)."""
    blocked_servers: list[str] = Field(default_factory=list)
    """Never use these peer ids."""
    refresh_period: float = Field(default=5.0, gt=0)
    """Seconds a fetched view of the swarm stays fresh."""
    max_retries: int = Field(default=5, ge=0)
    """Times one step or forward is retried after network faults before giving up."""
    use_push: bool = True
    """Servers push their outputs straight to the next server of the route."""
    ban_timeout: float = Field(default=30.0, ge=0)
    """Seconds a server that failed is left out of routes."""
    route_grace: float = Field(default=10.0, ge=0)
    """Seconds to keep re-reading the DHT when no route exists before giving up (a joining
    replacement reaches every peer's view of the DHT a few seconds after it announces itself)."""
    sub_batch_tokens: int = Field(default=512, gt=0)
    """Most tokens (sequences × length) in one sub-batch of a stateless forward or backward;
    sub-batches run on servers in parallel. A sequence is never split."""
    train_streams: bool = True
    """Forwards that need gradients run over ``rpc_train``: each server keeps the hop's autograd
    graph inside that one call, and backward sends the gradient through the same stream (no
    recomputation). A server over its budget of kept graphs, or a kept stream that fails in
    backward, falls back to stateless forward and ``rpc_backward``. False: always stateless."""
    compression: Compression | None = None
    """Lossy compression of activations on the wire: "blockwise8" sends hidden states as 8-bit codes
    with one float32 scale per 64 values (1.06 bytes per value instead of 4 or 2) and asks servers
    to send their outputs (and pushes) the same way; "none" asks for the compute dtype both ways.
    None: the client sends uncompressed and each server answers as its ``--compression`` says.
    Applies to inference sessions and forwards without gradients (see ``train_compression``)."""
    verify: Verify = "audit"
    """Check servers' work on other servers (inference sessions): "audit" sends a hop's saved inputs
    since its last audit to an inference session kept on a second server of the same blocks, on
    prefills, every ``audit_every`` decoding steps and before a generation returns, and compares
    the outputs within a tolerance for both servers' dtype, quantization and compression; on a
    mismatch a third server decides, the liar is banned and accused in the DHT, and the affected
    steps are redone on honest servers. "strict": every step of every hop, before the step returns.
    "off": no checks. A hop without a second server is reported as unaudited in the route."""
    audit_every: int = Field(default=32, ge=1)
    """Decoding steps between two audits of one hop (``verify="audit"``)."""
    train_compression: bool = False
    """Apply ``compression`` to training too: hidden states, outputs and their gradients over
    ``rpc_train`` / ``rpc_backward`` (prompt and LoRA gradients always travel uncompressed)."""
