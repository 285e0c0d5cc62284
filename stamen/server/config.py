"""Server settings: one validated object, kept apart from the model config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from stamen.server.placement import PlacementSettings
from stamen.types import MAX_RECORD_TTL, Compression, DtypeName, Span

if TYPE_CHECKING:
    import torch

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stamen" / "throughput.json"
"""Where measured compute throughputs are cached (``server/throughput.py``)."""


class TrainSettings(BaseModel):
    """How a training server's stage learns and averages (``stamen server --train``; ``server/stage.py``)."""

    model_config = ConfigDict(use_attribute_docstrings=True, frozen=True)

    optimizer: Literal["sgd", "adamw"] = "sgd"
    """The stage's optimizer (every peer of the stage runs the same step on the averaged gradient)."""
    lr: float = Field(default=1e-3, gt=0)
    """Learning rate of the stage's optimizer."""
    weight_decay: float = Field(default=0.0, ge=0)
    """Weight decay of the stage's optimizer (decoupled for adamw)."""
    target_batch_size: int = Field(default=32, gt=0)
    """Samples (sequences) the stage's peers accumulate together before they step."""
    averaging: Literal["plain", "powersgd", "acp"] = "plain"
    """How the stage's peers average gradients: whole tensors, PowerSGD or ACP-SGD low-rank factors."""
    rank: int = Field(default=4, gt=0)
    """Rank of the PowerSGD and ACP-SGD factors."""
    aggregation: Literal["mean", "centered_clip"] = "mean"
    """How each part of the all-reduce is reduced: the weighted mean, or CenteredClip (robust to outliers)."""
    tau: float = Field(default=1.0, gt=0)
    """CenteredClip's clipping radius."""
    clip_iterations: int = Field(default=20, ge=1, le=1000)
    """CenteredClip's iterations at most per partition."""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of training forwards and backwards (bfloat16: autocast over the float32 master weights)."""
    matchmaking_time: float = Field(default=1.0, gt=0)
    """Seconds the stage's averager gathers peers for an all-reduce."""
    averaging_timeout: float = Field(default=30.0, gt=0)
    """Seconds an all-reduce of the stage may take before the round fails (its gradients are kept)."""


