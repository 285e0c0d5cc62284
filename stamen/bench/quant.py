"""``stamen bench quant``: quantized server weights (none / int8 / nf4) side by side, in one process.

For each quantization and model: bytes of one block's weights (measured on the loaded module, and
what the memory plan counts), the time of one block's single-token decoding step (KV cache holding
128 positions) and of a 128-token forward, and for a real model the accuracy cost: perplexity of
a local text through our own blocks (embeddings, final norm and LM head from the checkpoint, all
30 blocks quantized as a server would load them), the mean KL divergence of the next-token
distributions from the unquantized model's and how often the top-1 token agrees. The unquantized
perplexity is checked against transformers' own model. Timings alternate between the
quantizations round by round (a shared, noisy machine drifts) and report medians.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from stamen.bench.timing import say_to
from stamen.models import BlockConfig, KVCache, load_client_parts, load_config, load_span, open_checkpoint
from stamen.models.convert import default_model_dir
from stamen.models.llama import LlamaBlock, RMSNorm
from stamen.models.quant import QUANT_METHODS, bitsandbytes_ops, module_nbytes, quantize_block_
from stamen.models.span import SpanModel
from stamen.server.memory import block_bytes
from stamen.server.throughput import device_name
from stamen.testing.models import PRESETS
from stamen.types import Span

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "examples" / "data" / "swarm_notes.txt"
PREFIX = 128
"""Cached positions before the timed decoding step, and tokens of the timed forward."""


def _time_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _speeds(models: dict[str, SpanModel], rounds: int, steps: int) -> dict[str, dict[str, float]]:
    """Median and best (least disturbed by other processes) ms of one block's decoding step and
    128-token forward, the methods interleaved."""
    config = next(iter(models.values())).config
    first = next(iter(models.values())).span.start
    one = Span(first, first + 1)
    torch.manual_seed(0)
    prompt = torch.randn(1, PREFIX, config.hidden_size)
    token = torch.randn(1, 1, config.hidden_size)
    caches = {}
    with torch.inference_mode():
        for name, model in models.items():
            caches[name] = KVCache(config, 1, 1, PREFIX + 1, torch.float32)
            model.step(prompt, caches[name], blocks=one)  # fill the cache; also a warmup
        decode: dict[str, list[float]] = {name: [] for name in models}
        forward: dict[str, list[float]] = {name: [] for name in models}

        def step(name: str) -> None:
            caches[name].length = PREFIX  # roll back: every timed step decodes position 128
            models[name].step(token, caches[name], blocks=one)

        for r in range(rounds + 1):
            for name, model in models.items():
                times = [_time_ms(lambda n=name: step(n)) for _ in range(steps)]
                fwd = [_time_ms(lambda m=model: m(prompt, blocks=one)) for _ in range(3)]
                if r > 0:  # round 0 warms up
                    decode[name].extend(times)
                    forward[name].extend(fwd)
    return {name: dict(decode_ms=statistics.median(decode[name]), forward_ms=statistics.median(forward[name]),
                       decode_best_ms=min(decode[name]), forward_best_ms=min(forward[name])) for name in models}


def _perplexity(span: SpanModel, embed: torch.Tensor, norm: RMSNorm, head: torch.Tensor, ids: torch.Tensor):
    """(perplexity, log-probabilities (T-1, vocab)) of ``ids`` (1, T) through our blocks."""
    with torch.inference_mode():
        hidden = span(embed[ids])
        logits = (norm(hidden) @ head.t()).float()[0, :-1]
        logp = F.log_softmax(logits, dim=-1)
        nll = -logp.gather(1, ids[0, 1:, None]).mean()
    return float(torch.exp(nll)), logp


def _transformers_perplexity(model_dir: str, ids: torch.Tensor) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        loss = model(ids, labels=ids).loss
    return float(torch.exp(loss))


def bench_real_model(model_dir: str, text_path: Path, rounds: int, steps: int, say) -> dict:
    config = BlockConfig.from_hf(load_config(model_dir))
    checkpoint = open_checkpoint(model_dir)
    parts = load_client_parts(checkpoint, config)
    norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    norm.weight.data = parts.norm
    text = text_path.read_text()
    ids = AutoTokenizer.from_pretrained(model_dir)(text, return_tensors="pt")["input_ids"]
    say(f"{model_dir}: {config.num_blocks} blocks, text {text_path.name}: {ids.shape[1]} tokens")
    rows, spans, reference = {}, {}, None
    for method in QUANT_METHODS:
        start = time.perf_counter()
        span = load_span(checkpoint, config, Span(0, config.num_blocks), torch.float32, quant=method, progress=False)
        load_s = time.perf_counter() - start
        ppl, logp = _perplexity(span, parts.embed_tokens, norm, parts.lm_head, ids)
        row = dict(block_bytes=module_nbytes(span.blocks[0]), planned_block_bytes=block_bytes(config, torch.float32,
                                                                                                 method),
                   span_bytes=sum(module_nbytes(b) for b in span.blocks), load_s=round(load_s, 2), perplexity=ppl)
        if reference is None:
            reference = logp
            row.update(kl_vs_none=0.0, top1_agreement=1.0)
        else:
            row["kl_vs_none"] = float((reference.exp() * (reference - logp)).sum(-1).mean())
            row["top1_agreement"] = float((reference.argmax(-1) == logp.argmax(-1)).float().mean())
        say(f"  {method}: ppl {ppl:.3f}, block {row['block_bytes'] / 2**20:.2f} MiB, loaded in {load_s:.1f} s")
        rows[method] = row
        spans[method] = span
    say("  timing one block (interleaved rounds)...")
    for method, speed in _speeds(spans, rounds, steps).items():
        rows[method].update(speed)
    hf_ppl = _transformers_perplexity(model_dir, ids)
    return dict(model=Path(model_dir).name, blocks=config.num_blocks, text=text_path.name, tokens=int(ids.shape[1]),
                transformers_perplexity=hf_ppl, methods=rows)


def bench_random_246m(rounds: int, steps: int, say) -> dict:
    """Memory and speed of one block of the random 246M Llama shape (hidden 1024, intermediate 2816,
    16/4 heads): a freshly initialised block, quantized in memory (accuracy is meaningless on random weights)."""
    config = BlockConfig.from_hf(AutoConfig.for_model("llama", **PRESETS["246m"]))
    torch.manual_seed(0)
    base = LlamaBlock(config, 0)
    for p in base.parameters():
        if p.ndim == 2:
            torch.nn.init.normal_(p, std=0.02)
    base.eval().requires_grad_(False)
    say("random 246M shape: one block")
    rows, spans = {}, {}
    for method in QUANT_METHODS:
        span = SpanModel(config, Span(0, 1)).eval().requires_grad_(False)
        block = LlamaBlock(config, 0).eval().requires_grad_(False)
        block.load_state_dict(base.state_dict())
        span.blocks[0] = quantize_block_(block, method)
        spans[method] = span
        rows[method] = dict(block_bytes=module_nbytes(block), planned_block_bytes=block_bytes(config, torch.float32,
                                                                                                method))
    for method, speed in _speeds(spans, rounds, steps).items():
        rows[method].update(speed)
    return dict(model="random-246m (one block)", blocks=config.num_blocks, methods=rows)


def run_quant_bench(model: str | None, text: Path | None, random_246m: bool, rounds: int, steps: int,
                    json_path: Path | None, json_only: bool, threads: int | None = None) -> dict:
    say = say_to(json_only)

    if threads is not None:
        torch.set_num_threads(threads)
    if model is None:
        model = str(default_model_dir())
    results = [bench_real_model(model, text or DEFAULT_TEXT, rounds, steps, say)]
    if random_246m:
        results.append(bench_random_246m(rounds, steps, say))
    summary = dict(
        device=device_name("cpu"), torch=torch.__version__, torch_threads=torch.get_num_threads(),
        bitsandbytes=_bnb_version(), rounds=rounds, decode_steps_per_round=steps, dtype="float32",
        results=results,
    )
    if json_path is not None:
        json_path.write_text(json.dumps(summary, indent=2))
    if json_only:
        print(json.dumps(summary, indent=2))
    else:
        print(format_table(summary))
    return summary


def _bnb_version() -> str | None:
    if bitsandbytes_ops() is None:
        return None
    import bitsandbytes  # only where bitsandbytes_ops() found it usable

    return bitsandbytes.__version__


def format_table(s: dict) -> str:
    lines = [f"{s['device']}, torch {s['torch']} ({s['torch_threads']} threads), bitsandbytes {s['bitsandbytes']}, "
             f"compute dtype {s['dtype']}; medians over {s['rounds']} interleaved rounds, fastest run in brackets", ""]
    for r in s["results"]:
        accuracy = "perplexity" in next(iter(r["methods"].values()))
        title = f"**{r['model']}**"
        if accuracy:
            title += (f": perplexity of {r['text']} ({r['tokens']} tokens) through our blocks "
                      f"(transformers fp32: {r['transformers_perplexity']:.3f})")
        lines += [title, ""]
        head = "| quant | weights / block | vs fp32 | decode step / block (best) | 128-token forward / block (best) |"
        rule = "|---|---:|---:|---:|---:|"
        if accuracy:
            head += " perplexity | Δ perplexity | KL vs none (nats/token) | top-1 agrees |"
            rule += "---:|---:|---:|---:|"
        lines += [head, rule]
        base = r["methods"]["none"]
        for method, m in r["methods"].items():
            row = (f"| {method} | {m['block_bytes'] / 2**20:.2f} MiB | {m['block_bytes'] / base['block_bytes']:.2f}× | "
                   f"{m['decode_ms']:.2f} ms ({m['decode_best_ms']:.2f}) | {m['forward_ms']:.1f} ms "
                   f"({m['forward_best_ms']:.1f}) |")
            if accuracy:
                row += (f" {m['perplexity']:.3f} | {100 * (m['perplexity'] / base['perplexity'] - 1):+.2f} % | "
                        f"{m['kl_vs_none']:.4f} | {100 * m['top1_agreement']:.1f} % |")
            lines.append(row)
        lines.append("")
    return "\n".join(lines)
