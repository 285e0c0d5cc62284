"""CenteredClip: Byzantine-robust aggregation for hivemind's all-reduce.

"Secure Distributed Training at Scale" (Gorbunov et al., ICML 2022) shows that one peer sending a
scaled or sign-flipped gradient wrecks a plain mean, and that CenteredClip keeps training on track
with up to nearly half of the peers malicious: start at the coordinate-wise median and iterate
``x += Σ wᵢ·min(1, τ/‖vᵢ − x‖)·(vᵢ − x) / Σ wᵢ``. An honest majority pulls x to its centre,
while each outlier moves it by at most τ per iteration, whatever it sends.

hivemind's all-reduce splits the averaged vector into parts, each reduced by one peer of the
group (``TensorPartReducer``: a running weighted sum). ``CenteredClipReducer`` keeps the parts of
every sender and reduces each with CenteredClip instead. ``ExactAveraging(aggregation=
"centered_clip")`` in train/averaging.py (a mixin for any hivemind averager, e.g. ``GradientAverager``
or ``ACPSGDGradientAverager``; ``RobustAverager`` there is that mixin with CenteredClip fixed) runs
its all-reduces with it, so CenteredClip composes with plain, PowerSGD and ACP-SGD averaging, and
keeps, per peer, how hard its parts were clipped; a peer clipped hardest in several consecutive
rounds is left out of the partitions that peer reduces from then on (``exclude_suspects``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import torch
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer


def centered_clip(vectors: torch.Tensor, weights: torch.Tensor | None = None, tau: float = 1.0,
                  iterations: int = 20, tolerance: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The CenteredClip aggregate of ``vectors`` (N × D) and each vector's clip factor in the last
    iteration, min(1, τ/‖vᵢ − x‖) (1: not clipped). Stops early once an iteration moves x by less
    than ``tolerance`` × τ."""
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, D) tensor, got shape {tuple(vectors.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    vectors = vectors.float()
    weights = torch.ones(len(vectors)) if weights is None else weights.float()
    weights = weights / weights.sum()
    x = vectors.median(dim=0).values
    factors = torch.ones(len(vectors))
    for _ in range(iterations):
        diffs = vectors - x
        factors = (tau / diffs.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
        step = (weights * factors) @ diffs
        x = x + step
        if float(step.norm()) < tolerance * tau:
            break
    return x, factors


class CenteredClipReducer(TensorPartReducer):
    """Keeps every sender's part of the current partition and reduces them with ``centered_clip``."""

    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, tau: float, iterations: int):
        self.tau, self.iterations = tau, iterations
        self.received: dict[int, tuple[torch.Tensor, float]] = {}
        self.clip_factors: list[list[float]] = [[] for _ in range(num_senders)]
        """Per sender, the clip factor of each partition it contributed to."""
        self.excluded: set[int] = set()
        """Senders whose parts are left out of the aggregate (peers found Byzantine in earlier
        rounds); they still count as clipped to 0, so they stay suspects."""
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self):
        self.received = {}
        super().reset_accumulators()

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        """Keep a sender's part of the current partition; the robust aggregate once all are in."""
        if not (0 <= sender_index < self.num_senders and 0 <= part_index < self.num_parts):
            raise AllreduceException(f"invalid sender {sender_index} or part {part_index}")
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:  # earlier partitions are still being reduced
            finished = asyncio.ensure_future(self.finished.wait())
            await asyncio.wait({self.current_part_future, finished}, return_when=asyncio.FIRST_COMPLETED)
            finished.cancel()
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {type(self).__name__}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self.received[sender_index] = (tensor_part, weight)
            self.current_part_accumulated_from += 1
            self.denominator += weight
            self.check_current_part_finished()
        return await future

    def check_current_part_finished(self):
        if self.current_part_accumulated_from < self.num_current_senders:
            return
        for s in self.excluded & self.received.keys():
            if len(self.received) > 1:  # never leave a partition without any sender
                del self.received[s]
                self.clip_factors[s].append(0.0)
        if self.received:
            senders = sorted(self.received)
            vectors = torch.stack([self.received[s][0].flatten().float() for s in senders])
            weights = torch.tensor([self.received[s][1] for s in senders], dtype=torch.float32)
            center, factors = centered_clip(vectors, weights if float(weights.sum()) > 0 else None, self.tau,
                                            self.iterations)
            for s, factor in zip(senders, factors.tolist(), strict=True):
                self.clip_factors[s].append(factor)
            self.accumulator.copy_(center.reshape(self.accumulator.shape))
        self.current_part_future.set_result(self.accumulator)
        self.reset_accumulators()

