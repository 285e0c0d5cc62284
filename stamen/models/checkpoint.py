"""Reading Hugging Face checkpoints tensor by tensor: a server loads only its span's blocks."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from stamen.errors import CheckpointError
from stamen.models.config import SUPPORTED_MODEL_TYPES, BlockConfig
from stamen.models.kernels import input_major, prefers_input_major
from stamen.models.llama import BLOCK_TENSOR_SUFFIXES, Rotary, hf_block_state_dict
from stamen.models.quant import PROJECTIONS, QuantMethod, quantize_block_
from stamen.models.span import SpanModel
from stamen.types import Span

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class Checkpoint:
    """Where every tensor of a model lives; files are fetched lazily for hub ids."""

    source: str
    """A local directory or a hub id."""
    weight_map: dict[str, str]
    """Tensor name -> file name (relative to the checkpoint root)."""
    local_dir: Path | None
    """Set when ``source`` is a local directory."""
    block_prefix: str
    """``model.layers.`` or ``layers.``: how block tensors are named."""
    revision: str | None = None

    def path_of(self, filename: str) -> str:
        if self.local_dir is not None:
            return str(self.local_dir / filename)
        from huggingface_hub import hf_hub_download

        return hf_hub_download(self.source, filename, revision=self.revision)

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Load the named tensors, opening each file once."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise CheckpointError(f"tensor {name!r} is missing from {self.source}")
            by_file.setdefault(self.weight_map[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for filename, file_names in by_file.items():
            with safe_open(self.path_of(filename), framework="pt") as f:
                for name in file_names:
                    out[name] = f.get_tensor(name)
        return out

    def block_tensor_names(self, index: int) -> list[str]:
        prefix = f"{self.block_prefix}{index}."
        return [prefix + s for s in BLOCK_TENSOR_SUFFIXES if prefix + s in self.weight_map]


def open_checkpoint(source: str | os.PathLike, revision: str | None = None) -> Checkpoint:
    """Index a local Hugging Face directory or a hub id (single file or sharded safetensors)."""
    source = str(source)
    local = Path(source)
    if local.is_dir():
        if (local / INDEX_FILE).exists():
            weight_map = json.loads((local / INDEX_FILE).read_text())["weight_map"]
        elif (local / SINGLE_FILE).exists():
            with safe_open(str(local / SINGLE_FILE), framework="pt") as f:
                weight_map = {name: SINGLE_FILE for name in f.keys()}
        else:
            raise CheckpointError(f"{source} has no {SINGLE_FILE} or {INDEX_FILE}")
        local_dir: Path | None = local
    else:
        weight_map = _hub_weight_map(source, revision)
        local_dir = None
    prefix = "model.layers." if any(k.startswith("model.layers.") for k in weight_map) else "layers."
    return Checkpoint(source, weight_map, local_dir, prefix, revision)


def _hub_weight_map(repo_id: str, revision: str | None) -> dict[str, str]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        index_path = hf_hub_download(repo_id, INDEX_FILE, revision=revision)
        return json.loads(Path(index_path).read_text())["weight_map"]
    except EntryNotFoundError:
        pass
    except Exception as e:
        raise CheckpointError(f"cannot read {repo_id!r}: not a local directory and the hub failed: {e}") from e
    path = hf_hub_download(repo_id, SINGLE_FILE, revision=revision)
    with safe_open(path, framework="pt") as f:
        return {name: SINGLE_FILE for name in f.keys()}


def load_config(source: str | os.PathLike, revision: str | None = None):
    """The transformers config of a model (local directory or hub id)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(source), revision=revision)
    except Exception as e:
        raise CheckpointError(f"cannot read the config of {source}: {e}") from e


_EXPLICIT_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                    "num_key_value_heads", "rms_norm_eps", "vocab_size", "max_position_embeddings")
"""Fields whose defaults differ between the supported families' config classes (or that have none)."""


def _plain_config(source: str | os.PathLike) -> SimpleNamespace | None:
    """A local config.json read as it is, when it names every field whose class default matters;
    else None. The remaining fields default alike in every supported family (silu, no biases, no
    tied embeddings, head_dim = hidden / heads); ``tests/test_models.py`` checks both readings agree."""
    path = Path(source) / "config.json"
    if not path.is_file():
        return None
    try:
        fields = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # transformers' reading gives the error
    if not isinstance(fields, dict) or any(name not in fields for name in _EXPLICIT_FIELDS):
        return None
    model_type = fields.get("model_type")
    rope = fields.get("rope_parameters")
    if "rope_theta" not in fields and not (isinstance(rope, dict) and "rope_theta" in rope):
        return None
    if model_type == "mistral" and "sliding_window" not in fields:
        return None
    if model_type == "qwen2" and fields.get("use_sliding_window"):
        return None  # its layer types derive from max_window_layers: transformers works them out
    if model_type not in SUPPORTED_MODEL_TYPES:
        return None  # transformers' reading names what it is, from_hf refuses it
    return SimpleNamespace(**fields)


