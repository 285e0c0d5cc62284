"""Writing a model trained in the swarm back as a Hugging Face directory.

The inverse of ``checkpoint.load_span`` / ``load_client_parts``: blocks in our fused layout
(``qkv_proj``, ``gate_up_proj``) are split into transformers' q/k/v and gate/up projections, the
client parts are named as transformers names them, and the source model's config, generation
config and tokenizer files come along, so ``AutoModelForCausalLM.from_pretrained(out)`` loads it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from stamen.errors import CheckpointError
from stamen.models.checkpoint import load_config
from stamen.models.config import BlockConfig

COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
"""Files copied from a local source directory besides the config (those it has)."""


def hf_block_tensors(state: Mapping[str, torch.Tensor], config: BlockConfig, prefix: str) -> dict[str, torch.Tensor]:
    """One block's tensors in our layout (``LlamaBlock.state_dict()`` names) -> transformers' names
    under ``prefix`` (e.g. ``model.layers.3.``); the inverse of ``llama.hf_block_state_dict``."""
    q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.startswith("self_attn.qkv_proj."):
            kind = name.rsplit(".", 1)[1]  # weight or bias
            for p, part in zip("qkv", tensor.split([q_size, kv_size, kv_size], dim=0), strict=True):
                out[f"{prefix}self_attn.{p}_proj.{kind}"] = part
        elif name.startswith("mlp.gate_up_proj."):
            kind = name.rsplit(".", 1)[1]
            gate, up = tensor.split(config.intermediate_size, dim=0)
            out[f"{prefix}mlp.gate_proj.{kind}"], out[f"{prefix}mlp.up_proj.{kind}"] = gate, up
        else:
            out[prefix + name] = tensor
    return out


def split_span_state(params: Mapping[str, torch.Tensor], span_start: int) -> dict[int, dict[str, torch.Tensor]]:
    """A span's parameters in ``SpanModel`` naming (``blocks.<i>.<name>``, i relative to the span)
    -> per absolute block index, the block's own names."""
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in params.items():
        head, _, rest = name.partition(".")
        index, _, block_name = rest.partition(".")
        if head != "blocks" or not index.isdigit() or not block_name:
            raise CheckpointError(f"unexpected span parameter {name!r}")
        blocks.setdefault(span_start + int(index), {})[block_name] = tensor
    return blocks


def save_hf_model(out: str | os.PathLike, source: str | os.PathLike, config: BlockConfig,
                  blocks: Mapping[int, Mapping[str, torch.Tensor]], embed_tokens: torch.Tensor,
                  norm: torch.Tensor, lm_head: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> Path:
    """Write a Hugging Face model directory: ``config.json`` (the source's, with ``dtype``),
    ``model.safetensors`` (every block of ``blocks``, by absolute index, in our layout; the client
    parts; ``lm_head`` None when the embeddings are tied) and the source's tokenizer files.
    ``source``: the model the swarm started from (a local directory or hub id)."""
    missing = [b for b in range(config.num_blocks) if b not in blocks]
    if missing:
        raise CheckpointError(f"cannot export: no parameters for blocks {missing}")
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": embed_tokens, "model.norm.weight": norm}
    if lm_head is not None and not config.tie_word_embeddings:
        tensors["lm_head.weight"] = lm_head
    for b in range(config.num_blocks):
        tensors.update(hf_block_tensors(blocks[b], config, f"model.layers.{b}."))
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})

    hf_config = load_config(source)
    hf_config.dtype = dtype
    hf_config.save_pretrained(tmp)
    _copy_tokenizer(source, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _copy_tokenizer(source: str | os.PathLike, out: Path) -> None:
    src = Path(source)
    if src.is_dir():
        for name in COPIED_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, out / name)
        return
    try:  # a hub id: let transformers fetch and write the tokenizer
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(source)).save_pretrained(out)
    except Exception as e:
        raise CheckpointError(f"cannot copy the tokenizer of {source}: {e}") from e
