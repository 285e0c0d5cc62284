"""In-process checks of the fine-tuning math: our blocks with LoRA and deep prompts against transformers +
peft, the server's backward against autograd through peft, the adapter cache and the peft file format."""

from __future__ import annotations

import pytest
import torch

from stamen.client.tuning import ClientLoRA, LoraSettings, PromptTuning, lorafa_optimizer
from stamen.errors import InvalidRequestError, UnknownAdapterError
from stamen.models import BlockConfig, load_client_parts, load_config, load_span, open_checkpoint
from stamen.models.lora import adapter_hash
from stamen.rpc.inputs import SpanInputs
from stamen.server.adapters import AdapterCache
from stamen.server.backend import SpanBackend
from stamen.testing.finetune import causal_lm_loss, local_logits, local_model, peft_lora_params
from stamen.testing.models import save_random_llama
from stamen.types import Span
from stamen.wire.messages import AdapterMeta, AdapterRef

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(save_random_llama(tmp_path_factory.mktemp("ftm") / "tiny-ft", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)))
    config = BlockConfig.from_hf(load_config(path))
    checkpoint = open_checkpoint(path)
    span = load_span(checkpoint, config, Span(0, 3), torch.float32, progress=False)
    return path, config, span, load_client_parts(checkpoint, config)


def _random_lora(config: BlockConfig, seed: int, **kwargs) -> ClientLoRA:
    torch.manual_seed(seed)
    lora = ClientLoRA(config, LoraSettings(r=4, lora_alpha=8, target_modules=TARGETS, **kwargs))
    with torch.no_grad():
        for t in lora.tensors():
            t.normal_(0, 0.1)  # B nonzero too, so every gradient is informative
    return lora


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # right padding
    return ids, mask


def _ours(tiny, lora, prompts, ids, mask, backend=None):
    """Logits through our span (prompt prefix + deep prompts + LoRA), differentiable."""
    _, config, span, parts = tiny
    embeds = torch.nn.functional.embedding(ids, parts.embed_tokens)
    P = prompts.pre_seq_len if prompts else 0
    if prompts:
        embeds = torch.cat([prompts.prompt_embeddings.expand(ids.shape[0], -1, -1), embeds], dim=1)
        mask = torch.cat([mask.new_ones(ids.shape[0], P), mask], dim=1)
    adapters = [lora.block(i) for i in range(3)] if lora else None
    deep = prompts.deep_prompts if prompts else None
    hidden = span(embeds, mask, None, None, deep, adapters)[:, P:]
    rms = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)
    return (parts.norm * rms) @ parts.lm_head.T


