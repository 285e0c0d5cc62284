"""``stamen bench api``: the HTTP API against the Python client on the same swarm, side by side.

Time to first token and ms/token for one greedy stream through ``stamen api`` (official ``openai``
client, server-sent events) and through ``AutoDistributedModelForCausalLM.generate`` in this
process, alternating runs; then aggregate tokens per second with 1, 4 and 8 concurrent streams.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from stamen.bench.timing import TokenClock, run_together, say_to
from stamen.client.model import AutoDistributedModelForCausalLM
from stamen.models import BlockConfig, load_config
from stamen.models.convert import default_model_dir
from stamen.testing.swarm import LocalSwarm
from stamen.types import Span, default_dht_prefix

PROMPT = "Once upon a time, in a small village by the sea,"


def _python_run(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float, int]:
    """(time to first token ms, ms/token, tokens) for one generate call."""
    clock = TokenClock()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, streamer=clock)
    tokens = out.shape[1] - ids.shape[1]
    first = clock.times[1] - start
    per = (clock.times[-1] - clock.times[1]) / max(len(clock.times) - 2, 1)
    return first * 1000, per * 1000, tokens


def _api_run(client, model_id: str, new_tokens: int) -> tuple[float, float, int]:
    """(time to first token ms, ms/token, tokens) for one streamed completion: every token's text
    is timed when its event arrives, so per-token time spans first to last text event."""
    start = time.perf_counter()
    stamps: list[float] = []
    usage = None
    stream = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=new_tokens, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
    tokens = usage.completion_tokens if usage else len(stamps)
    per = (stamps[-1] - stamps[0]) / max(tokens - 1, 1)
    return (stamps[0] - start) * 1000, per * 1000, tokens


def _concurrent(client, model_id: str, streams: int, new_tokens: int) -> float:
    """Aggregate generated tokens per second with ``streams`` concurrent requests."""
    start = time.perf_counter()
    runs = run_together([lambda: _api_run(client, model_id, new_tokens) for _ in range(streams)])
    return sum(tokens for _, _, tokens in runs) / (time.perf_counter() - start)


def run_api_bench(new_tokens: int, runs: int, concurrency: list[int], json_only: bool) -> dict:
    import openai  # a dev dependency: only this bench needs it

    say = say_to(json_only)

    model_dir = str(default_model_dir())
    model_id = default_dht_prefix(model_dir)
    num_blocks = BlockConfig.from_hf(load_config(model_dir)).num_blocks
    third = num_blocks // 3
    spans = [Span(0, third), Span(third, 2 * third), Span(2 * third, num_blocks)]
    workdir = Path(tempfile.mkdtemp(prefix="stamen-bench-api-"))
    results: dict[str, list[float]] = {"python_ttft_ms": [], "python_ms": [], "api_ttft_ms": [], "api_ms": []}
    throughput: dict[int, float] = {}
    with LocalSwarm(log_dir=workdir / "logs") as swarm:
        say(f"starting a bootstrap peer and 3 servers of {model_id} on 127.0.0.1: {', '.join(map(str, spans))}")
        swarm.start_bootstrap()
        for span in spans:
            swarm.add_server(model_dir, span)
        swarm.wait_online(model_id, num_blocks)
        _, url = swarm.start_api(model_dir)
        say(f"stamen api at {url}")
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers)
        ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
        try:
            _python_run(model, ids, 4)  # warm-up
            _api_run(client, model_id, 4)
            for i in range(runs):
                for name, fn in (("python", lambda: _python_run(model, ids, new_tokens)),
                                 ("api", lambda: _api_run(client, model_id, new_tokens))):
                    first, per, tokens = fn()
                    results[f"{name}_ttft_ms"].append(first)
                    results[f"{name}_ms"].append(per)
                say(f"run {i + 1}/{runs}: python client {results['python_ms'][-1]:.1f} ms/token, "
                    f"API {results['api_ms'][-1]:.1f} ms/token ({tokens} tokens)")
            for streams in concurrency:
                throughput[streams] = _concurrent(client, model_id, streams, new_tokens)
                say(f"{streams} concurrent streams: {throughput[streams]:.1f} tokens/s in all")
        finally:
            model.shutdown()
    med = {k: statistics.median(v) for k, v in results.items()}
    ratios = [a / p for a, p in zip(results["api_ms"], results["python_ms"], strict=True)]
    report = {
        "model": model_id, "servers": 3, "new_tokens": new_tokens, "runs": runs,
        "python_ms_per_token": med["python_ms"], "api_ms_per_token": med["api_ms"],
        "api_over_python": med["api_ms"] / med["python_ms"], "median_run_ratio": statistics.median(ratios),
        "python_ttft_ms": med["python_ttft_ms"], "api_ttft_ms": med["api_ttft_ms"],
        "concurrent_tokens_per_s": {str(k): v for k, v in throughput.items()},
        "raw": results,
    }
    if json_only:
        print(json.dumps(report, indent=2))
    else:
        print(_markdown(report))
    return report


def _markdown(r: dict) -> str:
    lines = [
        f"API vs Python client, {r['model']} float32, 3 loopback servers, {r['new_tokens']} new tokens, "
        f"medians of {r['runs']} alternating runs",
        "",
        "| path | time to first token (ms) | ms/token |",
        "|---|---|---|",
        f"| Python client | {r['python_ttft_ms']:.0f} | {r['python_ms_per_token']:.1f} |",
        f"| HTTP API (openai client, SSE) | {r['api_ttft_ms']:.0f} | {r['api_ms_per_token']:.1f} |",
        "",
        f"API / Python per token: {r['api_over_python']:.3f} (median of per-run ratios {r['median_run_ratio']:.3f})",
        "",
        "| concurrent streams | tokens/s in all |",
        "|---|---|",
        *(f"| {k} | {v:.1f} |" for k, v in r["concurrent_tokens_per_s"].items()),
    ]
    return "\n".join(lines)
