"""ACP-SGD: PowerSGD's low-rank gradient compression with one all-reduce per round.

PowerSGD approximates each 2-D gradient M (n × k, with error feedback added) by P Qᵀ with rank r:
P = M Q, all-reduce P, orthogonalize it, Q = Mᵀ P, all-reduce Q; two all-reduces a round, the
second waiting for the first. ACP-SGD (Zhang et al., ICDCS 2023) communicates one factor per
round and alternates them: in a P round the peers all-reduce P = M Q̂, where Q̂ is the
orthonormalised Q of the previous Q round, and apply P Q̂ᵀ; in a Q round they all-reduce
Q = Mᵀ P̂ and apply P̂ Qᵀ. Both factors that a round reuses are results of an earlier all-reduce,
so every peer of the group holds the same ones, and the power iteration runs across rounds
instead of within one. Error feedback keeps what a round's approximation missed for the next.
Tensors with fewer than 2 dimensions, or which a rank-r factor would not shrink enough, travel
whole in the same all-reduce.

``ACPSGDGradientAverager`` is a hivemind ``GradientAverager`` (drop-in for
``hivemind.Optimizer(grad_averager_factory=...)``); ``begin_round`` / ``end_round`` (with
``compress`` / ``decompress``) are its math, around the one all-reduce.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

import torch
from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.compression import CompressionInfo, TensorRole
from hivemind.dht import DHT
from hivemind.optim.grad_averager import GradientAverager
from hivemind.utils import get_logger
from hivemind.utils.asyncio import enter_asynchronously
from hivemind.utils.math import get_flatten_greedy_dims, orthogonalize_

logger = get_logger(__name__)

P_ROUND, Q_ROUND = 0, 1


def compress(m: torch.Tensor, p: torch.Tensor, q: torch.Tensor, phase: int) -> torch.Tensor:
    """The factor a round sends for the (n × k) matrix ``m``: ``m @ orth(q)`` (n × r) in a P round,
    ``mᵀ @ orth(p)`` (k × r) in a Q round. ``p`` and ``q`` are the shared factors (not modified)."""
    if phase == P_ROUND:
        return m @ orthonormal(q)
    return m.t() @ orthonormal(p)


def decompress(reduced: torch.Tensor, p: torch.Tensor, q: torch.Tensor, phase: int) -> torch.Tensor:
    """The rank-r matrix a round applies, from the all-reduced factor and the other, shared one."""
    if phase == P_ROUND:
        return reduced @ orthonormal(q).t()
    return orthonormal(p) @ reduced.t()


def begin_round(ms: Sequence[torch.Tensor], ps: Sequence[torch.Tensor], qs: Sequence[torch.Tensor],
                grads: Sequence[torch.Tensor], phase: int) -> list[torch.Tensor]:
    """Add this peer's gradients to its error feedback ``ms``; the factors it sends this round."""
    for grad, m in zip(grads, ms, strict=True):
        m.add_(grad.reshape(m.shape).to(m.device))
    return [compress(m, p, q, phase) for m, p, q in zip(ms, ps, qs, strict=True)]


def end_round(ms: Sequence[torch.Tensor], ps: Sequence[torch.Tensor], qs: Sequence[torch.Tensor],
              grads: Sequence[torch.Tensor], reduced: Sequence[torch.Tensor], phase: int) -> None:
    """Apply the all-reduced factors: each gradient becomes the rank-r approximation, which leaves
    the error feedback, and the factor is kept (shared by the group) for the next rounds."""
    for factor, m, p, q, grad in zip(reduced, ms, ps, qs, grads, strict=True):
        approximation = decompress(factor, p, q, phase)
        m.sub_(approximation)
        grad.copy_(approximation.reshape(grad.shape))
        (p if phase == P_ROUND else q).copy_(factor)