def test_lora_and_deep_prompts_forward_match_peft(tiny):
    path, config, _, _ = tiny
    lora = _random_lora(config, 0)
    prompts = PromptTuning(config, "deep_ptune", 3)
    with torch.no_grad():
        prompts.deep_prompts.normal_(0, 0.5)
    ids, mask = _batch(config.vocab_size)
    reference = local_logits(local_model(path, lora), ids, mask, prompts)
    with torch.no_grad():
        ours = _ours(tiny, lora, prompts, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], reference[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fa", [False, True])
def test_server_backward_matches_peft_autograd(tiny, fa):
    """SpanBackend._backward (recompute + autograd.grad) equals gradients through transformers + peft."""
    path, config, span, parts = tiny
    lora = _random_lora(config, 1, fa=fa)
    prompts = PromptTuning(config, "deep_ptune", 2)
    with torch.no_grad():
        prompts.deep_prompts.normal_(0, 0.5)
    ids, mask = _batch(config.vocab_size)
    labels = ids.masked_fill(mask == 0, -100)

    peft_model = local_model(path, lora)
    embeds = peft_model.get_base_model().get_input_embeddings()(ids).detach().requires_grad_()
    local_prompts = PromptTuning(config, "deep_ptune", 2)
    local_prompts.load_state_dict(prompts.state_dict())
    loss = causal_lm_loss(local_logits(peft_model, None, mask, local_prompts, inputs_embeds=embeds), labels)
    loss.backward()

    # the same through the server's backward: run our span forward, take d loss / d output on the client
    backend = SpanBackend(span, torch.float32, torch.device("cpu"), 1024, 1024)
    for i in range(3):
        block = lora.block(i)
        backend.adapters.put(AdapterMeta(hash=lora.block_hash(i), targets=block.targets, rank=4,
                                         scaling=block.scaling), block.tensors())
    x = torch.cat([prompts.prompt_embeddings.detach().expand(2, -1, -1), embeds.detach()], dim=1)
    full_mask = torch.cat([mask.new_ones(2, 2), mask], dim=1)
    out = span(x, full_mask, None, None, prompts.deep_prompts.detach(), [lora.block(i) for i in range(3)])
    out = out.detach().requires_grad_()
    rms = out[:, 2:] * torch.rsqrt(out[:, 2:].pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)
    causal_lm_loss((parts.norm * rms) @ parts.lm_head.T, labels).backward()
    inputs = SpanInputs(x, attention_mask=full_mask, prompts=prompts.deep_prompts.detach(),
                        adapter=AdapterRef(hashes=[lora.block_hash(i) for i in range(3)]))
    grads = backend._backward(backend.checked(Span(0, 3), inputs), out.grad, not fa)
    grad_x, grad_deep, grad_lora = grads.inputs, grads.prompts, grads.adapters

    torch.testing.assert_close(grad_x[:, 2:], embeds.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_x[:, :2].sum(0), local_prompts.prompt_embeddings.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_deep, local_prompts.deep_prompts.grad, rtol=1e-4, atol=1e-6)
    reference = peft_lora_params(peft_model)
    received = iter(grad_lora)
    for i in range(3):
        for target in TARGETS:
            path_ = [k for k in reference if f"layers.{i}." in k and f".{target}.lora_" in k]
            a_key = next(k for k in path_ if "lora_A" in k)
            b_key = next(k for k in path_ if "lora_B" in k)
            if not fa:
                torch.testing.assert_close(next(received), reference[a_key].grad, rtol=1e-4, atol=1e-6)
            else:
                assert reference[a_key].grad is None
            torch.testing.assert_close(next(received), reference[b_key].grad, rtol=1e-4, atol=1e-6)
    assert next(received, None) is None
    backend.shutdown()


def test_adapter_cache_checks_hashes_and_evicts(tiny):
    _, config, _, _ = tiny
    lora = _random_lora(config, 2)
    block = lora.block(0)
    meta = AdapterMeta(hash=adapter_hash(block), targets=block.targets, rank=4, scaling=block.scaling)
    cache = AdapterCache(config, max_bytes=block.nbytes * 2, dtype=torch.float32, device="cpu")
    with pytest.raises(InvalidRequestError, match="hash mismatch"):
        cache.put(meta.model_copy(update=dict(hash="0" * 40)), block.tensors())
    with pytest.raises(InvalidRequestError, match="expected A"):
        cache.put(meta, [t.t() for t in block.tensors()])
    cache.put(meta, block.tensors())
    for i in (1, 2):  # two more adapters: the first one is evicted
        b = lora.block(i)
        cache.put(AdapterMeta(hash=adapter_hash(b), targets=b.targets, rank=4, scaling=b.scaling), b.tensors())
    assert cache.nbytes <= cache.max_bytes
    with pytest.raises(UnknownAdapterError, match=meta.hash):
        cache.get_many([meta.hash])


def test_block_hash_follows_in_place_updates(tiny):
    _, config, _, _ = tiny
    lora = _random_lora(config, 3)
    before = lora.block_hash(1)
    assert lora.block_hash(1) == before
    with torch.no_grad():
        lora.layers[1]["v_proj"].lora_B.add_(1e-3)
    assert lora.block_hash(1) != before
    assert lora.block_hash(0) == adapter_hash(lora.block(0))


def test_adapter_saved_in_peft_format_loads_in_peft(tiny, tmp_path):
    """Our saved adapter loads with PeftModel.from_pretrained and gives our logits; it also reloads into ours."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path, config, _, _ = tiny
    lora = _random_lora(config, 4)
    lora.save(tmp_path / "adapter", base_model=path)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "adapter").eval()
    ids, mask = _batch(config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(_ours(tiny, lora, None, ids, mask)[mask.bool()],
                                   peft_model(input_ids=ids, attention_mask=mask).logits[mask.bool()],
                                   rtol=1e-4, atol=1e-5)
    loaded = ClientLoRA.load(tmp_path / "adapter", config)
    for a, b in zip(loaded.tensors(), lora.tensors(), strict=True):
        assert torch.equal(a, b)


def test_prompts_file_round_trip(tiny, tmp_path):
    _, config, _, _ = tiny
    prompts = PromptTuning(config, "deep_ptune", 4)
    with torch.no_grad():
        prompts.deep_prompts.normal_()
    prompts.save(tmp_path / "prompts.safetensors")
    mode, tensors = PromptTuning.read(tmp_path / "prompts.safetensors")
    assert mode == "deep_ptune"
    assert torch.equal(tensors["deep_prompts"], prompts.deep_prompts.detach())
    assert torch.equal(tensors["prompt_embeddings"], prompts.prompt_embeddings.detach())


def test_lorafa_optimizer_steps_like_peft(tiny):
    """Our LoRA-FA optimizer (peft's, over our weights) moves B exactly as peft's create_lorafa_optimizer does."""
    from peft.optimizers import create_lorafa_optimizer

    path, config, _, _ = tiny
    lora = _random_lora(config, 5, fa=True)
    model = torch.nn.Module()
    model.lora = lora
    peft_model = local_model(path, lora)
    ours = lorafa_optimizer(model, lr=1e-2)
    theirs = create_lorafa_optimizer(peft_model, r=4, lora_alpha=8, lr=1e-2)
    pairs = list(zip(lora.tensors(), peft_lora_params(peft_model).values(), strict=True))
    for step in range(2):
        torch.manual_seed(step)
        for a, b in pairs:
            if a.requires_grad:
                a.grad = torch.randn_like(a)
                b.grad = a.grad.clone()
        ours.step()
        theirs.step()
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert not any(a.requires_grad for a in lora.tensors()[::2])  # A stays frozen
