"""Settings of a SWARM trainer (``client/swarm_train.py``, ``stamen train``): no torch here, so the CLI
derives its options without loading it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Averaging = Literal["plain", "powersgd", "acp"]


class TrainerConfig(BaseModel):
    """How a trainer trains (``stamen train``); the swarm options are ``ClientConfig``'s."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    microbatch: int = Field(default=4, ge=1)
    """Sequences per microbatch (each runs through its own randomized pipeline)."""
    lr: float = Field(default=1e-3, gt=0)
    """Learning rate of the client parts' optimizer (the stages' is set on their servers)."""
    optimizer: Literal["sgd", "adamw"] = "adamw"
    """Optimizer of the client parts (embeddings, final norm, LM head)."""
    weight_decay: float = Field(default=0.0, ge=0)
    """Weight decay of the client parts' optimizer (decoupled for adamw)."""
    target_batch_size: int | None = Field(default=None, gt=0)
    """Samples the trainers accumulate together before their group steps; None: the stages' target
    (from their records), so that trainers and stages step together."""
    averaging: Averaging = "plain"
    """How the trainers' group averages the client parts' gradients."""
    rank: int = Field(default=4, ge=1)
    """Rank of PowerSGD / ACP-SGD factors."""
    aggregation: Literal["mean", "centered_clip"] = "mean"
    """How the trainers' group reduces each averaged partition: the weighted mean, or CenteredClip
    (Byzantine-robust; peers clipped hardest in consecutive rounds are left out)."""
    tau: float = Field(default=1.0, gt=0)
    """CenteredClip's clipping radius."""
    clip_iterations: int = Field(default=20, ge=1, le=1000)
    """CenteredClip's iterations at most per partition."""
    sync: bool = True
    """Send each stage's epoch with the microbatches and wait, after a step, until the trainers' group
    and every stage reached the next epoch (rerunning microbatches of stage peers that died)."""
    max_inflight: int = Field(default=8, ge=1)
    """Microbatches of this trainer in flight at once."""
    matchmaking_time: float = Field(default=1.0, gt=0)
    """Seconds the trainers' averager gathers peers for an all-reduce."""
    averaging_timeout: float = Field(default=30.0, gt=0)
    """Seconds an all-reduce of the trainers may take before the round fails (its gradients are kept)."""
    epoch_timeout: float = Field(default=300.0, gt=0)
    """Seconds a synchronous step waits for the trainers' group and the stages to step."""
    top_up_after: float | None = Field(default=60.0, gt=0)
    """Seconds a synchronous step may wait with no progress anywhere (no stage or trainers' group
    gaining samples or stepping) before this trainer fills what they lack with more microbatches of
    its own batch: a trainer that left mid-step would otherwise hold every other trainer until the
    epoch timeout. None: never."""
    host: str = "127.0.0.1"
    """Address the trainer's averaging DHT peer listens on (other trainers connect to it)."""
    full_retries: int = Field(default=50, ge=0)
    """Times a hop is drawn again when stage peers answer "full" (all their training graphs held)."""
