"""Our block math against transformers on tiny random configs (no network)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from stamen.errors import CheckpointError, UnsupportedModelError
from stamen.models import BlockConfig, KVCache, load_client_parts, load_config, load_span, open_checkpoint
from stamen.testing.models import TRAINED_SPREAD, save_random_llama
from stamen.types import Span

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=97, **TRAINED_SPREAD)
CONFIGS = {
    "llama-mha": ("llama", dict(TINY, num_key_value_heads=4)),
    "llama-gqa": ("llama", TINY),
    "llama3-rope": ("llama", dict(TINY, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8))),
    "linear-rope": ("llama", dict(TINY, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "llama-bias": ("llama", dict(TINY, attention_bias=True, mlp_bias=True)),
    "qwen2": ("qwen2", TINY),
    "mistral-window": ("mistral", dict(TINY, sliding_window=5)),
    "tied": ("llama", dict(TINY, tie_word_embeddings=True)),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved(request, tmp_path_factory):
    model_type, overrides = CONFIGS[request.param]
    path = save_random_llama(tmp_path_factory.mktemp(request.param), overrides, model_type=model_type,
                             with_tokenizer=False)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    return path, ref


def _local_logits(path, spans, ids, attention_mask=None):
    ck = open_checkpoint(path)
    config = BlockConfig.from_hf(load_config(path))
    parts = load_client_parts(ck, config)
    models = [load_span(ck, config, s, torch.float32, progress=False) for s in spans]
    h = F.embedding(ids, parts.embed_tokens)
    for m in models:
        h = m(h, attention_mask)
    return _head(h, parts, config), models, parts, config


def _head(h, parts, config):
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)
    return (parts.norm * x) @ parts.lm_head.T


def test_full_forward_matches_transformers(saved):
    path, ref = saved
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0))
    got, *_ = _local_logits(path, [Span(0, 1), Span(1, 4)], ids)
    with torch.no_grad():
        expected = ref(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_cached_steps_match_full_forward(saved):
    path, ref = saved
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(1))
    _, models, parts, config = _local_logits(path, [Span(0, 2), Span(2, 4)], ids[:, :1])
    caches = [KVCache(config, m.span.length, 2, 24, torch.float32) for m in models]
    outs = []
    with torch.no_grad():
        for chunk in (ids[:, :6], ids[:, 6:7], ids[:, 7:15], ids[:, 15:16], ids[:, 16:]):
            h = F.embedding(chunk, parts.embed_tokens)
            for m, c in zip(models, caches, strict=False):
                h = m.step(h, c)
            outs.append(_head(h, parts, config))
        expected = ref(ids).logits
    torch.testing.assert_close(torch.cat(outs, 1), expected, atol=1e-5, rtol=1e-4)


def test_left_padded_batch_matches_transformers(saved):
    path, ref = saved
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    got, *_ = _local_logits(path, [Span(0, 4)], ids, mask)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-4)



def test_left_padded_one_token_steps_match_transformers(saved):
    """Decoding steps of one token (their own attention path) with padded keys and, for Mistral,
    a sliding window that the prompt outgrows."""
    path, ref = saved
    ids = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    _, models, parts, config = _local_logits(path, [Span(0, 4)], ids[:, :1])
    model, cache = models[0], KVCache(config, 4, 2, 16, torch.float32)
    outs = []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            chunk = slice(0, 8) if t == 0 else slice(t + 7, t + 8)
            if chunk.start >= ids.shape[1]:
                break
            h = model.step(F.embedding(ids[:, chunk], parts.embed_tokens), cache, mask[:, chunk], positions[:, chunk])
            outs.append(_head(h, parts, config))
        expected = ref(ids, attention_mask=mask, position_ids=positions).logits
    got = torch.cat(outs, 1)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-4)

def test_rollback_overwrites_the_cache(saved):
    path, ref = saved
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(3))
    _, models, parts, config = _local_logits(path, [Span(0, 4)], ids[:, :1])
    model, cache = models[0], KVCache(config, 4, 1, 16, torch.float32)
    with torch.no_grad():
        model.step(F.embedding(torch.randint(0, 97, (1, 10)), parts.embed_tokens), cache)  # junk to roll back
        cache.length = 0
        got = _head(model.step(F.embedding(ids, parts.embed_tokens), cache), parts, config)
        expected = ref(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_span_loading_reads_only_its_blocks(saved):
    path, _ = saved
    ck = open_checkpoint(path)
    config = BlockConfig.from_hf(load_config(path))
    model = load_span(ck, config, Span(1, 3), torch.float32, progress=False)
    assert [b.index for b in model.blocks] == [1, 2]
    assert sum(p.numel() for p in model.parameters()) < 3 * sum(
        p.numel() for p in load_span(ck, config, Span(0, 1), torch.float32, progress=False).parameters()
    )


def test_sharded_checkpoint(tmp_path):
    path = save_random_llama(tmp_path / "m", TINY, with_tokenizer=False)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 97, (1, 7))
    got, *_ = _local_logits(tmp_path / "sharded", [Span(0, 4)], ids)
    with torch.no_grad():
        torch.testing.assert_close(got, model(ids).logits, atol=1e-5, rtol=1e-4)


def _hf_blocks(ref, ids):
    """transformers' own input to the blocks (the embeddings) and output of all of them (the final
    norm's input)."""
    seen = {}
    handle = ref.model.norm.register_forward_pre_hook(lambda _module, args: seen.setdefault("out", args[0]))
    try:
        with torch.no_grad():
            ref(ids)
            return ref.model.embed_tokens(ids), seen["out"]
    finally:
        handle.remove()


