"""``stamen bench inference``: ms/token of swarm generation vs local transformers, same model, one run."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from stamen.testing.models import PRESETS, save_random_llama
from stamen.testing.swarm import LocalSwarm
from stamen.types import Span


class _Clock:
    """A transformers-style streamer that timestamps every new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def ms_per_token(self) -> float:
        gaps = [b - a for a, b in zip(self.times[1:], self.times[2:], strict=False)]  # times[0] is the prompt
        return 1000 * statistics.mean(gaps)

    def first_token_ms(self) -> float:
        return 1000 * (self.times[1] - self.times[0])


def _even_spans(num_blocks: int, parts: int) -> list[Span]:
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return [Span(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def _load_all_blocks(model_dir: str):
    from stamen.models import BlockConfig, load_config, load_span, open_checkpoint

    config = BlockConfig.from_hf(load_config(model_dir))
    return load_span(open_checkpoint(model_dir), config, Span(0, config.num_blocks), torch.float32, progress=False)


def _local_blocks_ms(span, new_tokens: int, prompt: torch.Tensor) -> float:
    """Pure compute of every block, in-process, per decode step (our own block code, no network)."""
    from stamen.models import KVCache

    config = span.config
    cache = KVCache(config, config.num_blocks, 1, prompt.shape[1] + new_tokens + 1, torch.float32)
    hidden = torch.randn(1, prompt.shape[1], config.hidden_size)
    times = []
    with torch.inference_mode():
        span.step(hidden, cache)
        for _ in range(new_tokens):
            start = time.perf_counter()
            span.step(hidden[:, :1], cache)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.mean(times)


def run_inference_bench(model: str | None, num_servers: int, new_tokens: int, prompt_tokens: int, runs: int,
                        json_only: bool) -> dict:
    from transformers import AutoModelForCausalLM

    from stamen.client.model import AutoDistributedModelForCausalLM
    from stamen.server.config import default_dht_prefix

    def say(msg: str) -> None:
        if not json_only:
            print(msg, file=sys.stderr, flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="stamen-bench-"))
    if model is None:
        say("creating a random 246M-parameter Llama (float32) ...")
        model = str(save_random_llama(workdir / "llama-246m", PRESETS["246m"], with_tokenizer=False))
    local = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    num_blocks = local.config.num_hidden_layers
    vocab = local.config.vocab_size
    prompt = torch.randint(3, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    settings = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)

    spans = _even_spans(num_blocks, num_servers)
    say(f"starting a bootstrap peer and {num_servers} servers on 127.0.0.1: {', '.join(map(str, spans))}")
    results: dict[str, list[float]] = {"local_ms": [], "swarm_ms": [], "swarm_nopush_ms": [], "blocks_ms": [],
                                       "swarm_ttft_ms": [], "local_ttft_ms": [], "swarm_nopush_ttft_ms": []}
    all_blocks = _load_all_blocks(model)
    with LocalSwarm(log_dir=workdir / "logs") as swarm:
        swarm.start_bootstrap()
        for span in spans:
            swarm.add_server(model, span)
        swarm.wait_online(default_dht_prefix(model), num_blocks)
        dmodel = AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=swarm.initial_peers)
        nopush = AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=swarm.initial_peers,
                                                                 use_push=False)
        contenders = (("local", local), ("swarm", dmodel), ("swarm_nopush", nopush))
        try:
            for _, m in contenders:  # warm-up
                _timed(m, prompt, dict(settings, max_new_tokens=4))
            for i in range(runs):
                for contender, m in contenders:
                    clock = _timed(m, prompt, settings)
                    results[f"{contender}_ms"].append(clock.ms_per_token())
                    results[f"{contender}_ttft_ms"].append(clock.first_token_ms())
                results["blocks_ms"].append(_local_blocks_ms(all_blocks, new_tokens, prompt))
                say(f"run {i + 1}/{runs}: local {results['local_ms'][-1]:.1f} ms/token, "
                    f"swarm {results['swarm_ms'][-1]:.1f} (push off {results['swarm_nopush_ms'][-1]:.1f}), "
                    f"blocks alone {results['blocks_ms'][-1]:.1f} ms")
        finally:
            dmodel.shutdown()
            nopush.shutdown()
    blocks_ms = statistics.median(results["blocks_ms"])

    local_ms, swarm_ms = statistics.median(results["local_ms"]), statistics.median(results["swarm_ms"])
    nopush_ms = statistics.median(results["swarm_nopush_ms"])
    summary = {
        "model": model,
        "num_blocks": num_blocks,
        "servers": num_servers,
        "new_tokens": new_tokens,
        "prompt_tokens": prompt_tokens,
        "runs": runs,
        "torch_threads": torch.get_num_threads(),
        "local_transformers_ms_per_token": round(local_ms, 2),
        "swarm_ms_per_token": round(swarm_ms, 2),
        "swarm_over_local": round(swarm_ms / local_ms, 3),
        "swarm_over_local_median_of_runs": round(statistics.median(
            s / loc for s, loc in zip(results["swarm_ms"], results["local_ms"], strict=True)), 3),
        "swarm_push_off_ms_per_token": round(nopush_ms, 2),
        "swarm_push_off_over_local": round(nopush_ms / local_ms, 3),
        "blocks_in_process_ms_per_token": round(blocks_ms, 2),
        "swarm_over_blocks_in_process": round(swarm_ms / blocks_ms, 3),
        "local_time_to_first_token_ms": round(statistics.median(results["local_ttft_ms"]), 1),
        "swarm_time_to_first_token_ms": round(statistics.median(results["swarm_ttft_ms"]), 1),
        "raw": {k: [round(v, 2) for v in vs] for k, vs in results.items()},
    }
    if json_only:
        print(json.dumps(summary, indent=2))
    else:
        print(_table(summary))
        print(json.dumps(summary), file=sys.stderr)
    return summary


def _timed(model, prompt: torch.Tensor, settings: dict) -> _Clock:
    clock = _Clock()
    with torch.no_grad():
        model.generate(prompt, streamer=clock, **settings)
    return clock


def _table(s: dict) -> str:
    rows = [
        ("local transformers generate", s["local_transformers_ms_per_token"], 1.0),
        (f"swarm, {s['servers']} loopback servers", s["swarm_ms_per_token"], s["swarm_over_local"]),
        ("swarm, push off", s["swarm_push_off_ms_per_token"], s["swarm_push_off_over_local"]),
        ("blocks alone, in-process", s["blocks_in_process_ms_per_token"],
         s["blocks_in_process_ms_per_token"] / s["local_transformers_ms_per_token"]),
    ]
    lines = [
        f"inference: {s['num_blocks']} blocks, prompt {s['prompt_tokens']}, {s['new_tokens']} new tokens, "
        f"median of {s['runs']} runs",
        "| contender | ms/token | vs local |",
        "|---|---:|---:|",
        *(f"| {name} | {ms:.1f} | {ratio:.2f}× |" for name, ms, ratio in rows),
        f"time to first token: local {s['local_time_to_first_token_ms']} ms, "
        f"swarm {s['swarm_time_to_first_token_ms']} ms",
    ]
    return "\n".join(lines)
