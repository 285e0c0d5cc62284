"""Local references for fine-tuning, built from transformers and peft themselves (not our block code):
the parity tests and ``stamen bench train`` compare the swarm against these."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from stamen.client.tuning import ClientLoRA, PromptTuning


def local_model(model_dir: str, lora: ClientLoRA | None = None, dtype: torch.dtype = torch.float32):
    """transformers' causal LM, frozen, with a peft LoRA adapter holding ``lora``'s weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    model.requires_grad_(False)
    if lora is None:
        return model
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    s = lora.settings
    config = LoraConfig(r=s.r, lora_alpha=s.lora_alpha, target_modules=list(s.target_modules), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    result = set_peft_model_state_dict(peft_model, lora.peft_state_dict())
    if result.unexpected_keys:
        raise RuntimeError(f"peft did not take adapter tensors: {result.unexpected_keys[:3]}")
    if s.fa:
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return peft_model.eval()


def peft_lora_params(peft_model) -> dict[str, torch.nn.Parameter]:
    """peft's LoRA parameters by our peft-format key (``base_model.model.model.layers.{i}....weight``)."""
    return {name.replace(".default", ""): p for name, p in peft_model.named_parameters() if "lora_" in name}


def decoder_layers(model) -> list[torch.nn.Module]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(base.model.layers)


@contextlib.contextmanager
def deep_prompt_hooks(model, deep_prompts: torch.Tensor) -> Iterator[None]:
    """While active, layer i's input gets ``deep_prompts[i]`` (P, H) added at positions [0, P)."""

    def hook_for(prompt: torch.Tensor):
        def hook(module, args):
            hidden = args[0]
            pad = F.pad(prompt, (0, 0, 0, hidden.shape[1] - prompt.shape[0]))  # (T, H), zeros after P
            return (hidden + pad.to(hidden.dtype), *args[1:])

        return hook

    handles = [layer.register_forward_pre_hook(hook_for(deep_prompts[i]))
               for i, layer in enumerate(decoder_layers(model))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def local_logits(model, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
                 prompts: PromptTuning | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, T, vocab) of transformers with prompt tuning applied as Petals defines it."""
    embed = (model.get_base_model() if hasattr(model, "get_base_model") else model).get_input_embeddings()
    embeds = embed(input_ids) if inputs_embeds is None else inputs_embeds
    if prompts is None:
        return model(inputs_embeds=embeds, attention_mask=attention_mask).logits
    B, P = embeds.shape[0], prompts.pre_seq_len
    embeds = torch.cat([prompts.prompt_embeddings.expand(B, -1, -1), embeds], dim=1)
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)
    with contextlib.ExitStack() as stack:
        if prompts.deep_prompts is not None:
            stack.enter_context(deep_prompt_hooks(model, prompts.deep_prompts))
        logits = model(inputs_embeds=embeds, attention_mask=attention_mask).logits
    return logits[:, P:]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