def load_block_config(source: str | os.PathLike, revision: str | None = None) -> BlockConfig:
    """The block config of a model. A local config.json that names every field a block needs is read
    directly: importing transformers' config classes costs a process about 1.8 s of CPU (transformers
    5 loads its kernel and weight-conversion modules with them), most of a server's start on a
    small model. Anything else goes through ``AutoConfig``."""
    plain = _plain_config(source) if revision is None else None
    if plain is not None:
        try:
            return BlockConfig.from_hf(plain)
        except (TypeError, ValueError):  # a field of the wrong type: transformers' reading names it (CheckpointError)
            pass
    return BlockConfig.from_hf(load_config(source, revision))


def load_span(
    checkpoint: Checkpoint,
    config: BlockConfig,
    span: Span,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    progress: bool = True,
    reuse: SpanModel | None = None,
    quant: QuantMethod = "none",
    input_major_ok: bool = True,
) -> SpanModel:
    """Build a SpanModel holding only blocks ``span`` with weights read from the checkpoint.

    Blocks that ``reuse`` (a span already loaded, e.g. before a server moves) holds are shared with
    it instead of being read again. ``quant`` (int8, nf4) quantizes each block's projections as it
    is loaded, from the checkpoint's own precision, so no more than one block is ever in float.
    ``input_major_ok=False`` keeps every weight contiguous (trained spans: their gradients and
    hivemind's all-reduce, which flattens tensors with ``view``, want the plain layout)."""
    if span.end > config.num_blocks:
        raise CheckpointError(f"span {span} is past the model's {config.num_blocks} blocks")
    with torch.device("meta"):
        model = SpanModel(config, span)
    resident = {} if reuse is None else {reuse.span.start + i: b for i, b in enumerate(reuse.blocks)}
    bar = tqdm(
        total=span.length - len(resident.keys() & set(range(span.start, span.end))), desc=f"loading blocks {span}",
        unit="block", disable=not progress, dynamic_ncols=True,
    )
    for i, block in enumerate(model.blocks):
        index = span.start + i
        if index in resident:
            model.blocks[i] = resident[index]
            continue
        raw = checkpoint.load(checkpoint.block_tensor_names(index))
        state = hf_block_state_dict(raw, f"{checkpoint.block_prefix}{index}.")
        keep = {f"{p}.weight" for p in PROJECTIONS} if quant != "none" else set()  # quantized from the original
        state = {k: v.to(device=device) if k in keep else v.to(device=device, dtype=dtype) for k, v in state.items()}
        if quant == "none" and input_major_ok and prefers_input_major(device, dtype):
            state.update({f"{p}.weight": input_major(state[f"{p}.weight"]) for p in PROJECTIONS})
        try:
            block.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise CheckpointError(f"block {index} of {checkpoint.source} does not match its config: {e}") from e
        quantize_block_(block, quant)
        bar.update(1)
    bar.close()
    model.rotary = Rotary(config).to(device)
    return model.eval().requires_grad_(False)


@dataclass
class ClientParts:
    """What a client holds: the input embeddings, the final norm and the LM head."""

    embed_tokens: torch.Tensor
    norm: torch.Tensor
    lm_head: torch.Tensor


def load_client_parts(checkpoint: Checkpoint, config: BlockConfig) -> ClientParts:
    root = "model." if checkpoint.block_prefix.startswith("model.") else ""
    names = [f"{root}embed_tokens.weight", f"{root}norm.weight"]
    has_head = "lm_head.weight" in checkpoint.weight_map
    if has_head:
        names.append("lm_head.weight")
    elif not config.tie_word_embeddings:
        raise CheckpointError(f"{checkpoint.source} has no lm_head.weight and does not tie embeddings")
    t = checkpoint.load(names)
    embed = t[names[0]]
    return ClientParts(embed_tokens=embed, norm=t[names[1]], lm_head=t["lm_head.weight"] if has_head else embed)
