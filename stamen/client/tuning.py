"""What a client trains while the frozen blocks stay on servers: prompts (``ptune``, ``deep_ptune``)
and LoRA adapters, with their file formats (peft's adapter format; prompts in one safetensors file).

Deep prompts follow Petals: ``deep_prompts[i]`` (P, H) is added to positions [0, P) of block i's
input, for every block (zero-initialised, so training starts from plain prompt tuning).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from stamen.errors import CheckpointError, UnsupportedModelError
from stamen.models.config import BlockConfig
from stamen.models.lora import LORA_TARGETS, TARGET_PATHS, BlockLoRA, adapter_hash, target_shapes

logger = logging.getLogger(__name__)

TuningMode = Literal["ptune", "deep_ptune"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model.model.layers."
"""Key prefix of a decoder layer in peft's saved adapters for Llama-family models."""


class PromptTuning(nn.Module):
    """Trainable prompt embeddings (P, H) prepended to the input and, for ``deep_ptune``, deep
    prompts (num_blocks, P, H) added at every block's input on the servers."""

    def __init__(self, config: BlockConfig, mode: TuningMode, pre_seq_len: int, init_std: float = 0.02):
        super().__init__()
        if mode not in ("ptune", "deep_ptune"):
            raise ValueError(f"tuning_mode must be 'ptune' or 'deep_ptune', got {mode!r}")
        if pre_seq_len <= 0:
            raise ValueError("prompt tuning needs pre_seq_len > 0")
        self.mode, self.pre_seq_len = mode, pre_seq_len
        self.prompt_embeddings = nn.Parameter(torch.randn(pre_seq_len, config.hidden_size) * init_std)
        self.deep_prompts = (
            nn.Parameter(torch.zeros(config.num_blocks, pre_seq_len, config.hidden_size))
            if mode == "deep_ptune" else None
        )

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file: ``prompt_embeddings`` and ``deep_prompts`` (deep_ptune), with the mode."""
        from safetensors.torch import save_file

        tensors = {"prompt_embeddings": self.prompt_embeddings.detach().contiguous()}
        if self.deep_prompts is not None:
            tensors["deep_prompts"] = self.deep_prompts.detach().contiguous()
        save_file(tensors, str(path), metadata={"tuning_mode": self.mode, "pre_seq_len": str(self.pre_seq_len)})

    @staticmethod
    def read(path: str | os.PathLike) -> tuple[TuningMode, dict[str, torch.Tensor]]:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                mode = (f.metadata() or {}).get("tuning_mode", "ptune")
                return mode, {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        except OSError as e:
            raise CheckpointError(f"cannot read prompts from {path}: {e}") from e


class LoraSettings(BaseModel):
    """A client-owned LoRA adapter on every block (the servers apply it and return its gradients)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(default=8, gt=0)
    """Rank of every A (r, in) and B (out, r)."""
    lora_alpha: float = Field(default=16.0, gt=0)
    """Scaling numerator: deltas are multiplied by lora_alpha / r (as in peft)."""
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    """Hugging Face module names to adapt, among q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj."""
    fa: bool = False
    """LoRA-FA: A stays frozen at its random init and only B trains (servers then skip A's
    gradients and keep only the r-dimensional activation for B); pair with ``lorafa_optimizer``."""

    @field_validator("target_modules")
    @classmethod
    def _known_targets(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(LORA_TARGETS))
        if unknown or not value:
            raise ValueError(f"target_modules must be among {list(LORA_TARGETS)}, got unknown {unknown}")
        return [t for t in LORA_TARGETS if t in value]  # canonical order

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


class _LoraPair(nn.Module):
    def __init__(self, fan_in: int, fan_out: int, r: int):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, fan_in))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's default init; B starts at zero


