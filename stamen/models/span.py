"""A contiguous span of blocks with an in-place KV cache: the unit a server hosts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stamen.errors import WrongBlocksError
from stamen.models.config import BlockConfig
from stamen.models.llama import LlamaBlock, Rotary, Segment, build_attention_mask
from stamen.models.lora import BlockLoRA
from stamen.types import Span


class KVCache:
    """Preallocated keys/values of one session for every block of a span, written in place.

    Layout: (num_blocks, 2, B, nkv, max_len, hd). ``length`` counts the positions filled so far.
    ``key_padding`` (B, max_len) is kept only when a step brought an attention mask.
    """

    def __init__(
        self, config: BlockConfig, num_blocks: int, batch_size: int, max_length: int, dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.batch_size, self.max_length = batch_size, max_length
        shape = (num_blocks, 2, batch_size, config.num_kv_heads, max_length, config.head_dim)
        self.tensor = torch.zeros(shape, dtype=dtype, device=device)
        self.key_padding: torch.Tensor | None = None
        self.length = 0

    @staticmethod
    def nbytes_per_token(config: BlockConfig, num_blocks: int, dtype: torch.dtype) -> int:
        """Bytes of cache one token (of one sequence) takes over ``num_blocks`` blocks."""
        return num_blocks * 2 * config.num_kv_heads * config.head_dim * torch.finfo(dtype).bits // 8

    def reorder(self, hypo_ids: torch.Tensor) -> None:
        """Make sequence i continue the cached sequence ``hypo_ids[i]`` (beam search)."""
        filled = self.tensor[:, :, :, :, : self.length]
        filled.copy_(filled.index_select(2, hypo_ids))
        if self.key_padding is not None:
            self.key_padding.copy_(self.key_padding.index_select(0, hypo_ids))

    def block(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensor[i, 0], self.tensor[i, 1]


@dataclass
class StepPart:
    """One session's step in a batched step (``SpanModel.step_batch``): what ``SpanModel.step`` takes."""

    hidden: torch.Tensor
    """(B, T, H) new positions after ``cache.length`` cached ones."""
    cache: KVCache
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    prompts: torch.Tensor | None = None
    adapters: list[BlockLoRA] | None = None