class ServerConfig(BaseModel):
    """Everything a server is told; ``stamen server`` takes its options from these fields
    (``stamen/cli/options.py``): the attribute docstrings are their help."""

    model_config = ConfigDict(arbitrary_types_allowed=True, use_attribute_docstrings=True)

    model: str
    """A Hugging Face model directory or hub id."""
    initial_peers: list[str] = Field(default_factory=list)
    """Multiaddrs of DHT peers to join (empty: start a new swarm)."""
    blocks: Span | None = None
    """The span to host, START:END (half-open); exclusive with ``num_blocks``."""
    num_blocks: int | None = Field(default=None, gt=0)
    """Host this many blocks, placed where the swarm lacks them (neither this nor ``blocks``: as
    many as fit the memory)."""
    max_memory: int | None = Field(default=None, gt=0)
    """Bytes the server may use for weights and KV cache, on the command line a size like 6GiB
    (default: the device's free memory)."""
    memory_margin: float = Field(default=0.1, ge=0, lt=1)
    """Fraction of the memory left unused when deciding how many blocks fit."""
    dht_prefix: str | None = None
    """The model's name in the swarm; default: derived from ``model``."""
    dtype: str = "float32"
    """Compute dtype: float32, bfloat16 or float16 (activations travel in it)."""
    compression: Compression = "none"
    """How this server sends activations by default (step outputs to clients, pushes to the next
    server, forward outputs): "none" (the compute dtype) or "blockwise8" (8-bit codes with one
    float32 scale per 64 values: 1.06 bytes per value, lossy). A request's own choice overrides it;
    training replies are compressed only when the request asks."""
    quant: Literal["none", "int8", "nf4"] = "none"
    """Quantize the blocks' projection weights as they load: "int8" (per output channel, 1 byte per
    weight, no extra dependency) or "nf4" (4-bit NormalFloat in blocks of 64 as bitsandbytes stores
    it, about 0.56 bytes per weight); norms, biases and activations stay in ``dtype``. Fewer bytes per
    block let the server host more blocks (see ``stamen.models.quant`` for the speed and accuracy)."""
    device: str = "cpu"
    """Torch device for weights and caches."""
    max_cache_tokens: int = Field(default=8192, gt=0)
    """KV cache budget, in tokens (batch × length) across all open sessions, for the whole span."""
    max_step_tokens: int = Field(default=8192, gt=0)
    """Most tokens (batch × new tokens) one inference step or forward may carry."""
    session_timeout: float = Field(default=300.0, gt=0)
    """Seconds an inference session may idle before its cache is freed."""
    max_train_graphs: int = Field(default=8, ge=0)
    """Training graphs (``rpc_train``: forward kept for the backward of the same call) held at once;
    beyond it clients fall back to stateless forward and backward. 0: never keep one."""
    request_timeout: float = Field(default=600.0, gt=0)
    """Seconds a stateless forward may take before it is abandoned."""
    read_timeout: float = Field(default=30.0, gt=0)
    """Seconds a peer may take to send the next message of a request it began (a part of a
    forward, backward, training or adapter upload; the rest of an inference or push frame whose
    header arrived); past it the server answers with an error and drops the call."""
    request_read_timeout: float = Field(default=300.0, gt=0)
    """Seconds the whole request of a stream call (forward, backward, training, adapter upload,
    bandwidth probe) may take to arrive, all its parts together."""
    max_request_bytes: int = Field(default=1 << 30, gt=0)
    """Request bytes the server holds at once over all calls and streams: a message that does not
    fit is refused ("server busy") before it is read; a request larger than this, always."""
    max_peer_calls: int = Field(default=32, gt=0)
    """Stream calls (forward, backward, training, adapter uploads, bandwidth probes) one peer may
    have in flight at once; more are refused ("server busy")."""
    max_peer_streams: int = Field(default=128, gt=0)
    """Inference and push streams one peer may hold open at once; more are refused ("server busy")."""
    batching: bool = True
    """Run the inference steps of concurrent sessions together, one forward through the span per
    iteration (``server/batching.py``); ``--no-batching`` runs each step on its own."""
    max_batch_tokens: int = Field(default=256, gt=0)
    """Rows (sequences × new tokens) one batched iteration computes at most: decoding steps first,
    then prefills in chunks that fill the rest, so a long prompt never stalls others' decoding."""
    max_peer_sessions: int = Field(default=64, gt=0)
    """Inference sessions one peer may hold open here at once; more are refused ("server busy")."""
    peer_cache_share: float = Field(default=0.5, gt=0, le=1)
    """While other peers hold sessions here, one peer may reserve at most this fraction of the KV
    cache (or 1 / the number of such peers, if more); alone, all of it. Beyond: "server busy"."""
    max_peer_queued_steps: int = Field(default=128, gt=0)
    """Inference steps of one peer's sessions waiting for compute at once; more are refused ("server busy")."""
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = Field(default=0, ge=0, lt=65536)
    """TCP port to listen on (0: any free port)."""
    announce_maddrs: list[str] = Field(default_factory=list)
    """Multiaddrs to announce instead of the listening ones (for servers behind NAT)."""
    identity: Path | None = None
    """Private key file for a stable peer id."""
    throughput: float | None = Field(default=None, gt=0)
    """Override the measured throughput (steps per second per block); nothing is measured then."""
    throughput_cache: Path = DEFAULT_CACHE
    """JSON file caching compute measurements per device, model and dtype."""
    rebalance: bool = True
    """Move to where the swarm is weakest when that raises its bottleneck enough (never with ``blocks``)."""
    balance_period: float = Field(default=120.0, gt=0)
    """Mean seconds between rebalancing checks; each wait is drawn uniformly from 0.5× to 1.5× this."""
    move_jitter: float = Field(default=10.0, ge=0)
    """A server that decides to move waits uniform(0, this) seconds, then reads the DHT again and
    moves only if the move is still worth it (another server may have moved meanwhile)."""
    move_grace: float = Field(default=120.0, ge=0)
    """Seconds sessions opened on the old span may keep running after a move before they are
    closed (their clients then replay into other servers)."""
    placement: PlacementSettings = PlacementSettings()
    """Thresholds of the rebalancing decision."""
    standby: bool = False
    """Join as a standby: load the blocks the swarm can least afford to lose (or ``blocks``) without
    serving them, watch their servers, and go online for them, without loading, when they lose
    their last live server (``stamen/server/standby.py``)."""
    standby_ping_period: float = Field(default=1.0, gt=0)
    """Seconds between a standby's looks at the servers of its blocks (records and pings)."""
    standby_jitter: float = Field(default=1.0, ge=0)
    """A standby that finds its blocks uncovered waits uniform(0, this) seconds and looks again
    before it claims them, so that of several standbys one takes the hole."""
    record_ttl: float = Field(default=60.0, gt=1, le=MAX_RECORD_TTL)
    """Seconds a DHT record lives (at most 300: peers refuse longer ones); the server re-announces every ttl/3."""
    metrics_port: int | None = Field(default=None, ge=0, lt=65536)
    """Serve Prometheus metrics at http://HOST:PORT/metrics (steps, tokens and latencies by kind,
    sessions, cache, refusals, pushes, bytes, span and state); None: no metrics server."""
    public_name: str | None = None
    """A human-readable name shown by health tools."""
    train: bool = False
    """Train the span's weights (float32) with the other training servers of the same span, which form a
    stage: gradients of trainers' microbatches accumulate, the stage's peers average them and step together
    (``stamen train``). Needs ``dtype`` float32 and no ``quant``; inference keeps working from the current
    weights."""
    training: TrainSettings = TrainSettings()
    """The stage's optimizer and averaging (used with ``train``)."""
    torch_threads: int | None = Field(default=None, gt=0)
    """torch intra-op threads of prefills, forwards and backwards (default: torch's choice)."""
    decode_threads: int | None = Field(default=None, gt=0)
    """torch threads of decoding steps (default: measured at start, at most ``torch_threads``:
    the fewest within 10% of the fastest; ``server/compute.py``)."""

    @field_validator("model")
    @classmethod
    def _local_model_exists(cls, value: str) -> str:
        if missing_local_dir(value):
            raise ValueError(f"no such directory: {value}")
        return value

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in get_args(DtypeName):
            raise ValueError(f"dtype must be one of {sorted(get_args(DtypeName))}")
        return value

    @model_validator(mode="after")
    def _one_of_blocks(self) -> ServerConfig:
        if self.blocks is not None and self.num_blocks is not None:
            raise ValueError("give at most one of blocks (--blocks A:B) or num_blocks (--num-blocks N)")
        if self.train and (self.dtype != "float32" or self.quant != "none" or self.standby):
            raise ValueError("--train keeps float32 master weights: it needs --dtype float32, no --quant and no "
                             "--standby (--compute-dtype bfloat16 computes in bfloat16)")
        if self.train and self.max_train_graphs == 0:
            raise ValueError("--train needs --max-train-graphs above 0 (microbatches run on kept graphs)")
        return self

    @property
    def auto_placed(self) -> bool:
        """The server chooses its span itself (and may move it)."""
        return self.blocks is None

    @property
    def torch_dtype(self) -> torch.dtype:
        # imported here: the command line reads this config's fields for its options and must
        # start without loading torch
        from stamen.models.config import DTYPES

        return DTYPES[self.dtype]


def missing_local_dir(source: str) -> bool:
    """Whether a model source is written as a local path (absolute, ``./``, ``../``, ``~``, or more
    than one ``/``: a hub id is ``name`` or ``owner/name``) that is not a directory; it must not be
    taken for a hub id (and fail with the hub's message)."""
    as_path = source.startswith(("/", "./", "../", "~", ".\\")) or source in (".", "..") or source.count("/") > 1
    return as_path and not Path(source).expanduser().is_dir()


def parent_gone() -> bool:
    """Whether the process that started this one with ``STAMEN_PARENT_PID`` (``LocalSwarm``: tests,
    the demo, benchmarks) has died: a crashed harness must not leave servers running."""
    expected = os.environ.get("STAMEN_PARENT_PID")
    return expected is not None and os.getppid() != int(expected)
