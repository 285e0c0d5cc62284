"""What a generation saw: the logits of every step, for tests that compare them (not only tokens)."""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList


class ScoreRecorder:
    """A logits processor that records what it is given at every step and passes it on unchanged."""

    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.seen.append(scores.clone())
        return scores

    @property
    def stacked(self) -> torch.Tensor:
        """(batch, steps, vocab)."""
        return torch.stack(self.seen, 1)


def generate_with_scores(model, ids: torch.Tensor, **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """``model.generate(ids, **settings)`` without an end-of-sequence token: (tokens, logits of every step)."""
    scores = ScoreRecorder()
    settings.setdefault("eos_token_id", None)
    out = model.generate(ids, logits_processor=LogitsProcessorList([scores]), **settings)
    return out, scores.stacked
