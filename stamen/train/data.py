"""Training data for ``stamen train``: a text file cut into fixed-length token sequences.

The whole text is tokenized once with the model's tokenizer and cut into non-overlapping sequences
of ``seq_len`` tokens (the tail that does not fill one is dropped). A batch is a draw of sequence
indices that depends only on (seed, trainer, step), so a trainer that restarts at step k sees the
batches it would have seen, and two trainers with different ``trainer`` indices see different ones.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

SAMPLE_TEXT = Path(__file__).resolve().parent.parent / "testing" / "data" / "swarm.txt"
"""The small text shipped for tests and the benchmark (our own prose)."""


def tokenize_text(text: str, tokenizer) -> torch.Tensor:
    """The token ids (int64, 1-D) of ``text``, without special tokens, tokenized paragraph by
    paragraph (fast tokenizers are slow on one huge string; paragraphs keep their blank-line join)."""
    ids: list[int] = []
    paragraphs = text.split("\n\n")
    for i, paragraph in enumerate(paragraphs):
        piece = paragraph + ("\n\n" if i + 1 < len(paragraphs) else "")
        if piece:
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.int64)


class TextDataset:
    """Fixed-length token sequences of one text file."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, seed: int = 0):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 (a next-token loss), got {seq_len}")
        count = tokens.numel() // seq_len
        if count == 0:
            raise ValueError(f"the text has {tokens.numel()} tokens: fewer than one sequence of {seq_len}")
        self.seq_len, self.seed = seq_len, seed
        self.sequences = tokens[: count * seq_len].view(count, seq_len).clone()
        """(N, seq_len) int64."""

    @classmethod
    def from_file(cls, path: str | os.PathLike, tokenizer, seq_len: int, seed: int = 0) -> TextDataset:
        return cls(tokenize_text(Path(path).read_text(encoding="utf-8"), tokenizer), seq_len, seed)

    def __len__(self) -> int:
        return self.sequences.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.sequences.numel()

    def batch(self, step: int, size: int, trainer: int = 0) -> torch.Tensor:
        """(size, seq_len) sequences for ``trainer``'s ``step``: drawn without replacement (with
        replacement only when ``size`` exceeds the dataset), the same for the same arguments."""
        digest = hashlib.blake2b(f"{self.seed}:{trainer}:{step}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
        n = len(self)
        if size <= n:
            index = torch.randperm(n, generator=generator)[:size]
        else:
            index = torch.randint(n, (size,), generator=generator)
        return self.sequences[index]
