"""Sequence classification over the swarm: a local head on the last real token's hidden state,
like transformers' ``LlamaForSequenceClassification``; the blocks run on servers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stamen.client.model import DistributedModelBase
from stamen.client.swarm import Swarm
from stamen.errors import InvalidRequestError
from stamen.models import BlockConfig
from stamen.models.checkpoint import Checkpoint


@dataclass
class _EmbedAndNorm:
    embed_tokens: torch.Tensor
    norm: torch.Tensor
    score: torch.Tensor | None


@dataclass
class SequenceClassifierOutput:
    logits: torch.Tensor
    """(B, num_labels)"""
    loss: torch.Tensor | None = None


class DistributedModelForSequenceClassification(DistributedModelBase):
    """``score`` (num_labels × H, trainable) on the final norm of the last non-padding token.
    Its weights come from the checkpoint's ``score.weight`` when present, else a normal init."""

    _head_kwargs = ("num_labels",)
    _trainable_head = "score"
    _peft_task_type = "SEQ_CLS"

    def __init__(self, hf_config, block_config: BlockConfig, swarm: Swarm, num_labels: int | None = None):
        super().__init__(hf_config, block_config, swarm)
        self.num_labels = num_labels or getattr(hf_config, "num_labels", 2)
        self.pad_token_id = getattr(hf_config, "pad_token_id", None)
        self.score = nn.Linear(block_config.hidden_size, self.num_labels, bias=False)

    @classmethod
    def _read_parts(cls, checkpoint: Checkpoint, block_config: BlockConfig) -> _EmbedAndNorm:
        root = "model." if checkpoint.block_prefix.startswith("model.") else ""
        names = [f"{root}embed_tokens.weight", f"{root}norm.weight"]
        if "score.weight" in checkpoint.weight_map:
            names.append("score.weight")
        t = checkpoint.load(names)
        return _EmbedAndNorm(t[names[0]], t[names[1]], t.get("score.weight"))

    def _load_head(self, parts: _EmbedAndNorm, checkpoint) -> None:
        if parts.score is not None and tuple(parts.score.shape) == tuple(self.score.weight.shape):
            self.score.weight.copy_(parts.score)
        else:
            self.score.weight.normal_(0.0, getattr(self.config, "initializer_range", 0.02))

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        """Logits of the last non-padding token of every sequence (as transformers pools them)."""
        hidden = self.hidden_states(input_ids, attention_mask)
        logits = self.score(hidden)  # (B, T, labels)
        last = self._last_tokens(input_ids)
        pooled = logits[torch.arange(input_ids.shape[0], device=logits.device), last]
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = nn.functional.mse_loss(pooled.squeeze(-1).float(), labels.float())
            else:
                loss = nn.functional.cross_entropy(pooled.float(), labels)
        return SequenceClassifierOutput(logits=pooled, loss=loss)

    def _last_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.pad_token_id is None:
            if input_ids.shape[0] != 1:
                raise InvalidRequestError("batches need a pad_token_id in the config to find each last token")
            return torch.full((1,), input_ids.shape[1] - 1, device=input_ids.device)
        real = (input_ids != self.pad_token_id).int()
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return (positions * real).argmax(-1)


class AutoDistributedModelForSequenceClassification:
    """``AutoDistributedModelForSequenceClassification.from_pretrained(MODEL, initial_peers=[...], num_labels=2)``."""

    @staticmethod
    def from_pretrained(model, initial_peers: list[str], **kwargs) -> DistributedModelForSequenceClassification:
        return DistributedModelForSequenceClassification.from_pretrained(model, initial_peers, **kwargs)