def orthonormal(factor: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``factor``'s (Gram-Schmidt, deterministic: every peer gets the same)."""
    out = factor.clone()
    orthogonalize_(out)
    return out


def compressible(shape: torch.Size, rank: int, min_compression_ratio: float) -> bool:
    """Whether a tensor goes as rank-``rank`` factors: 2-D or more, and the larger of the two
    factors is at most ``1 - min_compression_ratio`` of its elements."""
    if len(shape) < 2:
        return False
    n, k = get_flatten_greedy_dims(torch.empty(shape, device="meta"))
    return rank * max(n, k) <= (1 - min_compression_ratio) * n * k


class ACPSGDGradientAverager(GradientAverager):
    """Averages gradients with ACP-SGD: one all-reduce per round, rank-``averager_rank`` factors
    with error feedback for 2-D (and flattened higher-dimensional) gradients, the rest averaged
    plainly in the same all-reduce. All peers of a group must use the same rank and start from the
    same round parity (a peer that joins loads both factors and the parity with the state)."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], averager_rank: int, *, dht: DHT, prefix: str,
                 min_compression_ratio: float = 0.5, averaged_grads: Sequence[torch.Tensor] | None = None,
                 **kwargs):
        if averager_rank < 1:
            raise ValueError(f"averager_rank must be at least 1, got {averager_rank}")
        self.rank = averager_rank
        self.parameters = tuple(parameters)
        grads = list(self._grads_from_parameters())
        self._compressed = [i for i, g in enumerate(grads) if compressible(g.shape, self.rank, min_compression_ratio)]
        dims = [get_flatten_greedy_dims(grads[i]) for i in self._compressed]
        self._ms = [torch.zeros(n, k).share_memory_() for n, k in dims]
        """Error feedback: what earlier rounds' approximations missed, per compressed gradient."""
        generator = torch.Generator().manual_seed(0)  # the same starting factors on every peer
        self._ps = [torch.randn(n, self.rank, generator=generator).share_memory_() for n, _ in dims]
        self._qs = [torch.randn(k, self.rank, generator=generator).share_memory_() for _, k in dims]
        self._phase = torch.zeros((), dtype=torch.int64).share_memory_()
        self._allreduces = torch.zeros((), dtype=torch.int64).share_memory_()
        """All-reduces run (one per round)."""
        super().__init__(self.parameters, dht=dht, prefix=prefix, averaged_grads=averaged_grads or (), **kwargs)

    @property
    def phase(self) -> int:
        """The factor the next round sends: ``P_ROUND`` or ``Q_ROUND``."""
        return int(self._phase)

    @property
    def allreduces(self) -> int:
        return int(self._allreduces)

    def compressed_elements(self) -> int:
        """Elements one round sends (this round's factors plus the uncompressed gradients)."""
        phase = self.phase
        factors = sum((p if phase == P_ROUND else q).numel() for p, q in zip(self._ps, self._qs, strict=True))
        plain = sum(g.numel() for i, g in enumerate(self._grads_from_parameters()) if i not in self._compressed)
        return factors + plain

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs):
        try:
            bandwidths, mode_ids, user_gathered_bytes = zip(*map(self.serializer.loads, group_info.gathered),
                                                            strict=True)
            user_gathered = dict(zip(group_info.peer_ids, map(self.serializer.loads, user_gathered_bytes),
                                     strict=True))
            download_bandwidths = [0.0 if AveragingMode(mode) == AveragingMode.CLIENT else bandwidth
                                   for bandwidth, mode in zip(bandwidths, mode_ids, strict=True)]
            peer_fractions = await asyncio.get_event_loop().run_in_executor(
                None, load_balance_peers, self.total_size, download_bandwidths, min_vector_size)
            async with enter_asynchronously(self.get_tensors()) as averaged_grads:
                await self._round(averaged_grads, group_info, peer_fractions=peer_fractions, **kwargs)
            return user_gathered
        except BaseException as e:
            logger.exception(e)
            raise MatchmakingException(f"Unable to run All-Reduce: {e}") from e

    async def _round(self, averaged_grads: Sequence[torch.Tensor], group_info: GroupInfo, **kwargs) -> None:
        """One round: this round's factors (and the uncompressed gradients) through one all-reduce."""
        phase = self.phase
        compressed = [averaged_grads[i] for i in self._compressed]
        factors = begin_round(self._ms, self._ps, self._qs, compressed, phase)
        plain = [g for i, g in enumerate(averaged_grads) if i not in self._compressed]
        try:
            await self._run_allreduce_inplace_(factors + plain, group_info, **kwargs)
        except BaseException:
            for grad, m in zip(compressed, self._ms, strict=True):  # nothing was applied: not counted twice
                m.sub_(grad.reshape(m.shape).to(m.device))
            raise
        self._allreduces += 1
        end_round(self._ms, self._ps, self._qs, compressed, factors, phase)
        self._phase.fill_(1 - phase)

    def get_current_state(self):
        """The shared factors and the round parity, for a peer that joins the group."""
        with torch.no_grad(), self.lock_averaged_tensors:
            buffers = [*self._ps, *self._qs, self._phase.reshape(1).clone()]
            infos = [CompressionInfo.from_tensor(b, key=f"acp_{i}", role=TensorRole.GRADIENT)
                     for i, b in enumerate(buffers)]
        return dict(group_bits=self.get_group_bits()), buffers, infos

    def load_state_from_peers(self, **kwargs):
        loaded = super().load_state_from_peers(**kwargs)
        if loaded is None:
            return None
        _, tensors = loaded
        expected = [*self._ps, *self._qs, self._phase.reshape(1)]
        if len(tensors) != len(expected) or any(t.shape != e.shape for t, e in zip(tensors, expected, strict=True)):
            logger.error("ACP-SGD state from peers does not match this averager's factors; keeping ours")
            return None
        with torch.no_grad(), self.lock_averaged_tensors:
            for local, remote in zip(expected, tensors, strict=True):
                local.copy_(remote)
        return loaded
