"""Quantized server weights (``stamen.models.quant``): int8 and NF4 linears, blocks, memory,
backward, LoRA on top, and a real ``stamen server --quant int8`` serving generation.

Error bounds, and why:
- int8 (symmetric, per output row): a weight's rounding error is uniform in ±s/2 with
  s = max|w_row| / 127. For Gaussian rows of ~10³ weights max|w| ≈ 3.5σ, so the relative RMS error
  of a weight (and of a matmul with random inputs) is 3.5 / 127 / √12 ≈ 0.8 %; the bfloat16
  rounding of the matmul inputs adds a smaller error. Bound: 1.5 %.
- NF4 (16 levels, absmax per 64 weights): the NormalFloat levels are ~0.1–0.3 of the block absmax
  apart, so the relative RMS error on Gaussian weights is about ten times int8's. Bound: 12 %.
- A block compounds several matmuls (attention and SwiGLU): we bound the error relative to the
  block's own contribution ``block(x) - x`` (the residual passes through exactly); bounds 3 %
  (int8) and 35 % (nf4), with room over the compounded error for other seeds and shapes.
The errors these tests see are in docs/benchmarks.md.
"""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoConfig

from stamen.errors import QuantizationError
from stamen.models import BlockConfig, load_client_parts, load_config, load_span, open_checkpoint
from stamen.models.llama import LlamaBlock, RMSNorm, Rotary
from stamen.models.lora import BlockLoRA, target_shapes
from stamen.models.quant import (
    QuantLinear,
    _dequantize_nf4_torch,
    _quantize_nf4_torch,
    bitsandbytes_ops,
    dequantize_nf4,
    module_nbytes,
    quantize_block_,
    quantize_nf4,
)
from stamen.models.span import KVCache
from stamen.server.config import ServerConfig
from stamen.server.memory import block_bytes, plan_blocks
from stamen.testing.models import save_random_llama
from stamen.types import Span

