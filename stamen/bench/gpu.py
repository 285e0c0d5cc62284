"""GPU check of our block math, and decode-step timings eager vs one CUDA graph per span step.

Run on a machine with CUDA (``--device cpu --tiny`` runs the parity part and eager timings on a tiny
model, as a smoke test)::

    python3 -m stamen.bench.gpu --out gpu.json

For each model shape (a random 246M Llama, ``PRESETS["246m"]``, and a SmolLM2-135M-shaped one)
it saves a random transformers model with ``save_pretrained``, loads every block as one
:class:`~stamen.models.span.SpanModel` with ``load_span``, in float32 and bfloat16, then:

* **parity**: a prompt (B=2, T=32) then 8 single-token decode steps through our KV cache, compared
  with transformers' ``LlamaModel`` recomputing the whole sequence (the hidden state entering its
  final norm, i.e. after the last decoder layer); max abs error and relative error
  ``‖ours − ref‖ / ‖ref‖``. bf16 is compared with transformers in bf16 and with the fp32 reference.
* **decode**: one single-token step of the whole span at batch 1 and 8 and at a given context:
  eager ``SpanModel.step``; the same ``step`` captured as one CUDA graph ("graph, frozen position":
  valid only for the one position it was captured at, because ``step`` keeps the position in Python,
  see below); and :class:`StaticDecodeStep`, a graph-friendly variant with the position in a device
  tensor (valid at every position, checked against eager), captured as one CUDA graph. The torch
  profiler counts the kernels one eager step launches and their summed device time.
* **prefill**: ``SpanModel.step`` on an empty cache, B=1, 128 and 2048 tokens, against transformers'
  ``LlamaModel`` forward of the same blocks.
* **transformers generate**: ms/token of greedy ``model.generate`` (eager, dynamic cache) on the same
  model and device, the local baseline: ``(t(1 + N new) − t(1 new)) / N``.

Why the unmodified ``SpanModel.step`` cannot be one reusable graph: ``KVCache.length`` is a Python int
that the step turns into (1) the slice that receives the new keys/values
(``k_cache[:, :, offset:offset + T] = k``), (2) the length of the key slice attention reads
(``k_cache[:, :, :offset + T]``, so the attention kernels' shapes change every step) and (3) the
``torch.arange`` of the rotary positions. A captured graph bakes in all three, so it replays one
position only. :class:`StaticDecodeStep` shows the fix: position as a device tensor, ``index_copy_``
into the cache, attention over a fixed-size bucket of the cache with a mask ``key_index <= position``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM

from stamen.bench.gpu_report import table
from stamen.bench.gpu_step import (
    StaticDecodeStep,
    capture_graph,
    error_stats,
    kernel_profile,
    sync,
    time_ms,
    worst_errors,
)
from stamen.models import BlockConfig, KVCache, load_config, load_span, open_checkpoint
from stamen.testing.models import PRESETS, save_random_llama
from stamen.types import Span

MODELS: dict[str, dict[str, Any]] = {
    "llama-246m": dict(PRESETS["246m"], max_position_embeddings=4096),
    "smollm2-135m-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                               rope_theta=100000.0, max_position_embeddings=4096),
}
TINY: dict[str, dict[str, Any]] = {"tiny": dict(PRESETS["tiny"], vocab_size=512, max_position_embeddings=256)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------ the bench


class _NormInput:
    """Captures the input of transformers' final norm: the hidden state after the last decoder layer."""

    def __init__(self, hf_model: Any):
        self.value: torch.Tensor | None = None
        self._handle = hf_model.model.norm.register_forward_hook(self._hook)

    def _hook(self, module: Any, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self.value = args[0]

    def close(self) -> None:
        self._handle.remove()


def _make_model(name: str, overrides: dict[str, Any], workdir: Path) -> Path:
    return save_random_llama(workdir / name, overrides, seed=0, with_tokenizer=False)


def _load(model_dir: Path, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    """Our span over every block, and transformers' model, both on ``device`` in ``dtype``."""
    config = BlockConfig.from_hf(load_config(model_dir))
    span = load_span(open_checkpoint(model_dir), config, Span(0, config.num_blocks), dtype, device, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return span, hf


def parity(span: Any, hf: Any, hf_ref: Any | None, device: torch.device, prompt: int = 32, steps: int = 8,
           batch: int = 2) -> dict[str, Any]:
    """Prompt then ``steps`` single-token steps through our KV cache vs transformers recomputing the sequence.

    ``hf_ref`` (fp32 transformers, optional) is a higher-precision reference for a bf16 run."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, hf.config.vocab_size, (batch, prompt + steps), generator=gen).to(device)
    dtype = next(span.parameters()).dtype
    cache = KVCache(span.config, span.config.num_blocks, batch, prompt + steps, dtype, device)
    models = (("transformers", hf), ("transformers_fp32", hf_ref))
    refs = [(name, m, _NormInput(m)) for name, m in models if m is not None]
    result: dict[str, Any] = {}
    with torch.inference_mode():
        embeds = hf.model.embed_tokens(ids)
        ours = [span.step(embeds[:, :prompt], cache)]
        ours += [span.step(embeds[:, t : t + 1], cache) for t in range(prompt, prompt + steps)]
        for name, model, probe in refs:
            m_embeds = model.model.embed_tokens(ids)
            model.model(inputs_embeds=m_embeds[:, :prompt], use_cache=False)
            errs = {"prefill": error_stats(ours[0], probe.value)}
            decode = []
            for j, t in enumerate(range(prompt, prompt + steps)):
                model.model(inputs_embeds=m_embeds[:, : t + 1], use_cache=False)
                decode.append(error_stats(ours[1 + j][:, -1], probe.value[:, -1]))
            errs["decode_worst"] = worst_errors(decode)
            result[f"vs_{name}"] = errs
            probe.close()
        # control: transformers' own KV-cached decode vs its own recompute (GEMMs of other shapes round differently)
        probe = _NormInput(hf)
        out = hf.model(inputs_embeds=embeds[:, :prompt], use_cache=True)
        past, cached = out.past_key_values, []
        for t in range(prompt, prompt + steps):
            past = hf.model(inputs_embeds=embeds[:, t : t + 1], past_key_values=past, use_cache=True).past_key_values
            cached.append(probe.value[:, -1])
        recomputed = []
        for t in range(prompt, prompt + steps):
            hf.model(inputs_embeds=embeds[:, : t + 1], use_cache=False)
            recomputed.append(probe.value[:, -1])
        probe.close()
        result["transformers_cached_vs_recompute"] = worst_errors([error_stats(c, r) for c, r in zip(cached, recomputed,
                                                                                           strict=True)])
        if hf_ref is not None:  # how far transformers' own bf16 is from its fp32: the scale of bf16 error
            probe = _NormInput(hf_ref)
            hf_ref.model(inputs_embeds=hf_ref.model.embed_tokens(ids), use_cache=False)
            ref32 = probe.value
            probe.close()
            probe = _NormInput(hf)
            hf.model(inputs_embeds=embeds, use_cache=False)
            result["transformers_bf16_vs_fp32"] = error_stats(probe.value, ref32)
            probe.close()
    return result


def static_step_parity(span: Any, device: torch.device, prompt: int = 32, steps: int = 8, batch: int = 2,
                       use_graph: bool = True) -> dict[str, float]:
    """:class:`StaticDecodeStep` (replayed as a CUDA graph on CUDA) vs eager ``SpanModel.step``, same inputs."""
    dtype = next(span.parameters()).dtype
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, prompt + steps, span.config.hidden_size, generator=gen).to(device, dtype)
    bucket = 64
    eager = KVCache(span.config, span.config.num_blocks, batch, bucket, dtype, device)
    static = KVCache(span.config, span.config.num_blocks, batch, bucket, dtype, device)
    errs = []
    with torch.inference_mode():
        span.step(x[:, :prompt], eager)
        static.tensor.copy_(eager.tensor)
        expected = [span.step(x[:, t : t + 1], eager) for t in range(prompt, prompt + steps)]
        step = StaticDecodeStep(span, static, bucket)
        step.pos.fill_(prompt)
        if use_graph:
            graph, out = capture_graph(step)
        for j, t in enumerate(range(prompt, prompt + steps)):
            step.hidden.copy_(x[:, t : t + 1])
            step.pos.fill_(t)
            if use_graph:
                graph.replay()
            else:
                out = step()
            errs.append(error_stats(out, expected[j]))
    return worst_errors(errs)


def decode_speed(span: Any, device: torch.device, batch: int, context: int, reps: int, warmup: int,
                 ) -> dict[str, Any]:
    """ms of one single-token step of the whole span at ``context`` cached positions."""
    dtype = next(span.parameters()).dtype
    bucket = -(-(context + 1) // 256) * 256  # the graph-friendly step attends over a multiple of 256 positions
    cache = KVCache(span.config, span.config.num_blocks, batch, bucket, dtype, device)
    cache.tensor.normal_()
    x = torch.randn(batch, 1, span.config.hidden_size, device=device, dtype=dtype)
    result: dict[str, Any] = {"batch": batch, "context": context, "bucket": bucket}

    def eager() -> torch.Tensor:
        cache.length = context
        return span.step(x, cache)

    with torch.inference_mode():
        result["eager"] = time_ms(eager, device, reps, warmup)
        if device.type == "cuda":
            result["eager_kernels"] = kernel_profile(eager)
        if device.type == "cuda":
            try:  # a failed capture is reported, not fatal: the rest of the run still counts
                graph, _ = capture_graph(lambda: span.step(x, cache), before=lambda: setattr(cache, "length", context))
                result["graph_frozen_position"] = time_ms(graph.replay, device, reps, warmup)
                del graph
            except Exception as e:
                result["graph_frozen_position_error"] = repr(e)
            step = StaticDecodeStep(span, cache, bucket)
            step.hidden.copy_(x)
            step.pos.fill_(context)
            result["static_step_eager"] = time_ms(step, device, reps, warmup)
            try:
                graph, _ = capture_graph(step)
                result["graph_static_step"] = time_ms(graph.replay, device, reps, warmup)
                del graph
            except Exception as e:
                result["graph_static_step_error"] = repr(e)
            torch.cuda.synchronize(device)
    return result


def prefill_speed(span: Any, hf: Any, device: torch.device, tokens: int, reps: int, warmup: int,
                  ) -> dict[str, Any]:
    """ms of a B=1 prompt of ``tokens`` through every block: ours (into an empty cache) and transformers'."""
    dtype = next(span.parameters()).dtype
    cache = KVCache(span.config, span.config.num_blocks, 1, tokens, dtype, device)
    x = torch.randn(1, tokens, span.config.hidden_size, device=device, dtype=dtype)

    def ours() -> torch.Tensor:
        cache.length = 0
        return span.step(x, cache)

    with torch.inference_mode():
        return {"tokens": tokens, "ours": time_ms(ours, device, reps, warmup),
                "transformers_layers": time_ms(lambda: hf.model(inputs_embeds=x, use_cache=False), device, reps,
                                                warmup)}


def generate_speed(hf: Any, device: torch.device, batch: int, prompt: int, new_tokens: int, reps: int,
                   ) -> dict[str, Any]:
    """transformers' greedy ``generate`` ms per new token: (t(1 + N) − t(1)) / N, medians of ``reps``."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, hf.config.vocab_size, (batch, prompt), generator=gen).to(device)
    settings = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))

    def run(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **settings)
        sync(device)
        return 1000 * (time.perf_counter() - start)

    run(new_tokens + 1)  # warm-up
    short = statistics.median(run(1) for _ in range(reps))
    long = statistics.median(run(new_tokens + 1) for _ in range(reps))
    return {"batch": batch, "prompt": prompt, "new_tokens": new_tokens, "ms_per_token": (long - short) / new_tokens,
            "first_token_ms": short}


def run_bench(device: torch.device, tiny: bool, reps: int, warmup: int, say: Callable[[str], None]
              ) -> dict[str, Any]:
    models = TINY if tiny else MODELS
    report: dict[str, Any] = {
        "command": " ".join(["python3", "-m", "stamen.bench.gpu", *sys.argv[1:]]),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cuda": torch.version.cuda, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "reps": reps, "warmup": warmup, "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="stamen-gpu-bench-") as tmp:
        for name, overrides in models.items():
            _bench_model(name, overrides, Path(tmp), device, tiny, reps, warmup, report, say)
    return report


def _bench_model(name: str, overrides: dict[str, Any], workdir: Path, device: torch.device, tiny: bool, reps: int,
                 warmup: int, report: dict[str, Any], say: Callable[[str], None]) -> None:
    """Every measurement of one model shape, in float32 then bfloat16, into ``report["models"][name]``."""
    contexts = (16,) if tiny else (128, 1024)
    prefills = (16, 64) if tiny else (128, 2048)
    say(f"[{name}] saving a random model ...")
    model_dir = _make_model(name, overrides, workdir)
    entry: dict[str, Any] = {"config": overrides, "dtypes": {}}
    report["models"][name] = entry
    hf_fp32 = None
    for dtype_name, dtype in DTYPES.items():
        span, hf = _load(model_dir, dtype, device)
        params = sum(p.numel() for p in span.parameters())
        entry["span_params"] = params
        res: dict[str, Any] = {}
        entry["dtypes"][dtype_name] = res
        say(f"[{name} {dtype_name}] {span.config.num_blocks} blocks, {params / 1e6:.1f}M params: parity ...")
        res["parity"] = parity(span, hf, hf_fp32, device)
        try:
            res["static_step_parity"] = static_step_parity(span, device, use_graph=device.type == "cuda")
        except Exception as e:  # reported, not fatal
            res["static_step_parity"] = {"error": repr(e)}
        say(f"  parity {json.dumps(res['parity'])}\n  static step {json.dumps(res['static_step_parity'])}")
        res["decode"] = []
        for batch in (1, 8):
            for context in contexts:
                d = decode_speed(span, device, batch, context, reps, warmup)
                res["decode"].append(d)
                timed = (f"{k} {v['median_ms']:.3f} ms" for k, v in d.items() if isinstance(v, dict)
                         and "median_ms" in v)
                say(f"  decode B={batch} ctx={context}: {', '.join(timed)}; eager kernels {d.get('eager_kernels')}")
        res["prefill"] = []
        for tokens in prefills:
            p = prefill_speed(span, hf, device, tokens, max(5, reps // 5), warmup)
            res["prefill"].append(p)
            say(f"  prefill {tokens}: ours {p['ours']['median_ms']:.2f} ms, "
                f"transformers layers {p['transformers_layers']['median_ms']:.2f} ms")
        res["generate"] = []
        for batch in (1, 8):
            g = generate_speed(hf, device, batch, prompt=128 if not tiny else 16, new_tokens=64 if not tiny else 8,
                               reps=3)
            res["generate"].append(g)
            say(f"  transformers generate B={batch}: {g['ms_per_token']:.2f} ms/token")
        del span
        if dtype == torch.float32:
            hf_fp32 = hf
        else:
            del hf
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del hf_fp32


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny model only (a smoke test, e.g. on CPU)")
    parser.add_argument("--reps", type=int, default=50, help="timed repetitions per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed repetitions first")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available; use --device cpu --tiny for a smoke test")

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    report = run_bench(device, args.tiny, args.reps, args.warmup, say)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print(table(report))


if __name__ == "__main__":
    main()
