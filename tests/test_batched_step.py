"""``SpanModel.step_batch``: sessions of different lengths, batch sizes, paddings, deep prompts and
LoRA adapters stepped together give what each gives alone (in-process, no swarm)."""

from __future__ import annotations

import pytest
import torch

from stamen.models import BlockConfig, KVCache, load_config, load_span, open_checkpoint
from stamen.models.lora import LORA_TARGETS, BlockLoRA, target_shapes
from stamen.models.span import StepPart
from stamen.testing.models import TRAINED_SPREAD, save_random_llama
from stamen.types import Span

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=97, **TRAINED_SPREAD)
CONFIGS = {
    "llama-gqa": ("llama", TINY),
    "qwen2-bias": ("qwen2", TINY),
    "mistral-window": ("mistral", dict(TINY, sliding_window=5)),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def span_model(request, tmp_path_factory):
    model_type, overrides = CONFIGS[request.param]
    path = save_random_llama(tmp_path_factory.mktemp(request.param), overrides, model_type=model_type,
                             with_tokenizer=False)
    config = BlockConfig.from_hf(load_config(path))
    return load_span(open_checkpoint(path), config, Span(0, 3), torch.float32, progress=False), config


def _lora(config: BlockConfig, seed: int) -> list[BlockLoRA]:
    g = torch.Generator().manual_seed(seed)
    shapes = target_shapes(config)
    return [BlockLoRA({t: (torch.randn(4, shapes[t][0], generator=g) * 0.1,
                           torch.randn(shapes[t][1], 4, generator=g) * 0.1) for t in LORA_TARGETS}, 2.0)
            for _ in range(3)]


class _Sess:
    """One session's inputs for a few steps, and its own cache."""

    def __init__(self, config, seed, batch, prompt_len, prompts=False, lora=False, padded=False, max_length=32):
        g = torch.Generator().manual_seed(seed)
        self.steps = [torch.randn(batch, prompt_len, config.hidden_size, generator=g)] + \
                     [torch.randn(batch, 1, config.hidden_size, generator=g) for _ in range(4)]
        self.masks = None
        if padded:  # the first sequence left-padded by 2
            first = torch.ones(batch, prompt_len, dtype=torch.long)
            first[0, :2] = 0
            self.masks = [first] + [torch.ones(batch, 1, dtype=torch.long) for _ in range(4)]
        self.prompts = torch.randn(3, 2, config.hidden_size, generator=g) * 0.5 if prompts else None
        self.adapters = _lora(config, seed) if lora else None
        self.batch, self.max_length = batch, max_length

    def cache(self, config):
        return KVCache(config, 3, self.batch, self.max_length, torch.float32)

    def part(self, i, cache):
        return StepPart(self.steps[i], cache, self.masks[i] if self.masks else None, None, self.prompts,
                        self.adapters)


def test_batched_steps_equal_each_session_alone(span_model):
    model, config = span_model
    sessions = [
        _Sess(config, 1, 1, 5),
        _Sess(config, 2, 1, 9, prompts=True),
        _Sess(config, 3, 2, 3, lora=True),  # two sequences, own adapter
        _Sess(config, 4, 3, 6, padded=True),
        _Sess(config, 5, 1, 1, lora=True, prompts=True),
    ]
    alone, together = [], []
    with torch.inference_mode():
        for s in sessions:
            cache = s.cache(config)
            alone.append([model.step(p.hidden, cache, p.attention_mask, None, None, p.prompts, p.adapters)
                          for p in (s.part(i, cache) for i in range(len(s.steps)))])
        caches = [s.cache(config) for s in sessions]
        for i in range(5):  # every step of every session in one batch: prefills of different lengths, then decoding
            together.append(model.step_batch([s.part(i, c) for s, c in zip(sessions, caches, strict=True)]))
    for k, s in enumerate(sessions):
        for i in range(5):
            torch.testing.assert_close(together[i][k], alone[k][i], rtol=1e-4, atol=1e-4)
        assert caches[k].length == sum(step.shape[1] for step in s.steps)


def test_a_batch_mixes_decoding_and_a_prefill_chunk(span_model):
    """A long prompt fed in chunks beside other sessions' decoding steps equals the prompt in one step."""
    model, config = span_model
    g = torch.Generator().manual_seed(7)
    prompt = torch.randn(1, 12, config.hidden_size, generator=g)
    dec = _Sess(config, 8, 1, 4)
    with torch.inference_mode():
        whole = model.step(prompt, KVCache(config, 3, 1, 32, torch.float32))
        long_cache, dec_cache = KVCache(config, 3, 1, 32, torch.float32), dec.cache(config)
        model.step(dec.steps[0], dec_cache)
        chunks = []
        for i, (a, b) in enumerate(((0, 5), (5, 9), (9, 12))):
            out = model.step_batch([StepPart(prompt[:, a:b], long_cache), dec.part(1 + i, dec_cache)])
            chunks.append(out[0])
    torch.testing.assert_close(torch.cat(chunks, dim=1), whole, rtol=1e-4, atol=1e-4)