BF16_SHARE = 0.06
"""bfloat16's error, as a share of what the four blocks change (measured: 0.020 to 0.028 on these
configs; a span missing one block is off by about 0.5 of it, an identity span by 1)."""


def test_bfloat16_span_error_is_small_next_to_what_the_blocks_change(saved):
    """The error is measured against the blocks' own contribution ‖out − in‖ (not the hidden states'
    size, which the embeddings dominate): a bfloat16 span must be within a few percent of it, while
    a span that leaves out one block, or does nothing, is not."""
    path, ref = saved
    ck = open_checkpoint(path)
    config = BlockConfig.from_hf(load_config(path))
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(5))
    h, expected = _hf_blocks(ref, ids)
    change = (expected - h).norm()

    def share(out: torch.Tensor) -> float:
        return float((out.float() - expected).norm() / change)

    m16 = load_span(ck, config, Span(0, 4), torch.bfloat16, progress=False)
    m32 = load_span(ck, config, Span(0, 4), torch.float32, progress=False)
    with torch.no_grad():
        out16 = m16(h.bfloat16())
        assert out16.dtype == torch.bfloat16
        assert share(out16) <= BF16_SHARE
        assert share(m32(h)) <= 1e-5
        # the bound has teeth: three of the four blocks, or none, fail it
        assert share(load_span(ck, config, Span(0, 3), torch.bfloat16, progress=False)(h.bfloat16())) > 3 * BF16_SHARE
        assert share(h) == pytest.approx(1.0)
        # and decoding steps over a bfloat16 cache stay as close
        cache = KVCache(config, 4, 2, 16, torch.bfloat16)
        h16 = h.bfloat16()
        steps = [m16.step(h16[:, :7], cache)] + [m16.step(h16[:, t:t + 1], cache) for t in range(7, 13)]
        assert share(torch.cat(steps, 1)) <= BF16_SHARE


