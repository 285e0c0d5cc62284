"""Random Llama-family models saved in the Hugging Face format, with a locally trained tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_CORPUS = """
The swarm shares the work of one large model. Each server holds a span of blocks and the client
holds the embeddings and the head. Hidden states travel from server to server until every block
has run. When a server leaves, the client finds another one and replays what it sent before.
Volunteers join with uneven hardware; each picks the blocks where the swarm is weakest.
""" * 4

TRAINED_SPREAD: dict[str, Any] = dict(initializer_range=0.2)
"""Config overrides that give random weights the spread of trained ones (transformers' default
``initializer_range`` of 0.02 leaves the blocks' contributions tiny next to the embeddings: greedy
output soon repeats one token and does not change with RoPE switched off). Tests merge it into
their overrides so that equal tokens and logits say something about the block math."""

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=4),
    "246m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000),
}


def make_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on a built-in text, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_random_llama(out: str | Path, overrides: dict[str, Any], seed: int = 0, model_type: str = "llama",
                      with_tokenizer: bool = True, dtype: torch.dtype = torch.float32) -> Path:
    """Write a random model of ``model_type`` (llama, mistral, qwen2) with its tokenizer to ``out``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer() if with_tokenizer else None
    settings = dict(vocab_size=len(tokenizer) if tokenizer else 512, max_position_embeddings=2048,
                    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    settings.update(overrides)
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
