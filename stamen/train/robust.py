"""CenteredClip: Byzantine-robust aggregation for hivemind's all-reduce.

"Secure Distributed Training at Scale" (Gorbunov et al., ICML 2022) shows that one peer sending a
scaled or sign-flipped gradient wrecks a plain mean, and that CenteredClip keeps training on track
with up to nearly half of the peers malicious: start at the coordinate-wise median and iterate
``x += Σ wᵢ·min(1, τ/‖vᵢ − x‖)·(vᵢ − x) / Σ wᵢ``. An honest majority pulls x to its centre,
while each outlier moves it by at most τ per iteration, whatever it sends.

hivemind's all-reduce splits the averaged vector into parts, each reduced by one peer of the
group (``TensorPartReducer``: a running weighted sum). ``CenteredClipReducer`` keeps the parts of
every sender and reduces each with CenteredClip instead; ``RobustAverager`` (a mixin for any
hivemind averager, e.g. ``GradientAverager`` or ``ACPSGDGradientAverager``) runs its all-reduces
with it and keeps, per peer, how hard its parts were clipped.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
from collections.abc import Sequence

import torch
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import as_aiter, azip


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


class CenteredClipAllReduceRunner(AllReduceRunner):
    def __init__(self, *, tau: float, iterations: int, **kwargs):
        super().__init__(**kwargs)
        self.tensor_part_reducer = CenteredClipReducer(self.tensor_part_reducer.part_shapes,
                                                       self.tensor_part_reducer.num_senders, tau, iterations)


class RobustAverager:
    """Mixin for a hivemind averager: its all-reduces reduce each partition with CenteredClip.

    The averager runs its all-reduces in its own process; what it saw comes back through a queue:
    ``clip_history`` is, per peer id, the mean clip factor of that peer's parts in each round this
    peer reduced some of them (1.0: never clipped), and ``suspects`` names the peers clipped hard in
    several consecutive rounds. A peer only sees the partitions it reduces (hivemind sizes them by
    announced bandwidth, and a peer may reduce none), so the evidence is local to each peer."""

    def __init__(self, *args, tau: float = 1.0, clip_iterations: int = 20, **kwargs):
        self.tau, self.clip_iterations = tau, clip_iterations
        self._clip_reports = mp.SimpleQueue()  # created before the averager's process forks
        self._clip_history: dict[str, list[float]] = {}
        super().__init__(*args, **kwargs)

    async def _run_allreduce_inplace_(self, tensors: Sequence[torch.Tensor], group_info: GroupInfo,
                                      group_id: bytes | None = None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        runner = CenteredClipAllReduceRunner(
            tau=self.tau, iterations=self.clip_iterations, p2p=self._p2p, servicer_type=type(self),
            prefix=self.prefix, tensors=tensors, group_id=group_id, ordered_peer_ids=group_info.peer_ids, **kwargs)
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
            async for tensor, update in azip(as_aiter(*tensors), runner):
                tensor.add_(update, alpha=self._averaging_alpha)
                self.last_updated = get_dht_time()
                self._state_updated.set()
        else:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")
        reducer = runner.tensor_part_reducer
        self._clip_reports.put({str(peer_id): sum(factors) / len(factors)
                                for peer_id, factors in zip(runner.sender_peer_ids, reducer.clip_factors, strict=True)
                                if factors})

    @property
    def clip_history(self) -> dict[str, list[float]]:
        while not self._clip_reports.empty():
            for peer, factor in self._clip_reports.get().items():
                self._clip_history.setdefault(peer, []).append(factor)
        return self._clip_history

    def suspects(self, rounds: int = 3, threshold: float = 0.5) -> list[str]:
        """Peers whose parts were clipped to at most ``threshold`` of their distance in each of the
        last ``rounds`` rounds (an honest peer's ordinary noise stays within τ and is not clipped)."""
        return sorted(peer for peer, history in self.clip_history.items()
                      if len(history) >= rounds and max(history[-rounds:]) <= threshold)
