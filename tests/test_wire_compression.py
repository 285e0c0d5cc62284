"""8-bit blockwise compression of activations: the codec's bounds and checks, and a real swarm whose
servers compress by default (``--compression blockwise8``) while clients choose per request."""

from __future__ import annotations

import math

import pytest
import torch
from hivemind.proto import runtime_pb2

from stamen.errors import InvalidRequestError
from stamen.wire.compression import (
    BLOCK_SIZE,
    compress,
    compressed_size,
    dequantize_blockwise,
    quantize_blockwise,
)
from stamen.wire.messages import OpenSession, SpanRef, decode_inference_request, encode
from stamen.wire.tensors import FLOAT_DTYPES, decode_tensor, encode_tensor

# --- the codec ---


def _block_bound(x: torch.Tensor) -> torch.Tensor:
    """Per value: half a step of the companded code, a / 254 * (2 sqrt(|x| / a) + 1 / 254) with a
    the absmax of its block, plus float32 rounding in the codec."""
    flat = x.float().reshape(-1)
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -n % BLOCK_SIZE)).view(-1, BLOCK_SIZE)
    a = blocks.abs().amax(1).repeat_interleave(BLOCK_SIZE)[:n]
    ratio = torch.where(a > 0, flat.abs() / a, 0.0)
    return a / 254 * (2 * ratio.sqrt() + 1 / 254) + a * 2**-20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 3, 1024), (3, 7, 5), (1, 1, 1), (2, 0, 64)])
