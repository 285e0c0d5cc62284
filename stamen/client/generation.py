"""``generate`` with the transformers semantics users know, over an inference session.

Logits processing reuses transformers' public processor classes so that greedy, sampling,
temperature, top-k, top-p and repetition penalty mean exactly what they mean there.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from stamen.errors import InvalidRequestError

logger = logging.getLogger(__name__)


class GenerationMixin:
    """Mixed into the distributed model: needs ``step_logits``, ``inference_session``,
    ``active_session`` and ``generation_config``."""

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        streamer: Any = None,
        session: Any = None,
        **kwargs: Any,
    ) -> torch.LongTensor:
        """Generate continuations of ``input_ids`` (B, T); returns (B, T + new) like transformers.

        Keyword arguments override ``generation_config`` fields: max_new_tokens, max_length,
        do_sample, temperature, top_k, top_p, repetition_penalty, eos_token_id, pad_token_id.
        Inside ``inference_session`` (or with ``session=``), earlier tokens are not sent again.
        """
        config = copy.deepcopy(generation_config or self.generation_config or GenerationConfig())
        unknown = config.update(**kwargs)
        if unknown:
            raise TypeError(f"unknown generate arguments: {sorted(unknown)}")
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise InvalidRequestError(f"input_ids must have shape (batch, length >= 1), got {tuple(input_ids.shape)}")
        batch, prompt_len = input_ids.shape
        if config.max_new_tokens is not None:
            max_length = prompt_len + config.max_new_tokens
        elif config.max_length is not None:
            max_length = config.max_length
        else:
            max_length = prompt_len + 20
        eos = _as_list(config.eos_token_id)
        pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
        processors = _processors(config, logits_processor)
        criteria = stopping_criteria or StoppingCriteriaList()

        session = session or self.active_session
        with contextlib.ExitStack() as stack:
            if session is None:
                session = stack.enter_context(self.inference_session(max_length=max_length, batch_size=batch))
            if session.batch_size != batch:
                raise InvalidRequestError(f"batch size {batch} differs from the session's {session.batch_size}")
            new_ids, positions, mask = _unsent(session, input_ids, attention_mask)
            if streamer is not None:
                streamer.put(input_ids.cpu())
            ids = input_ids
            unfinished = torch.ones(batch, dtype=torch.bool)
            while True:
                logits = self.step_logits(session, new_ids, mask, positions).float()
                session.input_ids = ids
                scores = processors(ids, logits)
                if config.do_sample:
                    next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
                else:
                    next_tokens = scores.argmax(dim=-1)
                next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad))
                ids = torch.cat([ids, next_tokens[:, None]], dim=1)
                if streamer is not None:
                    streamer.put(next_tokens.cpu())
                if eos:
                    unfinished &= ~torch.isin(next_tokens, torch.tensor(eos))
                if criteria:
                    unfinished &= ~criteria(ids, scores).to(unfinished.device)
                if not unfinished.any() or ids.shape[1] >= max_length:
                    break
                new_ids = next_tokens[:, None]
                positions = None if positions is None else positions[:, -1:] + 1
                mask = None if mask is None else torch.ones_like(new_ids)
        if streamer is not None:
            streamer.end()
        return ids


def _unsent(session, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """The tokens the session's servers have not seen, rolling back past any divergence.
    Returns (new_ids, position_ids or None, attention_mask for the new tokens or None)."""
    seen = session.input_ids
    common = 0
    if seen is not None and seen.shape[0] == input_ids.shape[0]:
        limit = min(seen.shape[1], input_ids.shape[1] - 1, session.position)  # always send >= 1 token
        same = (seen[:, :limit] == input_ids[:, :limit]).all(dim=0)
        common = int(same.long().cumprod(0).sum()) if limit > 0 else 0
    if common < session.position:
        session.rollback(common)
    new_ids = input_ids[:, common:]
    if attention_mask is None or bool(attention_mask.all()):
        return new_ids, None, None
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return new_ids, positions[:, common:], attention_mask[:, common:]


def _processors(config: GenerationConfig, extra: LogitsProcessorList | None) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=config.repetition_penalty))
    if extra:
        processors.extend(extra)
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    return processors


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
