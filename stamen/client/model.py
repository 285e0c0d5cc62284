"""The distributed model: a torch module holding the embeddings, final norm and LM head (or a
classification head), and whatever the client trains (prompts, LoRA); the blocks run on servers of
the swarm. ``loss.backward()`` flows through the servers (``client/remote.py``)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from stamen.client.combine import RowCombiner
from stamen.client.config import ClientConfig
from stamen.client.generation import GenerationMixin
from stamen.client.remote import RemoteBlocks, Tuning
from stamen.client.session import InferenceSession, SessionTuning
from stamen.client.swarm import Swarm
from stamen.client.tuning import ClientLoRA, LoraSettings, PromptTuning, TuningMode
from stamen.models import BlockConfig, load_client_parts, load_config, open_checkpoint
from stamen.models.kernels import onednn_product
from stamen.models.llama import RMSNorm
from stamen.types import ModelName, PeerIDStr, Span, default_dht_prefix
from stamen.wire.messages import Burst

logger = logging.getLogger(__name__)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    """(B, T, vocab)"""
    loss: torch.Tensor | None = None
    """Mean next-token cross-entropy over labels that are not -100 (when labels were given)."""


class DistributedModelBase(nn.Module):
    """Embeddings, final norm and trainable prompts/LoRA on the client; every block in the swarm.
    Frozen parts have ``requires_grad=False``; prompts and LoRA weights train."""

    def __init__(self, hf_config, block_config: BlockConfig, swarm: Swarm):
        super().__init__()
        self.config, self.block_config, self.swarm = hf_config, block_config, swarm
        self.name_or_path: str | None = None
        self.embed_tokens = nn.Embedding(block_config.vocab_size, block_config.hidden_size)
        self.norm = RMSNorm(block_config.hidden_size, block_config.rms_norm_eps)
        self.remote = RemoteBlocks(swarm)
        self.prompts: PromptTuning | None = None
        self.lora: ClientLoRA | None = None

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        initial_peers: list[str],
        *,
        dht_prefix: str | None = None,
        torch_dtype: torch.dtype = torch.float32,
        wait_for_servers: bool = True,
        tuning_mode: TuningMode | None = None,
        pre_seq_len: int = 16,
        lora: LoraSettings | None = None,
        **kwargs,
    ):
        """Load the client parts of ``model`` (a local directory or hub id) and join the swarm.

        ``tuning_mode`` "ptune" adds ``pre_seq_len`` trainable prompt embeddings before the input;
        "deep_ptune" also trains prompts added at every block. ``lora`` adds a client-owned LoRA
        adapter. Other keyword arguments are ``ClientConfig`` fields (or the head's, see subclasses)."""
        model = str(model)
        head_kwargs = {k: kwargs.pop(k) for k in cls._head_kwargs if k in kwargs}
        config = ClientConfig(initial_peers=list(initial_peers), dht_prefix=dht_prefix, **kwargs)
        hf_config = load_config(model)
        block_config = BlockConfig.from_hf(hf_config)
        checkpoint = open_checkpoint(model)
        parts = cls._read_parts(checkpoint, block_config)
        swarm = Swarm(ModelName(config.dht_prefix or default_dht_prefix(model)), block_config.num_blocks, config)
        try:
            self = cls(hf_config, block_config, swarm, **cls._init_kwargs(model, hf_config, head_kwargs))
            self.name_or_path = model
            with torch.no_grad():
                self.embed_tokens.weight.copy_(parts.embed_tokens)
                self.norm.weight.copy_(parts.norm)
                self._load_head(parts, checkpoint)
            self.to(torch_dtype).requires_grad_(False)
            if cls._trainable_head is not None:
                getattr(self, cls._trainable_head).requires_grad_(True)
            if tuning_mode is not None:
                self.prompts = PromptTuning(block_config, tuning_mode, pre_seq_len).to(torch_dtype)
            if lora is not None:
                self.add_lora(lora)
            if wait_for_servers:
                swarm.wait_until_ready()
        except BaseException:  # the swarm's DHT process and daemon must not outlive a failed load
            swarm.shutdown()
            raise
        return self

    _head_kwargs: tuple[str, ...] = ()
    _trainable_head: str | None = None
    """A head module that trains (a classification head); the rest of the client parts stay frozen."""
    """Keyword arguments of ``from_pretrained`` that configure the head (subclasses)."""

    @classmethod
    def _read_parts(cls, checkpoint, block_config: BlockConfig):
        return load_client_parts(checkpoint, block_config)

    @classmethod
    def _init_kwargs(cls, model: str, hf_config, head_kwargs: dict) -> dict:
        return head_kwargs

    def _load_head(self, parts, checkpoint) -> None:
        pass

    # --- what transformers users expect of a model ---

    main_input_name = "input_ids"
    """The argument that carries the model's input (as transformers' ``PreTrainedModel`` says)."""

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the client parts (embeddings, norm, head) are, and so where inputs go; the blocks are
        on the servers."""
        return self.embed_tokens.weight.device

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embeddings (loaded from the checkpoint, on the client)."""
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module | None:
        """The LM head; None for a model without one (as in transformers)."""
        return None

    @classmethod
    def can_generate(cls) -> bool:
        """Whether ``generate`` works (what transformers' pipelines ask): only causal LMs."""
        return False

    # --- what the client trains ---

    def add_lora(self, settings: LoraSettings | None = None, **kwargs) -> ClientLoRA:
        """Add a client-owned LoRA adapter (``LoraSettings`` or its fields as keyword arguments)."""
        settings = settings or LoraSettings(**kwargs)
        self.lora = ClientLoRA(self.block_config, settings).to(self.dtype)
        return self.lora

    def save_adapter(self, path: str | os.PathLike) -> None:
        """Save the LoRA adapter in peft's format (loadable with ``PeftModel.from_pretrained``)."""
        if self.lora is None:
            raise ValueError("this model has no LoRA adapter")
        self.lora.save(path, base_model=self.name_or_path, task_type=self._peft_task_type)

    def load_adapter(self, path: str | os.PathLike, fa: bool = False) -> ClientLoRA:
        """Load a peft LoRA adapter directory (replacing any adapter this model has)."""
        self.lora = ClientLoRA.load(path, self.block_config, fa=fa).to(self.dtype)
        return self.lora

    def save_prompts(self, path: str | os.PathLike) -> None:
        """Save the trained prompts (and deep prompts) in one safetensors file."""
        if self.prompts is None:
            raise ValueError("this model has no prompts (tuning_mode is None)")
        self.prompts.save(path)

    def load_prompts(self, path: str | os.PathLike) -> PromptTuning:
        mode, tensors = PromptTuning.read(path)
        prompts = PromptTuning(self.block_config, mode, tensors["prompt_embeddings"].shape[0])
        with torch.no_grad():
            prompts.prompt_embeddings.copy_(tensors["prompt_embeddings"])
            if prompts.deep_prompts is not None:
                prompts.deep_prompts.copy_(tensors["deep_prompts"])
        self.prompts = prompts.to(self.dtype)
        return self.prompts

    _peft_task_type = "CAUSAL_LM"

    # --- forward through the swarm ---

    def hidden_states(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None,
                      inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised outputs of the last block (B, T, H) for the input tokens (prompt positions dropped)."""
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        prefix = 0
        deep = None
        if self.prompts is not None:
            prefix = self.prompts.pre_seq_len
            B = embeds.shape[0]
            embeds = torch.cat([self.prompts.prompt_embeddings.expand(B, -1, -1).to(embeds.dtype), embeds], dim=1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask.new_ones(B, prefix), attention_mask], dim=1)
            if position_ids is not None:
                head = torch.arange(prefix, device=position_ids.device).expand(B, prefix)
                position_ids = torch.cat([head, position_ids + prefix], dim=1)
            deep = self.prompts.deep_prompts
        hidden = self.remote(embeds, attention_mask, position_ids, deep, self.lora)
        return self.norm(hidden[:, prefix:])

    def run_blocks(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Stateless forward through every block (with this model's deep prompts and LoRA, no prompt
        prefix); a failed server's blocks are re-run on another route."""
        deep = self.prompts.deep_prompts if self.prompts is not None else None
        return self.remote(hidden, attention_mask, position_ids, deep, self.lora)

    def _session_tuning(self) -> SessionTuning | None:
        tuning = Tuning(self.prompts.deep_prompts if self.prompts is not None else None, self.lora)
        prefix = self.prompts.prompt_embeddings.detach() if self.prompts is not None else None
        if not tuning.active and prefix is None:
            return None
        uploader = self.remote.uploader

        async def prepare(peer_id: PeerIDStr, blocks: Span):
            await uploader.ensure(peer_id, tuning.adapters_for(blocks))
            return tuning.prompts_for(blocks), tuning.adapter_for(blocks)

        return SessionTuning(prefix=prefix, prepare=prepare)

    def shutdown(self) -> None:
        self.swarm.shutdown()


TRANSPOSED_HEAD_MIN_BYTES = 32 << 20
"""LM heads at least this large use a transposed copy when decoding on CPU (``decode_logits``)."""
MAX_HEAD_CHUNKS = 16
"""At most this many column chunks (one per torch thread) of the transposed head."""


def chunked_transpose(weight: torch.Tensor, chunks: int) -> torch.Tensor:
    """``weight`` (out, in) as ``chunks`` contiguous column chunks of its transpose: (chunks, in,
    ceil(out / chunks)); the last chunk is padded with zero columns."""
    out_features, in_features = weight.shape
    width = -(-out_features // chunks)
    padded = weight.new_zeros(chunks * width, in_features)
    padded[:out_features] = weight
    return padded.view(chunks, width, in_features).transpose(1, 2).contiguous()


def chunked_matmul(x: torch.Tensor, chunked: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x`` (B, in) times the weight that ``chunked_transpose`` cut: (B, out_features)."""
    chunks, _, width = chunked.shape
    if chunks == 1:
        return (x @ chunked[0])[:, :out_features]
    out = torch.bmm(x.expand(chunks, *x.shape), chunked)  # (chunks, B, width): a chunk per thread
    return out.transpose(0, 1).reshape(x.shape[0], chunks * width)[:, :out_features]


class DistributedModelForCausalLM(GenerationMixin, DistributedModelBase):
    """A Llama-family causal LM whose blocks live in the swarm."""

    def __init__(self, hf_config, block_config: BlockConfig, swarm: Swarm, generation_config=None):
        super().__init__(hf_config, block_config, swarm)
        if generation_config is None:
            from transformers import GenerationConfig

            generation_config = GenerationConfig.from_model_config(hf_config)
        self.generation_config = generation_config
        self.lm_head = nn.Linear(block_config.hidden_size, block_config.vocab_size, bias=False)
        self._transposed_head: tuple[tuple, torch.Tensor] | None = None
        """(weight's identity and version, thread chunks; the weight transposed in chunks): see ``decode_logits``."""
        self._head_rows = RowCombiner()
        self._active = threading.local()
        """The session of ``inference_session`` per thread: concurrent threads generate in their own sessions."""

    @classmethod
    def _init_kwargs(cls, model: str, hf_config, head_kwargs: dict) -> dict:
        return dict(generation_config=_load_generation_config(model, hf_config))

    def get_output_embeddings(self) -> nn.Linear:
        """The LM head (the input embeddings' weight itself when the checkpoint ties them)."""
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def _load_head(self, parts, checkpoint) -> None:
        if self.block_config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        else:
            self.lm_head.weight.copy_(parts.lm_head)

    # --- sessions ---

    @contextlib.contextmanager
    def inference_session(self, max_length: int, batch_size: int = 1) -> Iterator[InferenceSession]:
        """Within this context, generate calls of this thread reuse one session (and the servers' caches)."""
        with InferenceSession(self.swarm, max_length, batch_size, self._session_tuning()) as session:
            previous, self._active.session = self.active_session, session
            try:
                yield session
            finally:
                self._active.session = previous

    @property
    def active_session(self) -> InferenceSession | None:
        """The session that ``generate`` calls of this thread continue (``inference_session``), if any."""
        return getattr(self._active, "session", None)

    # --- forward ---

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> CausalLMOutput:
        """Stateless forward through every remote block: logits (B, T, vocab), and the loss with labels.
        Differentiable: ``loss.backward()`` reaches prompts, LoRA weights and input embeddings."""
        logits = self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, inputs_embeds))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                               ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss)

    def step_logits(self, session: InferenceSession, input_ids: torch.Tensor, attention_mask=None,
                    position_ids=None, hypo_ids=None) -> torch.Tensor:
        """Send new tokens through the session; logits (B, vocab) of the last one."""
        session.reply_burst = None
        # a decoding step in flight and due soon is waited for by a concurrent head product: sessions join up
        decoding = input_ids.shape[1] == 1
        with self._head_rows.flying(session.first_server) if decoding else contextlib.nullcontext():
            hidden = session.step(self.embed_tokens(input_ids), attention_mask, position_ids, hypo_ids)
            logits = self.decode_logits(self.norm(hidden[:, -1]), session.reply_burst)
        session.next_burst = self._head_rows.take_burst()
        return logits

    def decode_logits(self, hidden: torch.Tensor, burst: Burst | None = None) -> torch.Tensor:
        """The LM head of a decoding step: logits (B, vocab) of normed hidden states (B, hidden).

        A large head on CPU multiplies by a transposed copy of its weight (hidden × vocab, built
        once and rebuilt if the weight or torch's thread count changes; ``burst``: the one the
        hidden states came back in, see ``client/combine.py``): there, the
        matrix-vector product streams the weight from memory, and MKL's kernel over this layout
        streams it faster. The copy is cut into one column chunk per torch thread, multiplied as one
        batched product: MKL runs a matrix-vector product on one thread whatever torch's count,
        while ``bmm`` gives each thread a chunk (docs/benchmarks.md has both speed-ups). Threads
        that decode at the same time share one product (``client/combine.py``); a product of
        several rows runs through oneDNN over the head as it is (``kernels.onednn_product``:
        8 rows of the 246M Llama's head in 9.8 ms against 13.7 ms for the chunked copy). Costs
        one more copy of the head in client memory; heads that fit in cache (under
        ``TRANSPOSED_HEAD_MIN_BYTES``), GPUs, and anything that needs gradients use the head as it is.
        """
        weight = self.lm_head.weight
        if (torch.is_grad_enabled() or weight.device.type != "cpu"
                or weight.numel() * weight.element_size() < TRANSPOSED_HEAD_MIN_BYTES):
            return self.lm_head(hidden)
        chunks = max(1, min(torch.get_num_threads(), MAX_HEAD_CHUNKS))
        key = (weight.data_ptr(), weight._version, weight.dtype, chunks)
        head = self._transposed_head
        if head is None or head[0] != key:
            head = self._transposed_head = (key, chunked_transpose(weight.detach(), chunks))
        # threads decoding at the same time (sessions of the API) share one product (``combine.py``);
        # several rows run as one oneDNN product over the head itself (``kernels.onednn_product``)
        def product(rows: torch.Tensor) -> torch.Tensor:
            out = onednn_product(rows, weight.detach())
            return chunked_matmul(rows, head[1], weight.shape[0]) if out is None else out

        return self._head_rows(hidden, product, burst)

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