class SpanModel(nn.Module):
    """Blocks ``[span.start, span.end)`` of a Llama-family model."""

    def __init__(self, config: BlockConfig, span: Span):
        super().__init__()
        self.config, self.span = config, span
        self.rotary = Rotary(config)
        self.blocks = nn.ModuleList(LlamaBlock(config, i) for i in range(span.start, span.end))

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        blocks: Span | None = None,
        prompts: torch.Tensor | None = None,
        adapters: list[BlockLoRA] | None = None,
    ) -> torch.Tensor:
        """Stateless forward of a whole sequence: hidden (B, T, H) -> (B, T, H).

        ``blocks`` (absolute indices, inside this span) runs only part of the span. ``prompts``
        (n_blocks, P, H): deep prompts, one per block run, added to positions [0, P) of that block's
        input. ``adapters``: one LoRA per block run.
        """
        return self._run(hidden, None, 0, attention_mask, position_ids, blocks or self.span, prompts, adapters)

    def step(
        self,
        hidden: torch.Tensor,
        cache: KVCache,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        blocks: Span | None = None,
        prompts: torch.Tensor | None = None,
        adapters: list[BlockLoRA] | None = None,
    ) -> torch.Tensor:
        """One inference step: append ``hidden`` (B, T, H) after ``cache.length`` cached positions.

        The cache holds ``blocks.length`` blocks (all of the span by default). Deep ``prompts`` apply
        to the step's positions below P.
        """
        offset, num_new = cache.length, hidden.shape[1]
        self._mark_padding(cache, attention_mask, offset, num_new, hidden.device)
        out = self._run(hidden, cache, offset, cache.key_padding, position_ids, blocks or self.span, prompts,
                        adapters)
        cache.length = offset + num_new
        return out

    def step_batch(self, parts: list[StepPart], blocks: Span | None = None) -> list[torch.Tensor]:
        """``step`` for several sessions at once, through the same blocks: one (B_i, T_i, H) output
        per part, each what ``step`` gives it alone (up to float rounding in the projections).

        The parts' new positions run as the rows of one flattened input, so every weight is read
        once per block for all of them; attention runs per session over its own cache (a decoding
        step's attention reads only that session's keys and values: nothing to share). A single
        part runs as ``step``.
        """
        blocks = blocks or self.span
        if len(parts) == 1:
            p = parts[0]
            return [self.step(p.hidden, p.cache, p.attention_mask, p.position_ids, blocks, p.prompts, p.adapters)]
        if not self.span.covers(blocks):
            raise WrongBlocksError(f"blocks {blocks} are outside this span {self.span}")
        device, dtype, H = parts[0].hidden.device, parts[0].hidden.dtype, self.config.hidden_size
        rows, positions, windows, start = [], [], {b.window for b in self.blocks}, 0
        masks: list[dict[int | None, torch.Tensor | None]] = []
        for p in parts:
            B, T, _ = p.hidden.shape
            offset = p.cache.length
            self._mark_padding(p.cache, p.attention_mask, offset, T, device)
            pos = p.position_ids if p.position_ids is not None else \
                torch.arange(offset, offset + T, device=device)[None].expand(B, T)
            positions.append(pos.reshape(-1))
            masks.append({w: build_attention_mask(B, offset, T, p.cache.key_padding, w, device) for w in windows})
            rows.append(slice(start, start + B * T))
            start += B * T
        x = torch.cat([p.hidden.reshape(-1, H) for p in parts])[None]  # (1, N, H)
        cos, sin = self.rotary(torch.cat(positions)[None], dtype)  # (1, 1, N, hd)
        first = blocks.start - self.span.start
        for i, block in enumerate(self.blocks[first : first + blocks.length]):
            if any(p.prompts is not None for p in parts):
                x = torch.cat([add_prompt(x[0, r].view(p.hidden.shape), p.prompts[i], p.cache.length).reshape(-1, H)
                               if p.prompts is not None else x[0, r] for p, r in zip(parts, rows, strict=True)])[None]
            segments = [Segment(r, p.hidden.shape[0], p.hidden.shape[1], p.cache.block(i), p.cache.length,
                                m[block.window], p.adapters[i] if p.adapters else None)
                        for p, r, m in zip(parts, rows, masks, strict=True)]
            x = block.forward_segments(x, cos, sin, segments)
        outs = []
        for p, r in zip(parts, rows, strict=True):
            p.cache.length += p.hidden.shape[1]
            outs.append(x[0, r].view(p.hidden.shape))
        return outs

    @staticmethod
    def _mark_padding(cache: KVCache, attention_mask: torch.Tensor | None, offset: int, num_new: int,
                      device: torch.device) -> None:
        """Record which new positions are real tokens (kept only once a step brought a mask)."""
        if attention_mask is not None:
            if cache.key_padding is None:
                cache.key_padding = torch.ones(cache.batch_size, cache.max_length, dtype=torch.bool, device=device)
            cache.key_padding[:, offset : offset + num_new] = attention_mask.bool()
        elif cache.key_padding is not None:
            cache.key_padding[:, offset : offset + num_new] = True

    def _run(
        self,
        hidden: torch.Tensor,
        cache: KVCache | None,
        offset: int,
        key_padding: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        blocks: Span,
        prompts: torch.Tensor | None = None,
        adapters: list[BlockLoRA] | None = None,
    ) -> torch.Tensor:
        if not self.span.covers(blocks):
            # typed: a request checked against the span before a server moved may run after the move
            raise WrongBlocksError(f"blocks {blocks} are outside this span {self.span}")
        B, T, _ = hidden.shape
        if position_ids is None:
            position_ids = torch.arange(offset, offset + T, device=hidden.device)[None].expand(B, T)
        cos, sin = self.rotary(position_ids, hidden.dtype)
        masks: dict[int | None, torch.Tensor | None] = {}
        first = blocks.start - self.span.start
        for i, block in enumerate(self.blocks[first : first + blocks.length]):
            if block.window not in masks:  # blocks share masks unless their windows differ
                masks[block.window] = build_attention_mask(B, offset, T, key_padding, block.window, hidden.device)
            kv = cache.block(i) if cache is not None else None
            if prompts is not None:
                hidden = add_prompt(hidden, prompts[i], offset)
            hidden = block(hidden, cos, sin, kv, offset, masks[block.window], adapters[i] if adapters else None)
        return hidden


def add_prompt(hidden: torch.Tensor, prompt: torch.Tensor, offset: int) -> torch.Tensor:
    """Add a deep prompt (P, H) to the positions of ``hidden`` (B, T, H) that fall in [0, P), given that
    ``hidden`` starts at position ``offset``. Differentiable in both arguments."""
    num = min(prompt.shape[0] - offset, hidden.shape[1])
    if num <= 0:
        return hidden
    head = hidden[:, :num] + prompt[offset : offset + num].to(hidden.dtype)
    return torch.cat([head, hidden[:, num:]], dim=1)
