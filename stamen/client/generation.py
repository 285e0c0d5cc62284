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

from stamen import trace
from stamen.client.session import Rewound
from stamen.errors import InvalidRequestError

logger = logging.getLogger(__name__)


class GenerationMixin:
    """Mixed into the distributed model: needs ``step_logits``, ``inference_session``,
    ``active_session`` and ``generation_config``."""

    @classmethod
    def can_generate(cls) -> bool:
        """True: transformers' ``pipeline("text-generation", model=...)`` and others check it."""
        return True

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
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> torch.LongTensor:
        """Generate continuations of ``input_ids`` (B, T); returns (B, T + new) like transformers.

        Keyword arguments override ``generation_config`` fields: max_new_tokens, max_length,
        do_sample, temperature, top_k, top_p, repetition_penalty, eos_token_id, pad_token_id,
        num_beams, length_penalty (beam search keeps num_beams sequences per input in the session).
        Inside ``inference_session`` (or with ``session=``), earlier tokens are not sent again.
        ``generator`` draws the samples (a per-request seed that concurrent requests do not disturb).
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

        if config.num_beams and config.num_beams > 1:
            if config.do_sample:
                raise InvalidRequestError("beam sampling is not supported: use do_sample=False with num_beams")
            return self._beam_search(input_ids, attention_mask, config, max_length, eos, pad, processors,
                                     session or self.active_session, streamer)
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
            full_mask = attention_mask
            unfinished = torch.ones(batch, dtype=torch.bool)
            while True:
                try:
                    logits = self.step_logits(session, new_ids, mask, positions).float()
                except Rewound as rewound:  # an audit caught a lying server: redo what followed its last check
                    ids, full_mask, unfinished = _rewind(ids, full_mask, rewound.position, prompt_len, eos)
                    new_ids, positions, mask = _unsent(session, ids, full_mask)
                    continue
                trace.mark("c.logits")
                session.input_ids = ids
                scores = processors(ids, logits)
                if config.do_sample:
                    next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1,
                                                    generator=generator).squeeze(1)
                else:
                    next_tokens = scores.argmax(dim=-1)
                next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad))
                ids = torch.cat([ids, next_tokens[:, None]], dim=1)
                if full_mask is not None:
                    full_mask = torch.cat([full_mask, torch.ones_like(next_tokens[:, None])], dim=1)
                if streamer is not None:
                    streamer.put(next_tokens.cpu())
                if eos:
                    unfinished &= ~torch.isin(next_tokens, torch.tensor(eos))
                if criteria:
                    unfinished &= ~criteria(ids, scores).to(unfinished.device)
                if not unfinished.any() or ids.shape[1] >= max_length:
                    try:  # every output behind these tokens checked before they are returned
                        session.audit_all()
                    except Rewound as rewound:
                        ids, full_mask, unfinished = _rewind(ids, full_mask, rewound.position, prompt_len, eos)
                        new_ids, positions, mask = _unsent(session, ids, full_mask)
                        continue
                    break
                new_ids = next_tokens[:, None]
                positions = None if positions is None else positions[:, -1:] + 1
                mask = None if mask is None else torch.ones_like(new_ids)
        if streamer is not None:
            streamer.end()
        return ids


    def _beam_search(self, input_ids, attention_mask, config, max_length, eos, pad, processors, session,
                     streamer) -> torch.LongTensor:
        """Beam search over an inference session of batch × num_beams sequences: each step tells the
        servers which cached sequence every beam continues (``hypo_ids``), so caches are reordered
        in place, and the reordering is part of the history replayed after a failure."""
        batch, num_beams = input_ids.shape[0], config.num_beams
        length_penalty = config.length_penalty if config.length_penalty is not None else 1.0
        prompt_len = input_ids.shape[1]
        ids = input_ids.repeat_interleave(num_beams, dim=0)
        mask = None if attention_mask is None else attention_mask.repeat_interleave(num_beams, dim=0)
        beam_scores = torch.zeros(batch, num_beams)
        beam_scores[:, 1:] = -1e9  # the first step expands beam 0 only
        beam_scores = beam_scores.view(-1)
        finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(batch)]
        with contextlib.ExitStack() as stack:
            if session is None:
                session = stack.enter_context(self.inference_session(max_length, batch_size=batch * num_beams))
            if session.batch_size != batch * num_beams:
                raise InvalidRequestError(f"beam search needs a session of batch {batch * num_beams}")
            session.rollback(0)
            positions = None if mask is None or bool(mask.all()) else (mask.long().cumsum(-1) - 1).clamp(min=0)
            step_mask = None if positions is None else mask
            new_ids, hypo_ids = ids, None
            if streamer is not None:
                streamer.put(input_ids.cpu())
            while True:
                logits = self.step_logits(session, new_ids, step_mask, positions, hypo_ids).float()
                scores = processors(ids, torch.log_softmax(logits, dim=-1))
                vocab = scores.shape[-1]
                scores = (scores + beam_scores[:, None]).view(batch, num_beams * vocab)
                top_scores, top_index = scores.topk(2 * num_beams, dim=1)
                next_beams, next_tokens, next_scores = [], [], []
                for b in range(batch):
                    kept = 0
                    for score, index in zip(top_scores[b].tolist(), top_index[b].tolist(), strict=True):
                        beam, token = b * num_beams + index // vocab, index % vocab
                        if token in eos:
                            generated = ids.shape[1] + 1 - prompt_len
                            finished[b].append((score / generated**length_penalty,
                                                torch.cat([ids[beam], torch.tensor([token])])))
                            continue
                        next_beams.append(beam)
                        next_tokens.append(token)
                        next_scores.append(score)
                        kept += 1
                        if kept == num_beams:
                            break
                hypo_ids = torch.tensor(next_beams)
                beam_scores = torch.tensor(next_scores)
                ids = torch.cat([ids[hypo_ids], torch.tensor(next_tokens)[:, None]], dim=1)
                session.input_ids = None  # beams move between sequences: no prefix reuse
                if positions is not None:
                    positions = positions[hypo_ids][:, -1:] + 1
                    step_mask = torch.ones(ids.shape[0], 1, dtype=torch.long)
                new_ids = ids[:, -1:]
                done = all(len(f) >= num_beams for f in finished)
                if done or ids.shape[1] >= max_length:
                    break
        best = []
        for b in range(batch):
            generated = ids.shape[1] - prompt_len
            alive = [(float(beam_scores[b * num_beams + k]) / generated**length_penalty, ids[b * num_beams + k])
                     for k in range(num_beams)]
            best.append(max(finished[b] + alive, key=lambda item: item[0])[1])
        width = max(seq.shape[0] for seq in best)
        out = torch.full((batch, width), pad, dtype=input_ids.dtype)
        for b, seq in enumerate(best):
            out[b, : seq.shape[0]] = seq
        if streamer is not None:
            streamer.put(out[:, prompt_len:].reshape(-1).cpu())
            streamer.end()
        return out


def _rewind(ids: torch.Tensor, mask: torch.Tensor | None, position: int, prompt_len: int, eos: list[int]):
    """Tokens to keep after a session rolled back to ``position``: the token at ``position`` came from
    outputs before it (checked), later ones are dropped (the prompt is always kept). Returns
    (ids, mask, unfinished)."""
    keep = max(position + 1, prompt_len)
    ids = ids[:, :keep]
    mask = None if mask is None else mask[:, :keep]
    generated = ids[:, prompt_len:]
    unfinished = ~torch.isin(generated, torch.tensor(eos)).any(dim=1) if eos and generated.numel() else \
        torch.ones(ids.shape[0], dtype=torch.bool)
    return ids, mask, unfinished


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
