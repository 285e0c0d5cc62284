"""The distributed model: a torch module holding the embeddings, final norm and LM head; the
blocks run on servers of the swarm."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from stamen.client import loop
from stamen.client.config import ClientConfig
from stamen.client.generation import GenerationMixin
from stamen.client.retry import backoff_delay, is_retryable
from stamen.client.session import InferenceSession
from stamen.client.swarm import Swarm
from stamen.models import BlockConfig, load_client_parts, load_config, open_checkpoint
from stamen.models.llama import RMSNorm
from stamen.server.config import default_dht_prefix
from stamen.server.handler import call_forward
from stamen.types import ModelName, Span

logger = logging.getLogger(__name__)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    """(B, T, vocab)"""


class DistributedModelForCausalLM(GenerationMixin, nn.Module):
    """A Llama-family causal LM whose blocks live in the swarm."""

    def __init__(self, hf_config, block_config: BlockConfig, swarm: Swarm, generation_config=None):
        super().__init__()
        self.config, self.block_config, self.swarm = hf_config, block_config, swarm
        self.generation_config = generation_config
        self.embed_tokens = nn.Embedding(block_config.vocab_size, block_config.hidden_size)
        self.norm = RMSNorm(block_config.hidden_size, block_config.rms_norm_eps)
        self.lm_head = nn.Linear(block_config.hidden_size, block_config.vocab_size, bias=False)
        self._active_session: InferenceSession | None = None

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        initial_peers: list[str],
        *,
        dht_prefix: str | None = None,
        torch_dtype: torch.dtype = torch.float32,
        wait_for_servers: bool = True,
        **client_kwargs,
    ) -> DistributedModelForCausalLM:
        """Load the client parts of ``model`` (a local directory or hub id) and join the swarm."""
        model = str(model)
        config = ClientConfig(initial_peers=list(initial_peers), dht_prefix=dht_prefix, **client_kwargs)
        hf_config = load_config(model)
        block_config = BlockConfig.from_hf(hf_config)
        checkpoint = open_checkpoint(model)
        parts = load_client_parts(checkpoint, block_config)
        swarm = Swarm(ModelName(config.dht_prefix or default_dht_prefix(model)), block_config.num_blocks, config)
        self = cls(hf_config, block_config, swarm, _load_generation_config(model, hf_config))
        with torch.no_grad():
            self.embed_tokens.weight.copy_(parts.embed_tokens)
            self.norm.weight.copy_(parts.norm)
            if block_config.tie_word_embeddings:
                self.lm_head.weight = self.embed_tokens.weight
            else:
                self.lm_head.weight.copy_(parts.lm_head)
        self.to(torch_dtype).requires_grad_(False)
        if wait_for_servers:
            swarm.wait_until_ready()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    # --- sessions ---

    @contextlib.contextmanager
    def inference_session(self, max_length: int, batch_size: int = 1) -> Iterator[InferenceSession]:
        """Within this context, generate calls reuse one session (and the servers' caches)."""
        with InferenceSession(self.swarm, max_length, batch_size) as session:
            previous, self._active_session = self._active_session, session
            try:
                yield session
            finally:
                self._active_session = previous

    @property
    def active_session(self) -> InferenceSession | None:
        return self._active_session

    # --- forward ---

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> CausalLMOutput:
        """Stateless forward through every remote block: logits (B, T, vocab)."""
        hidden = self.embed_tokens(input_ids)
        hidden = self.run_blocks(hidden, attention_mask, position_ids)
        return CausalLMOutput(logits=self.lm_head(self.norm(hidden)))

    def run_blocks(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Stateless forward through every block; a failed server's blocks are re-run on another route."""
        config = self.swarm.config
        out, block, failures = hidden.detach(), 0, 0
        while block < self.block_config.num_blocks:
            for hop in self.swarm.forward_route(Span(block, self.block_config.num_blocks)):
                try:
                    out = loop.run(call_forward(self.swarm.p2p, self.swarm.peer(hop.peer_id), hop.blocks, out,
                                                attention_mask, position_ids, config.request_timeout))
                except Exception as e:
                    if not is_retryable(e) or failures >= config.max_retries:
                        raise
                    self.swarm.ban(hop.peer_id, f"forward over blocks {hop.blocks} failed: {e}")
                    time.sleep(backoff_delay(failures))
                    failures += 1
                    break  # find a new route from this block on
                block = hop.blocks.end
        return out.to(hidden.dtype)

    def step_logits(self, session: InferenceSession, input_ids: torch.Tensor, attention_mask=None,
                    position_ids=None, hypo_ids=None) -> torch.Tensor:
        """Send new tokens through the session; logits (B, vocab) of the last one."""
        hidden = session.step(self.embed_tokens(input_ids), attention_mask, position_ids, hypo_ids)
        return self.lm_head(self.norm(hidden[:, -1]))

    def shutdown(self) -> None:
        self.swarm.shutdown()


def _load_generation_config(model: str, hf_config):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model)
    except Exception:  # no generation_config.json: derive it from the model config
        return GenerationConfig.from_model_config(hf_config)


class AutoDistributedModelForCausalLM:
    """``AutoDistributedModelForCausalLM.from_pretrained(MODEL, initial_peers=[...])``."""

    @staticmethod
    def from_pretrained(model: str | os.PathLike, initial_peers: list[str], **kwargs) -> DistributedModelForCausalLM:
        return DistributedModelForCausalLM.from_pretrained(model, initial_peers, **kwargs)