SMALL = dict(hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=4)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _linear(out_features: int, in_features: int, bias: bool = False, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    torch.nn.init.normal_(layer.weight, std=0.02)
    return layer.requires_grad_(False)


def _block(model_type: str = "llama", seed: int = 0, **overrides) -> tuple[BlockConfig, LlamaBlock]:
    config = BlockConfig.from_hf(AutoConfig.for_model(model_type, **{"num_hidden_layers": 2, **SMALL, **overrides}))
    torch.manual_seed(seed)
    block = LlamaBlock(config, 0)
    for name, p in block.named_parameters():
        if p.ndim == 2:
            torch.nn.init.normal_(p, std=0.02)
        elif "bias" in name:
            torch.nn.init.normal_(p, std=0.02)
    return config, block.eval().requires_grad_(False)


def _run(block, config, x, offset: int = 0):
    B, T, _ = x.shape
    cos, sin = Rotary(config)(torch.arange(offset, offset + T)[None].expand(B, T), x.dtype)
    return block(x, cos, sin, None, offset, None)


@pytest.mark.parametrize("rows", [1, 4, 96])  # the int8 GEMV kernel (≤ 16 rows) and the dequantize + GEMM path
def test_int8_linear_is_close_to_float(rows):
    layer = _linear(384, 1024, bias=True)
    q = QuantLinear.from_linear(layer, "int8")
    x = torch.randn(rows, 1024)
    with torch.inference_mode():
        out, ref = q(x), layer(x)
        exact = x @ q.dequantize(torch.float32).t() + layer.bias  # the quantized weight's own product
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert rel(out, ref) < 0.015
    assert rel(out, exact) < 0.006  # only the bfloat16 rounding of the matmul inputs and outputs
    assert q.weight_q.dtype == torch.int8 and q.weight_q.shape == (384, 1024)


@pytest.mark.parametrize("rows", [1, 96])
def test_nf4_linear_is_close_to_float(rows):
    layer = _linear(384, 1024)
    q = QuantLinear.from_linear(layer, "nf4")
    x = torch.randn(3, rows, 1024)
    with torch.inference_mode():
        assert rel(q(x), layer(x)) < 0.12
    assert q.weight_q.dtype == torch.uint8 and q.weight_q.numel() == 384 * 1024 // 2
    assert q.weight_scale.numel() == 384 * 1024 // 64


@pytest.mark.parametrize("shape", [(96, 64), (33, 50), (576, 1536)])
def test_our_nf4_writes_and_reads_the_bytes_bitsandbytes_does(shape):
    if bitsandbytes_ops() is None:
        pytest.skip("bitsandbytes is not importable here")
    torch.manual_seed(1)
    w = torch.randn(shape) * 0.02
    packed, absmax = quantize_nf4(w)  # bitsandbytes
    ours_packed, ours_absmax = _quantize_nf4_torch(w)
    assert torch.equal(packed, ours_packed) and torch.equal(absmax, ours_absmax)
    assert torch.equal(dequantize_nf4(packed, absmax, shape, torch.float32),
                       _dequantize_nf4_torch(packed, absmax, shape, torch.float32))


@pytest.mark.parametrize("method,bound", [("int8", 0.03), ("nf4", 0.35)])
@pytest.mark.parametrize("tokens", [1, 24])
def test_quantized_block_is_close_to_the_float_block(method, bound, tokens):
    config, block = _block()
    quantized = quantize_block_(copy.deepcopy(block), method)
    assert isinstance(quantized.self_attn.qkv_proj, QuantLinear) and isinstance(quantized.mlp.down_proj, QuantLinear)
    x = torch.randn(2, tokens, config.hidden_size)
    with torch.inference_mode():
        ref, out = _run(block, config, x), _run(quantized, config, x)
    assert rel(out - x, ref - x) < bound


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # qwen2: q/k/v biases
@pytest.mark.parametrize("method", ["none", "int8", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_bytes_count_what_a_quantized_block_holds(model_type, method, dtype):
    config, block = _block(model_type)
    quantized = quantize_block_(copy.deepcopy(block).to(dtype), method)
    assert module_nbytes(quantized) == block_bytes(config, dtype, method)


def test_quantized_servers_fit_more_blocks():
    config, _ = _block(num_hidden_layers=64)
    plans = {m: plan_blocks(config, torch.float32, 256, 64 << 20, 0.1, "allowed", m) for m in ("none", "int8", "nf4")}
    assert plans["none"].num_blocks < plans["int8"].num_blocks < plans["nf4"].num_blocks
    assert "(nf4)" in plans["nf4"].message
    ratio = block_bytes(config, torch.float32) / block_bytes(config, torch.float32, "nf4")
    assert 6.5 < ratio < 7.5  # fp32 weights 4 bytes vs nf4's 0.5 + 4/64 per weight (norms stay fp32)


@pytest.mark.parametrize("method,bound", [("int8", 0.03), ("nf4", 0.35)])
def test_backward_through_a_quantized_block_gives_input_gradients(method, bound):
    config, block = _block()
    quantized = quantize_block_(copy.deepcopy(block), method)
    x = torch.randn(2, 16, config.hidden_size)
    grad_out = torch.randn_like(x)
    grads = []
    for b in (block, quantized):
        leaf = x.clone().requires_grad_()
        grads.append(torch.autograd.grad(_run(b, config, leaf), leaf, grad_out)[0])
    ref, got = grads
    assert torch.isfinite(got).all()
    assert rel(got - grad_out, ref - grad_out) < bound  # the residual's identity part is exact
    assert all(not p.requires_grad for p in quantized.parameters())


def _lora(config: BlockConfig, rank: int = 4, seed: int = 0) -> BlockLoRA:
    g = torch.Generator().manual_seed(seed)
    weights = {t: (torch.randn(rank, i, generator=g) * 0.05, torch.randn(o, rank, generator=g) * 0.05)
               for t, (i, o) in target_shapes(config).items()}
    return BlockLoRA(weights, scaling=2.0)


@pytest.mark.parametrize("method,bound", [("int8", 0.03), ("nf4", 0.35)])
def test_lora_trains_on_top_of_quantized_weights(method, bound):
    config, block = _block()
    quantized = quantize_block_(copy.deepcopy(block), method)
    lora = _lora(config)
    x = torch.randn(2, 12, config.hidden_size)
    grad_out = torch.randn_like(x)
    results = []
    for b in (block, quantized):
        leaf_lora, leaves = lora.leaves(train_a=True)
        leaf_x = x.clone().requires_grad_()
        out = b(leaf_x, *Rotary(config)(torch.arange(12)[None].expand(2, 12), x.dtype), None, 0, None, leaf_lora)
        with torch.no_grad():
            plain = _run(b, config, x)
        results.append((out.detach(), out.detach() - plain, torch.autograd.grad(out, [leaf_x, *leaves], grad_out)))
    (ref_out, ref_delta, ref_grads), (out, delta, grads) = results
    assert rel(out - x, ref_out - x) < bound
    assert rel(delta, ref_delta) < bound  # what the adapter adds is about the same on the quantized base
    assert len(grads) == len(ref_grads) == 1 + 2 * 7
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(g).all() and rel(g, r) < bound


def test_bad_quantization_names_are_typed_errors():
    _, block = _block()
    with pytest.raises(QuantizationError):
        quantize_block_(block, "int4")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        ServerConfig(model="m", quant="fp8")
    with pytest.raises(QuantizationError):
        quantize_block_(quantize_block_(copy.deepcopy(block), "int8"), "nf4")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_random_llama(tmp_path_factory.mktemp("quant") / "tiny-quant", TINY, seed=3)
    return str(path), BlockConfig.from_hf(load_config(path)), open_checkpoint(path)


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_load_span_quantizes_and_decoding_steps_match_the_forward(tiny, method):
    _, config, checkpoint = tiny
    model = load_span(checkpoint, config, Span(0, 4), torch.float32, quant=method, progress=False)
    assert all(isinstance(b.mlp.gate_up_proj, QuantLinear) for b in model.blocks)
    assert all(b.mlp.gate_up_proj.method == method for b in model.blocks)
    assert module_nbytes(model.blocks[0]) == block_bytes(config, torch.float32, method)
    x = torch.randn(1, 10, config.hidden_size)
    cache = KVCache(config, 4, 1, 16, torch.float32)
    with torch.inference_mode():
        full = model(x)
        prompt = model.step(x[:, :6], cache)
        steps = [model.step(x[:, i:i + 1], cache) for i in range(6, 10)]
    # the cache path computes what the forward does (up to the bfloat16 matmul inputs' rounding)
    assert rel(torch.cat([prompt, *steps], dim=1), full) < 1e-2


def _local_logits(model_dir: str, ids: torch.Tensor, quant: str) -> torch.Tensor:
    """Logits of our own blocks in-process: embeddings, the span (quantized or not), norm, head."""
    config = BlockConfig.from_hf(load_config(model_dir))
    checkpoint = open_checkpoint(model_dir)
    parts = load_client_parts(checkpoint, config)
    span = load_span(checkpoint, config, Span(0, config.num_blocks), torch.float32, quant=quant, progress=False)
    norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    norm.weight.data = parts.norm
    with torch.inference_mode():
        return norm(span(parts.embed_tokens[ids])) @ parts.lm_head.t()


@pytest.mark.swarm
def test_an_int8_server_serves_generation_close_to_the_float_model(tiny, tmp_path):
    """A real ``stamen server --quant int8`` process: forward and teacher-forced decoding logits are
    the in-process int8 model's (same code, same weights) and close to the float model's."""
    from stamen import AutoDistributedModelForCausalLM
    from stamen.dht.records import ServerState, fetch_servers
    from stamen.testing.swarm import LocalSwarm

    model_dir, config, _ = tiny
    ids = torch.randint(3, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    ref = _local_logits(model_dir, ids, "none")
    local_int8 = _local_logits(model_dir, ids, "int8")
    with LocalSwarm(log_dir=tmp_path / "logs") as swarm:
        swarm.start_bootstrap()
        swarm.add_server(model_dir, Span(0, 4), "--quant", "int8", "--torch-threads", "1", "--throughput", "10")
        swarm.wait_online("tiny-quant", 4)
        records = fetch_servers(swarm.client_dht(), "tiny-quant", 4)
        assert [r.quant for r in records.values() if r.state == ServerState.ONLINE] == ["int8"]
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers,
                                                                request_timeout=30)
        try:
            with torch.no_grad():
                forward = model(ids).logits
                with model.inference_session(max_length=16) as session:
                    steps = [model.step_logits(session, ids[:, :6])]
                    steps += [model.step_logits(session, ids[:, i:i + 1]) for i in range(6, 12)]
                generated = model.generate(ids[:, :4], max_new_tokens=6, do_sample=False, eos_token_id=None,
                                           pad_token_id=0)
        finally:
            model.shutdown()
    decoded = torch.stack(steps, dim=1)  # logits at positions 5..11
    # same weights and code as in-process: equal up to the float rounding of the decoding steps
    assert rel(forward, local_int8) < 1e-3
    assert rel(decoded, local_int8[:, 5:]) < 1e-3
    # and the quantization's cost: int8 weights move the logits by about the weights' 0.8 % error, or less
    # (the residual stream and the embeddings are exact)
    assert 0 < rel(forward, ref) < 0.02
    assert rel(decoded, ref[:, 5:]) < 0.02
    assert generated.shape == (1, 10) and torch.equal(generated[:, :4], ids[:, :4])


def test_bench_quant_reports_every_method(tiny):
    from stamen.bench.quant import DEFAULT_TEXT, bench_real_model, format_table

    result = bench_real_model(tiny[0], DEFAULT_TEXT, rounds=1, steps=2, say=lambda _: None)
    methods = result["methods"]
    assert list(methods) == ["none", "int8", "nf4"]
    assert methods["none"]["perplexity"] == pytest.approx(result["transformers_perplexity"], rel=1e-4)
    assert methods["nf4"]["block_bytes"] < methods["int8"]["block_bytes"] < methods["none"]["block_bytes"]
    assert all(m["block_bytes"] == m["planned_block_bytes"] and m["decode_ms"] > 0 for m in methods.values())
    table = format_table(dict(device="cpu", torch="x", torch_threads=2, bitsandbytes=None, rounds=1, dtype="float32",
                              results=[result]))
    assert "| int8 |" in table and "perplexity" in table