def test_greedy_tokens_depend_on_rope(saved):
    """The test models' weights have a trained-like spread (``TRAINED_SPREAD``): 20 greedy tokens from
    our cached steps equal transformers', are not one token repeated, and change when RoPE is off
    (with transformers' default init they did not: a swarm that lost RoPE still passed)."""
    path, ref = saved
    ids = torch.randint(3, 97, (1, 8), generator=torch.Generator().manual_seed(6))
    expected = ref.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    _, models, parts, config = _local_logits(path, [Span(0, 4)], ids)
    model = models[0]

    def greedy() -> torch.Tensor:
        cache, out, new = KVCache(config, 4, 1, 28, torch.float32), ids, ids
        with torch.no_grad():
            for _ in range(20):
                logits = _head(model.step(F.embedding(new, parts.embed_tokens), cache), parts, config)
                new = logits[:, -1:].argmax(-1)
                out = torch.cat([out, new], 1)
        return out

    assert torch.equal(greedy(), expected)
    assert len(set(expected[0, 8:].tolist())) >= 5
    model.rotary.inv_freq.zero_()  # every position rotated by 0: no RoPE
    assert not torch.equal(greedy(), expected)



def test_cpu_float32_projections_are_input_major(saved):
    """Decoding streams the weights: float32 CPU spans keep projections input-major (the faster MKL
    GEMV layout); bfloat16 keeps the checkpoint's row-major layout, where input-major is slower."""
    path, _ = saved
    ck = open_checkpoint(path)
    config = BlockConfig.from_hf(load_config(path))
    for dtype, input_major in ((torch.float32, True), (torch.bfloat16, False)):
        block = load_span(ck, config, Span(0, 1), dtype, progress=False).blocks[0]
        for linear in (block.self_attn.qkv_proj, block.self_attn.o_proj, block.mlp.gate_up_proj,
                       block.mlp.down_proj):
            out_features, in_features = linear.weight.shape
            assert linear.weight.stride() == ((1, out_features) if input_major else (in_features, 1))

def test_unsupported_models_get_typed_errors(tmp_path):
    with pytest.raises(UnsupportedModelError):
        BlockConfig.from_hf(AutoConfig.for_model("gpt2"))
    with pytest.raises(UnsupportedModelError):
        BlockConfig.from_hf(AutoConfig.for_model("llama", rope_parameters=dict(rope_type="yarn", factor=2.0,
                                                                                rope_theta=1e4)))
    with pytest.raises(CheckpointError):
        open_checkpoint(tmp_path)  # a directory without weights


@pytest.mark.parametrize("chunks", [1, 2, 3, 5])
def test_the_chunked_transposed_head_equals_the_plain_product(chunks):
    """The decoding head's column chunks (one per torch thread), last one padded: the same logits."""
    from stamen.client.model import chunked_matmul, chunked_transpose

    torch.manual_seed(0)
    weight, x = torch.randn(1003, 64), torch.randn(3, 64)
    chunked = chunked_transpose(weight, chunks)
    assert chunked.shape == (chunks, 64, -(-1003 // chunks)) and chunked.is_contiguous()
    got = chunked_matmul(x, chunked, 1003)
    assert got.shape == (3, 1003)
    torch.testing.assert_close(got, x @ weight.t(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, x @ (weight * 1.01).t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("rows", [1, 4, 9, 32, 33])
def test_split_decoding_products_equal_the_plain_linear(threads, rows):
    """``project`` splits few-row products over input-major weights into one row block per thread
    (here 2, or 3 that does not divide 64 and falls back to 2): the same output as ``nn.Linear``."""
    from stamen.models.kernels import input_major, project

    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 48, bias=True)
    x = torch.randn(1, rows, 64)
    expected = linear(x)
    with torch.no_grad():
        linear.weight.data = input_major(linear.weight.data)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = project(linear, x)
    finally:
        torch.set_num_threads(before)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, expected * 1.01, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [2, 8, 33, 256])
@pytest.mark.parametrize("layout", ["input_major", "row_major"])
def test_onednn_products_equal_the_plain_linear(rows, layout):
    """Products of several rows run as oneDNN inner products on CPU float32 (``kernels.project``):
    the same output as ``nn.Linear`` for either weight layout; with autograd, the plain product
    (gradients reach the input)."""
    from stamen.models import kernels

    if kernels._ONEDNN_LINEAR is None:
        pytest.skip("this torch build has no oneDNN linear")
    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 48, bias=True)
    x = torch.randn(2, rows, 64)
    expected = linear(x).detach()
    if layout == "input_major":
        with torch.no_grad():
            linear.weight.data = kernels.input_major(linear.weight.data)
    with torch.inference_mode():
        got = kernels.project(linear, x)
        direct = kernels.onednn_product(x.reshape(-1, 64), linear.weight)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(direct + linear.bias, expected.reshape(-1, 48), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, expected * 1.01, atol=1e-5, rtol=1e-5)
    wanted = x.clone().requires_grad_(True)
    kernels.project(linear, wanted).sum().backward()
    torch.testing.assert_close(wanted.grad, linear.weight.detach().sum(0).expand_as(x), atol=1e-5, rtol=1e-5)
    assert kernels.onednn_product(x[0, :1], linear.weight.detach()) is None  # one row: the split product's


LEGACY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=512, max_position_embeddings=4096)