class ClientLoRA(nn.Module):
    """LoRA weights of every block, held and trained by the client. ``layers[i][target]`` has
    ``lora_A`` (r, in) and ``lora_B`` (out, r). Servers receive a block's weights once per version
    (content-addressed, see ``block_hash``) and return their gradients."""

    def __init__(self, config: BlockConfig, settings: LoraSettings):
        super().__init__()
        self.settings = settings
        shapes = target_shapes(config)
        self.layers = nn.ModuleList(
            nn.ModuleDict({t: _LoraPair(*shapes[t], settings.r) for t in settings.target_modules})
            for _ in range(config.num_blocks)
        )
        if settings.fa:
            for layer in self.layers:
                for pair in layer.values():
                    pair.lora_A.requires_grad_(False)
        self._hashes: dict[int, tuple[tuple, str]] = {}

    @property
    def train_a(self) -> bool:
        return not self.settings.fa

    def tensors(self) -> list[torch.Tensor]:
        """Every weight in wire order: per block, per target, A then B."""
        return [t for layer in self.layers for pair in layer.values() for t in (pair.lora_A, pair.lora_B)]

    def block(self, index: int) -> BlockLoRA:
        layer = self.layers[index]
        return BlockLoRA({t: (p.lora_A.detach(), p.lora_B.detach()) for t, p in layer.items()}, self.settings.scaling)

    def block_hash(self, index: int) -> str:
        """Content hash of block ``index``'s weights, recomputed only when a weight changed in place."""
        layer = self.layers[index]
        key = tuple((id(t), t._version) for p in layer.values() for t in (p.lora_A, p.lora_B))
        cached = self._hashes.get(index)
        if cached is None or cached[0] != key:
            cached = self._hashes[index] = (key, adapter_hash(self.block(index)))
        return cached[1]

    # --- peft's adapter format ---

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{PEFT_PREFIX}{i}.{TARGET_PATHS[t]}.{name}.weight": getattr(pair, name).detach().contiguous()
            for i, layer in enumerate(self.layers) for t, pair in layer.items() for name in ("lora_A", "lora_B")
        }

    def save(self, path: str | os.PathLike, base_model: str | None = None, task_type: str = "CAUSAL_LM") -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as peft does."""
        from peft import LoraConfig
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = LoraConfig(r=self.settings.r, lora_alpha=self.settings.lora_alpha,
                            target_modules=list(self.settings.target_modules), lora_dropout=0.0, bias="none",
                            task_type=task_type, base_model_name_or_path=base_model)
        config.save_pretrained(str(path))
        save_file(self.peft_state_dict(), str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    @classmethod
    def load(cls, path: str | os.PathLike, config: BlockConfig, fa: bool = False) -> ClientLoRA:
        """Read a peft LoRA adapter directory (plain LoRA on Llama-family target modules)."""
        from safetensors.torch import load_file

        path = Path(path)
        try:
            raw = json.loads((path / ADAPTER_CONFIG).read_text())
            weights = load_file(str(path / ADAPTER_WEIGHTS))
        except OSError as e:
            raise CheckpointError(f"cannot read a peft adapter from {path}: {e}") from e
        if raw.get("peft_type", "LORA") != "LORA" or raw.get("use_rslora") or raw.get("use_dora") or \
                raw.get("bias", "none") != "none":
            raise UnsupportedModelError("only plain LoRA adapters (no rsLoRA, DoRA or biases) are supported")
        targets = raw.get("target_modules")
        if isinstance(targets, str):
            targets = [t for t in LORA_TARGETS if t in targets]
        lora = cls(config, LoraSettings(r=raw["r"], lora_alpha=raw["lora_alpha"], target_modules=targets, fa=fa))
        expected = lora.peft_state_dict()
        found = {k.replace(".default.", "."): v for k, v in weights.items()}
        missing = sorted(set(expected) - set(found))
        if missing:
            raise CheckpointError(f"{path} lacks adapter tensors, e.g. {missing[:3]}")
        with torch.no_grad():
            for i, layer in enumerate(lora.layers):
                for t, pair in layer.items():
                    for name in ("lora_A", "lora_B"):
                        getattr(pair, name).copy_(found[f"{PEFT_PREFIX}{i}.{TARGET_PATHS[t]}.{name}.weight"])
        return lora


def lorafa_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """peft's LoRA-FA optimizer over ``model``'s LoRA pairs (A frozen, B's gradient projected) and
    AdamW for any other trainable parameter (prompts, a classification head)."""
    from peft.optimizers.lorafa import LoraFAOptimizer

    lora = getattr(model, "lora", None)
    scaling = lora.settings.scaling if lora is not None else 1.0
    # peft pairs A with the B that follows it and keys its state by the name up to the first "lora":
    # give LoRA weights their peft names, A before B, and every other trained parameter its own name
    named = list(zip(lora.peft_state_dict(), lora.tensors(), strict=True)) if lora is not None else []
    lora_ids = {id(p) for _, p in named}
    named += [(f"client.{n}", p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in lora_ids]
    group = {
        "params": [p for _, p in named],
        "names": [n for n, _ in named],
        "scaling_factors": [scaling if ".lora_" in n else None for n, _ in named],
        "lr": lr,
        "betas": (0.9, 0.999),
        "weight_decay": weight_decay,
    }
    return LoraFAOptimizer([group])
