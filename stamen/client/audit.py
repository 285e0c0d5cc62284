"""Inference audits: what a server's outputs may differ by from another server's, and how they compare.

An audit sends a hop's saved inputs to a second server of the same blocks, on an inference session
kept there for the hop (the positions since the last audit; ``InferenceSession._audit``), and
compares its outputs with those the hop returned, position by position: the error of a position is
‖claimed − audit‖ / ‖audit‖ over the hidden size, and a hop passes when the largest error of the
audited positions is within the pair's tolerance. Honest servers differ by their precision: the
tolerance is the sum of both servers' terms (dtype and quantization, ``SERVER_TOLERANCE``), of the
rounding of the outputs as the client kept them, and of the activation codec when replies or inputs
were compressed. The terms were calibrated on honest servers (docs/benchmarks.md, "Audit
tolerance"): each is several times the largest error seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SERVER_TOLERANCE: dict[tuple[str, str | None], float] = {
    ("float32", None): 1e-3,
    ("float16", None): 5e-2,
    ("bfloat16", None): 1.5e-1,
    ("float32", "int8"): 2e-1,
    ("float16", "int8"): 2e-1,
    ("bfloat16", "int8"): 2.5e-1,
    ("float32", "nf4"): 5e-1,
    ("float16", "nf4"): 5e-1,
    ("bfloat16", "nf4"): 5e-1,
}
"""Per server, by (dtype, quantization): the relative error it may add to a span's outputs."""
UNKNOWN_TOLERANCE = 5e-1
"""A server announcing a precision not in the table."""
ROUNDING_TOLERANCE = {torch.float32: 0.0, torch.float16: 2e-3, torch.bfloat16: 1e-2}
"""Rounding of the claimed outputs to the dtype the client kept them in."""
COMPRESSION_TOLERANCE = 5e-2
"""The blockwise 8-bit activation codec (inputs or outputs compressed)."""


def server_tolerance(dtype: str, quant: str | None) -> float:
    return SERVER_TOLERANCE.get((dtype, quant), UNKNOWN_TOLERANCE)


def tolerance(a: tuple[str, str | None], b: tuple[str, str | None], kept: torch.dtype = torch.float32,
              compressed: bool = False) -> float:
    """What honest servers of precisions ``a`` and ``b`` ((dtype, quant)) may differ by, with the
    claimed outputs kept in ``kept`` and (``compressed``) activations through the 8-bit codec."""
    return (server_tolerance(*a) + server_tolerance(*b) + ROUNDING_TOLERANCE.get(kept, 1e-2)
            + (COMPRESSION_TOLERANCE if compressed else 0.0))


def relative_error(claimed: torch.Tensor, reference: torch.Tensor, valid: torch.Tensor | None = None) -> float:
    """Largest per-position ‖claimed − reference‖ / ‖reference‖ over (B, T, H) outputs; ``valid``
    (B, T) bool leaves padding positions out. Non-finite outputs count as infinitely wrong."""
    claimed, reference = claimed.float(), reference.float()
    if claimed.shape != reference.shape:
        return float("inf")
    diff = (claimed - reference).norm(dim=-1)
    scale = reference.norm(dim=-1).clamp_min(1e-6)
    err = diff / scale
    err = torch.where(torch.isfinite(err), err, torch.full_like(err, float("inf")))
    if valid is not None:
        err = err[valid]
    return float(err.max()) if err.numel() else 0.0


@dataclass
class AuditRecord:
    """One audit of one hop, for logs, tests and benchmarks."""

    peer_id: str
    """The audited server."""
    auditor: str
    blocks: tuple[int, int]
    positions: tuple[int, int]
    """Positions [start, end) compared (wire positions)."""
    error: float
    tolerance: float
    verdict: str
    """"passed", "liar" (the audited server disagreed with two others), "auditor lied" (the auditor
    disagreed with the audited server and a third), "disputed" (no majority, or no third server),
    "failed" (the audit could not run: a call failed)."""
    step: int
    """The session's step count when the audit started."""
    referee: str | None = None
    """The third server, when one decided."""
    sent: int = 0
    """Positions (per sequence) sent to the auditor: on its audit session, those since the positions
    its cache held (``positions`` or a few more after a rollback; all of them for a fresh session);
    for a stateless forward, every position so far."""
