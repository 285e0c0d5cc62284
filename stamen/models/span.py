"""A contiguous span of blocks with an in-place KV cache: the unit a server hosts."""

from __future__ import annotations

import torch
from torch import nn

from stamen.errors import WrongBlocksError
from stamen.models.config import BlockConfig
from stamen.models.llama import LlamaBlock, Rotary, build_attention_mask
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
        if attention_mask is not None:
            if cache.key_padding is None:
                cache.key_padding = torch.ones(
                    cache.batch_size, cache.max_length, dtype=torch.bool, device=hidden.device
                )
            cache.key_padding[:, offset : offset + num_new] = attention_mask.bool()
        elif cache.key_padding is not None:
            cache.key_padding[:, offset : offset + num_new] = True
        out = self._run(hidden, cache, offset, cache.key_padding, position_ids, blocks or self.span, prompts,
                        adapters)
        cache.length = offset + num_new
        return out

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