def test_round_trip_error_is_within_half_a_step_per_block(dtype, shape):
    generator = torch.Generator().manual_seed(sum(shape))
    scales = torch.logspace(-3, 3, shape[-1] or 1)  # blocks of very different scales
    x = (torch.randn(shape, generator=generator) * scales).to(dtype)
    proto = encode_tensor(x, "blockwise8")
    assert proto.compression == runtime_pb2.CompressionType.BLOCKWISE_8BIT
    assert len(proto.buffer) == compressed_size(x.numel()) == 4 * math.ceil(x.numel() / BLOCK_SIZE) + x.numel()
    back = decode_tensor(proto, "h", FLOAT_DTYPES, 10**6, compressed_ok=True)
    assert back.shape == x.shape and back.dtype == dtype
    err = (back.float() - x.float()).reshape(-1).abs()
    # the codec's bound, plus rounding the result to the original dtype: half an ulp, relative, or
    # half the subnormal spacing near zero (float16's is 2^-24, within reach of random draws)
    ulp = {torch.float32: 2**-24, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    subnormal = {torch.float32: 2**-149, torch.bfloat16: 2**-133, torch.float16: 2**-24}[dtype]
    assert bool((err <= _block_bound(x) + x.float().reshape(-1).abs() * ulp * 1.01 + subnormal / 2).all())
    if x.numel() >= 64 and dtype == torch.float32:  # small values are far more precise than a/254
        a = x.abs().max()
        small = x.abs() < a / 1000
        assert bool((back - x)[small].abs().max() < a / 2000)


def test_zero_blocks_and_exact_values():
    x = torch.zeros(3, 100)
    x[1, :4] = torch.tensor([127.0**2, -127.0**2, 1.0, -4.0])  # values on the code's levels: a (c / 127)²
    scales, codes = quantize_blockwise(x)
    assert scales.shape == (math.ceil(300 / BLOCK_SIZE),) and codes.shape == (300,) and codes.dtype == torch.int8
    assert codes[100:104].tolist() == [127, -127, 1, -2]
    assert torch.allclose(dequantize_blockwise(scales, codes, x.shape, torch.float32), x, rtol=1e-6, atol=0)
    assert int(codes.abs().max()) == 127 and int(codes.min()) >= -127
    assert not bool(codes[:64].any()) and not bool(codes[256:].any())  # zero blocks stay zero


@pytest.mark.parametrize("block_size", [16, 64, 256])
def test_other_block_sizes_and_bitsandbytes_agreement(block_size):
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    x[:, ::97] *= 1000  # outlier channels, as in LLM hidden states
    scales, codes = quantize_blockwise(x, block_size)
    back = dequantize_blockwise(scales, codes, x.shape, torch.float32, block_size)
    assert (back - x).abs().max().item() <= x.abs().max().item() / 127 * (1 + 1e-5)
    bnb = pytest.importorskip("bitsandbytes")
    if block_size < 64:
        return
    q, state = bnb.functional.quantize_blockwise(x, blocksize=block_size)
    theirs = (bnb.functional.dequantize_blockwise(q, state) - x).norm().item()
    # about as accurate as bitsandbytes' dynamic 8-bit code (whose code table also travels)
    assert (back - x).norm().item() <= theirs * 1.5


def test_non_finite_tensors_go_uncompressed():
    x = torch.randn(2, 70)
    x[0, 5] = float("nan")
    assert compress(x) is None
    proto = encode_tensor(x, "blockwise8")
    assert proto.compression == runtime_pb2.CompressionType.NONE and len(proto.buffer) == x.numel() * 4
    assert compress(torch.arange(5)) is None  # not a float tensor


def _proto(x: torch.Tensor) -> runtime_pb2.Tensor:
    return encode_tensor(x, "blockwise8")


def _bad_protos():
    x = torch.randn(2, 100)
    p = _proto(x)
    short = runtime_pb2.Tensor()
    short.CopyFrom(p)
    short.buffer = p.buffer[:-1]
    long = runtime_pb2.Tensor()
    long.CopyFrom(p)
    long.buffer = p.buffer + b"\0" * 4
    bad_scale = runtime_pb2.Tensor()
    bad_scale.CopyFrom(p)
    bad_scale.buffer = torch.tensor([-1.0]).numpy().tobytes() + p.buffer[4:]
    nan_scale = runtime_pb2.Tensor()
    nan_scale.CopyFrom(p)
    nan_scale.buffer = torch.tensor([float("inf")]).numpy().tobytes() + p.buffer[4:]
    bad_code = runtime_pb2.Tensor()
    bad_code.CopyFrom(p)
    bad_code.buffer = p.buffer[:-1] + b"\x80"
    wrong_shape = runtime_pb2.Tensor()
    wrong_shape.CopyFrom(p)
    del wrong_shape.size[:]
    wrong_shape.size.extend([2, 101])
    int_dtype = runtime_pb2.Tensor()
    int_dtype.CopyFrom(p)
    int_dtype.dtype = "int64"
    return dict(short=(short, "buffer"), long=(long, "buffer"), negative_scale=(bad_scale, "scale"),
                infinite_scale=(nan_scale, "scale"), code_minus_128=(bad_code, "-128"),
                wrong_shape=(wrong_shape, "buffer"), int_dtype=(int_dtype, "dtype"))


@pytest.mark.parametrize("case", list(_bad_protos()))
def test_malformed_compressed_tensors_are_typed_errors(case):
    proto, match = _bad_protos()[case]
    with pytest.raises(InvalidRequestError, match=match):
        decode_tensor(proto, "hidden_states", FLOAT_DTYPES, 10**6, compressed_ok=True)


def test_only_activations_may_come_compressed():
    p = _proto(torch.randn(3, 64))
    with pytest.raises(InvalidRequestError, match="compression"):  # masks, ids, prompts, adapter weights
        decode_tensor(p, "attention_mask", FLOAT_DTYPES, 10**6)
    with pytest.raises(InvalidRequestError, match="exceed"):  # the element limit holds before decoding
        decode_tensor(p, "hidden_states", FLOAT_DTYPES, 100, compressed_ok=True)


def test_compression_in_messages():
    msg = OpenSession(session_id="s", blocks=SpanRef(start=0, end=1), max_length=4, batch_size=1,
                      compression="blockwise8")
    assert decode_inference_request(encode(msg)) == msg
    with pytest.raises(InvalidRequestError):
        decode_inference_request(encode(msg).replace(b"blockwise8", b"gzip"))
    plain = OpenSession(session_id="s", blocks=SpanRef(start=0, end=1), max_length=4, batch_size=1)
    assert b"compression" not in encode(plain)  # defaults are left out of the JSON


# --- a real swarm whose servers compress by default ---

HIDDEN = 160  # 2.5 blocks of 64 per token: the last block of every row is partial
LAYERS = 4


@pytest.fixture(scope="module")
def b8_swarm(tmp_path_factory):
    from stamen.testing.models import save_random_llama
    from stamen.testing.swarm import LocalSwarm
    from stamen.types import Span

    model_dir = save_random_llama(tmp_path_factory.mktemp("b8-model"), dict(
        hidden_size=HIDDEN, intermediate_size=320, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2), seed=7)
    with LocalSwarm(log_dir=tmp_path_factory.mktemp("b8-logs")) as s:
        s.start_bootstrap()
        for span in (Span(0, 2), Span(2, LAYERS)):
            s.add_server(model_dir, span, "--torch-threads", "1", "--compression", "blockwise8")
        s.wait_online(model_dir.name, LAYERS)
        s.model_dir = str(model_dir)
        yield s


@pytest.fixture(scope="module")
def b8_clients(b8_swarm):
    from stamen import AutoDistributedModelForCausalLM

    made = {}

    def get(compression):
        if compression not in made:
            made[compression] = AutoDistributedModelForCausalLM.from_pretrained(
                b8_swarm.model_dir, initial_peers=b8_swarm.initial_peers, request_timeout=30,
                compression=compression)
        return made[compression]

    yield get
    for model in made.values():
        model.shutdown()


def _ids(vocab: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def _session_logits(model, ids: torch.Tensor):
    """Logits of every position (one prefill step), then 8 decode steps; and the session's hop counters
    after the prefill and at the end."""
    with torch.no_grad(), model.inference_session(ids.shape[1] + 8) as session:
        hidden = session.step(model.embed_tokens(ids[:, :-8]))
        after_prefill = session.hop_counters()
        outs = [hidden] + [session.step(model.embed_tokens(ids[:, i:i + 1])) for i in range(ids.shape[1] - 8,
                                                                                           ids.shape[1])]
        session.settle()  # the replies that servers of the push chain still hold
        counters = session.hop_counters()
        logits = model.lm_head(model.norm(torch.cat(outs, dim=1)))
    return logits, after_prefill, counters


def test_compressed_logits_are_close_and_greedy_tokens_agree(b8_clients):
    """The client's "none" overrides the servers' blockwise8 default: exact reference. Each hop's input
    is then off by at most 1/254 of its 64-value block's absmax; after 2 hops and the final norm the
    logits stay within a few percent of their range, and wherever the reference's top-1 margin
    exceeds twice the observed error the argmax cannot change."""
    exact, b8 = b8_clients("none"), b8_clients("blockwise8")
    ids = _ids(exact.config.vocab_size, 40)
    ref, _, _ = _session_logits(exact, ids)
    got, _, _ = _session_logits(b8, ids)
    err = (got - ref).abs().max().item()
    assert 0 < err <= 0.03 * ref.abs().max().item(), err
    top2 = ref.topk(2, dim=-1).values
    sure = (top2[..., 0] - top2[..., 1]) > 2 * err
    assert bool((got.argmax(-1) == ref.argmax(-1))[sure].all())
    assert sure.float().mean() > 0.5  # the check covers most positions

    prompt = ids[:, :12]
    kw = dict(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = b8.generate(prompt, **kw)
    assert out.shape == (1, 28)
    default = b8_clients(None).generate(prompt, **kw)  # client sends uncompressed, servers reply compressed
    assert default.shape == (1, 28)


def test_byte_counters_show_the_reduction(b8_clients):
    exact, b8 = b8_clients("none"), b8_clients("blockwise8")
    ids = _ids(exact.config.vocab_size, 8 + 256)  # a 256-token prefill: tensor bytes dominate
    _, pre_f32, end_f32 = _session_logits(exact, ids)
    _, pre_b8, end_b8 = _session_logits(b8, ids)
    assert len(pre_f32) == len(pre_b8) == 2
    for f32, b8c in zip(pre_f32, pre_b8, strict=True):
        # float32 sends 4 bytes per value; blockwise8 1 + 4/64 = 1.0625: 3.76x less payload
        assert f32.bytes_sent / b8c.bytes_sent > 3.5
        assert f32.bytes_received / b8c.bytes_received > 3.5
    # decode steps: one reply per hop, at most 1.1 x hidden x 4 bytes + a fixed overhead each (hop 0
    # holds its replies of chained steps until the session settles); the client sends every step to
    # hop 0 (naming the next hop), plus a small request for the held replies, and to hop 1 only the
    # copies of pushes that did not answer in time (the first decoding step, before there is a reply
    # time to go by) and requests for held replies after a late chain
    for i, (before, after) in enumerate(zip(pre_f32, end_f32, strict=True)):
        step = after - before
        assert step.messages_received == 8 and (8 <= step.messages_sent <= 16 if i == 0 else
                                                 1 <= step.messages_sent <= 16)
        assert step.bytes_received / 8 <= 1.1 * HIDDEN * 4 + 200
        assert step.bytes_sent / step.messages_sent <= 1.1 * HIDDEN * 4 + 400
    for before, after in zip(pre_b8, end_b8, strict=True):
        step = after - before
        assert step.bytes_received / 8 <= compressed_size(HIDDEN) + 200


def test_compressed_forward_and_training(b8_swarm, b8_clients):
    exact, b8 = b8_clients("none"), b8_clients("blockwise8")
    ids = _ids(exact.config.vocab_size, 24, seed=3)
    with torch.no_grad():
        ref = exact(ids).logits
        got = b8(ids).logits  # rpc_forward, compressed both ways
    assert 0 < (got - ref).abs().max().item() <= 0.03 * ref.abs().max().item()

    hidden = torch.randn(2, 10, HIDDEN)
    b8.swarm.config.train_compression = True
    try:
        grads = {}
        for name, model in (("none", exact), ("b8", b8)):
            x = hidden.clone().requires_grad_(True)
            model.run_blocks(x).pow(2).sum().backward()
            grads[name] = x.grad
    finally:
        b8.swarm.config.train_compression = False
    rel = (grads["b8"] - grads["none"]).norm() / grads["none"].norm()
    assert 0 < rel.item() < 0.05