@pytest.mark.parametrize(("fields", "direct"), [
    # as transformers 5 writes them
    (dict(model_type="llama", **LEGACY), True),
    (dict(model_type="llama", **LEGACY, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                          high_freq_factor=4.0, original_max_position_embeddings=512)),
     True),
    (dict(model_type="mistral", **LEGACY, sliding_window=16), True),
    (dict(model_type="mistral", **LEGACY, sliding_window=None, head_dim=32), True),
    (dict(model_type="qwen2", **LEGACY, tie_word_embeddings=True), True),
    (dict(model_type="qwen2", **LEGACY, use_sliding_window=True, sliding_window=16, max_window_layers=1), False),
    # as older checkpoints have them: theta and scaling apart, defaults left out
    ({"model_type": "llama", **LEGACY, "rope_theta": 500000.0,
      "rope_scaling": {"type": "linear", "factor": 2.0}, "attention_bias": True}, True),
    ({"model_type": "mistral", **LEGACY, "rope_theta": 1e6}, False),  # no sliding_window: the class's 4096
    ({"model_type": "llama", **{k: v for k, v in LEGACY.items() if k != "num_key_value_heads"}, "rope_theta": 1e4},
     False),
    ({"model_type": "qwen2", **LEGACY, "rope_theta": 1e6, "use_sliding_window": True, "sliding_window": 8}, False),
], ids=lambda f: f"{f['model_type']}-{len(f)}" if isinstance(f, dict) else str(f))
def test_block_config_read_from_json_equals_transformers_reading(tmp_path, fields, direct):
    """Servers read a complete config.json directly (transformers' config classes cost 1.8 s of
    CPU to import); whatever they read, it is what transformers' AutoConfig gives."""
    import json

    from stamen.models import load_block_config
    from stamen.models.checkpoint import _plain_config

    if "rope_theta" in fields:  # hand-written, as an older checkpoint
        (tmp_path / "config.json").write_text(json.dumps(fields))
    else:
        settings = dict(fields)
        AutoConfig.for_model(settings.pop("model_type"), **settings).save_pretrained(tmp_path)
    assert (_plain_config(tmp_path) is not None) == direct
    assert load_block_config(tmp_path) == BlockConfig.from_hf(load_config(tmp_path))


def test_real_model_block_config_read_from_json_equals_transformers_reading():
    from stamen.models import load_block_config
    from stamen.models.checkpoint import _plain_config
    from stamen.models.convert import default_model_dir

    path = default_model_dir()
    assert _plain_config(path) is not None
    assert load_block_config(path) == BlockConfig.from_hf(load_config(path))


def test_a_config_json_with_a_field_of_the_wrong_type_is_a_checkpoint_error(tmp_path):
    """Read directly or not, a broken config is a typed error naming the field, not a traceback."""
    import json

    from stamen.models import load_block_config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **LEGACY, "hidden_size": "wide",
                                                      "rope_theta": 1e4}))
    with pytest.raises(CheckpointError, match="hidden_size"):
        load_block_config(tmp_path)
