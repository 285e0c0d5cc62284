"""``stamen bench concurrency``: many users at once, with servers batching their steps and without.

One random Llama (the 246M preset by default) split over 3 loopback servers. For each mode
(``batching``: servers as by default; ``no batching``: every server started with
``--no-batching``; both swarms run side by side, idle while the other is measured, and each case
alternates between them ``runs`` times, medians reported): greedy generations of ``new_tokens`` tokens by 1,
2, 4, 8 and 16 concurrent sessions, through the Python client (one thread and session each, one
client peer) and through ``stamen api`` (concurrent streamed completions). Reported per case:
aggregate tokens/s (all sessions' new tokens over the wall time from the first request to the last
token), p50 and p95 time per token (gaps between a session's consecutive tokens, all sessions
pooled), and the mean batch size the servers ran (session steps per batched iteration, from their
counters).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stamen.bench.harness import even_spans
from stamen.bench.timing import TokenClock, run_together, say_to
from stamen.client import loop
from stamen.client.model import AutoDistributedModelForCausalLM
from stamen.dht.records import fetch_servers
from stamen.rpc.calls import call_info
from stamen.testing.models import PRESETS, save_random_llama
from stamen.testing.swarm import LocalSwarm
from stamen.types import default_dht_prefix

MODES = {"batching": (), "no batching": ("--no-batching",)}
PROMPT_TOKENS = 16


def _visible_tokens(model_dir: str, vocab: int) -> None:
    """Give every id of the random model's vocabulary a text (the test tokenizer has 512 tokens, the
    246M preset 32000 ids): the API streams text, and ids without one would stream nothing."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if len(tokenizer) < vocab:
        tokenizer.add_tokens([f"<t{i}>" for i in range(len(tokenizer), vocab)])
        tokenizer.save_pretrained(model_dir)


def _cpu_by_role() -> dict[str, float]:
    """CPU seconds (user + system) used so far by this process and every process under it, by role:
    ``client`` (this process), ``servers``, ``daemons`` (p2pd), ``other`` (DHT processes, the API)."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        procs[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, cmd)
    me = os.getpid()
    out = {"client": 0.0, "servers": 0.0, "daemons": 0.0, "other": 0.0}
    for pid, (_, cpu, cmd) in procs.items():
        ancestor = pid
        while ancestor not in (me, 0, 1) and ancestor in procs:
            ancestor = procs[ancestor][0]
        if ancestor != me and pid != me:
            continue
        role = "client" if pid == me else "daemons" if "p2pd" in cmd else "servers" if " server " in cmd else "other"
        out[role] += cpu
    return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _python_case(model, sessions: int, new_tokens: int, vocab: int) -> tuple[float, list[float]]:
    """(aggregate tokens/s, gaps between consecutive tokens) of ``sessions`` concurrent generate calls."""
    clocks = [TokenClock() for _ in range(sessions)]
    prompts = [torch.randint(3, vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(i))
               for i in range(sessions)]
    start = [0.0]

    def job(i):
        def go():
            if i == 0:
                start[0] = time.perf_counter()
            model.generate(prompts[i], max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                           streamer=clocks[i])
        return go

    run_together([job(i) for i in range(sessions)])
    tokens = sum(len(c.times) - 1 for c in clocks)  # times[0] is the prompt
    end = max(c.times[-1] for c in clocks)
    gaps = [b - a for c in clocks for a, b in zip(c.times[1:], c.times[2:], strict=False)]
    return tokens / (end - start[0]), gaps


def _api_case(client, model_id: str, sessions: int, new_tokens: int) -> tuple[float, list[float]]:
    stamps: list[list[float]] = [[] for _ in range(sessions)]
    counts = [0] * sessions
    start = [0.0]

    def job(i):
        def go():
            if i == 0:
                start[0] = time.perf_counter()
            stream = client.completions.create(model=model_id, prompt=f"Story {i}: once upon a time",
                                               max_tokens=new_tokens, temperature=0, stream=True,
                                               stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.usage is not None:
                    counts[i] = chunk.usage.completion_tokens
                if chunk.choices and chunk.choices[0].text:
                    stamps[i].append(time.perf_counter())
            ends[i] = time.perf_counter()
        return go

    ends = [0.0] * sessions
    run_together([job(i) for i in range(sessions)])
    # a token without text of its own (a partial character) streams with the next one: the gaps
    # are between text events, most of them one token apart on the bench model
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:], strict=False)]
    return sum(counts) / (max(ends) - start[0]), gaps


def _batch_counters(swarm: LocalSwarm, model, model_id: str, num_blocks: int) -> tuple[int, int]:
    """(iterations, session steps) summed over the servers."""
    iterations = steps = 0
    for peer in fetch_servers(swarm.client_dht(), model_id, num_blocks):
        info = loop.run(call_info(model.swarm.p2p, model.swarm.peer(peer), timeout=30))
        iterations, steps = iterations + info.batch_iterations, steps + info.batch_steps
    return iterations, steps


def run_concurrency_bench(preset: str = "246m", servers: int = 3, sessions: list[int] | None = None,
                          new_tokens: int = 32, runs: int = 2, api: bool = True, json_only: bool = False,
                          device: str = "cpu", dtype: str = "float32") -> dict:
    import openai  # a dev dependency: only the API half needs it

    say = say_to(json_only)
    sessions = sessions or [1, 2, 4, 8, 16]
    workdir = Path(tempfile.mkdtemp(prefix="stamen-bench-concurrency-"))
    say(f"creating a random {preset} Llama (float32) ...")
    model_dir = str(save_random_llama(workdir / f"llama-{preset}", dict(PRESETS[preset])))
    _visible_tokens(model_dir, PRESETS[preset].get("vocab_size", 0))
    model_id = default_dht_prefix(model_dir)
    num_blocks = PRESETS[preset]["num_hidden_layers"]
    spans = even_spans(num_blocks, servers)
    placement = ("--device", device, "--dtype", dtype)
    samples: dict[str, dict[str, list[dict]]] = {mode: {} for mode in MODES}
    with contextlib.ExitStack() as stack:
        # both swarms stay up (an idle swarm costs nothing) and the cases alternate between them
        swarms, models, clients = {}, {}, {}
        for mode, extra in MODES.items():
            swarm = stack.enter_context(LocalSwarm(log_dir=workdir / f"logs-{mode.replace(' ', '-')}"))
            say(f"[{mode}] starting {servers} servers on 127.0.0.1: {', '.join(map(str, spans))}")
            swarm.start_bootstrap()
            for span in spans:
                swarm.add_server(model_dir, span, *placement, *extra)
            swarm.wait_online(model_id, num_blocks)
            model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers)
            stack.callback(model.shutdown)
            swarms[mode], models[mode] = swarm, model
            if api:
                _, url = swarm.start_api(model_dir)
                clients[mode] = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
            _python_case(model, 1, 4, model.block_config.vocab_size)  # warm-up
        for n in sessions:
            for path in ("python", "api") if api else ("python",):
                for run in range(runs):
                    for mode in (list(MODES) if run % 2 == 0 else list(MODES)[::-1]):
                        swarm, model = swarms[mode], models[mode]
                        before = _batch_counters(swarm, model, model_id, num_blocks)
                        cpu_before = _cpu_by_role()
                        if path == "python":
                            tps, gaps = _python_case(model, n, new_tokens, model.block_config.vocab_size)
                        else:
                            tps, gaps = _api_case(clients[mode], model_id, n, new_tokens)
                        cpu = {k: v - cpu_before[k] for k, v in _cpu_by_role().items()}
                        after = _batch_counters(swarm, model, model_id, num_blocks)
                        iterations, steps = after[0] - before[0], after[1] - before[1]
                        case = dict(tokens_per_s=tps, p50_ms=1000 * statistics.median(gaps) if gaps else float("nan"),
                                    p95_ms=1000 * _percentile(gaps, 0.95) if gaps else float("nan"),
                                    mean_batch=steps / iterations if iterations else None,
                                    **{f"cpu_ms_per_token_{k}": 1000 * v / (n * new_tokens) for k, v in cpu.items()})
                        samples[mode].setdefault(f"{path}/{n}", []).append(case)
                        batch = f", mean batch {case['mean_batch']:.2f}" if case["mean_batch"] else ""
                        cpu_text = ", ".join(f"{k} {1000 * v / (n * new_tokens):.1f}" for k, v in cpu.items())
                        say(f"[{mode}] {path} client, {n} sessions, run {run + 1}/{runs}: {tps:.1f} tokens/s, "
                            f"p50 {case['p50_ms']:.0f} ms, p95 {case['p95_ms']:.0f} ms per token{batch}; "
                            f"CPU ms per token: {cpu_text}")
    results = {mode: {key: _median_case(runs_of) for key, runs_of in cases.items()} for mode, cases in samples.items()}
    report = {"model": f"random {preset} Llama, {dtype} on the servers' {device}", "servers": servers,
              "new_tokens": new_tokens, "prompt_tokens": PROMPT_TOKENS, "sessions": sessions, "runs": runs,
              "results": results, "raw": samples}
    report["targets"] = _targets(report)
    if json_only:
        print(json.dumps(report, indent=2))
    else:
        print(markdown(report))
    return report


def _median_case(cases: list[dict]) -> dict:
    """Per field, the median over the runs."""
    out = {}
    for key in cases[0]:
        values = [c[key] for c in cases if c[key] is not None]
        out[key] = statistics.median(values) if values else None
    return out


def _targets(report: dict) -> dict:
    """The issue's targets, where the run measured them (Python client)."""
    on, off = report["results"]["batching"], report["results"]["no batching"]
    out = {}
    if "python/1" in on and "python/8" in on:
        out["8_sessions_over_1"] = on["python/8"]["tokens_per_s"] / on["python/1"]["tokens_per_s"]
        out["p95_8_over_p95_1"] = on["python/8"]["p95_ms"] / on["python/1"]["p95_ms"]
        out["p95_8_over_p50_1"] = on["python/8"]["p95_ms"] / on["python/1"]["p50_ms"]
    if "python/1" in on and "python/1" in off:
        out["one_session_batching_over_off_ms"] = on["python/1"]["p50_ms"] / off["python/1"]["p50_ms"]
    if "python/16" in on and "python/1" in on:
        out["16_sessions_over_1"] = on["python/16"]["tokens_per_s"] / on["python/1"]["tokens_per_s"]
    return out


def markdown(r: dict) -> str:
    lines = [f"{r['model']}, {r['servers']} loopback servers, {r['new_tokens']} new tokens per session "
             f"(prompts of {r['prompt_tokens']} tokens)", "",
             "| path | sessions | batching: tokens/s | p50 ms | p95 ms | mean batch | no batching: tokens/s | p50 ms "
             "| p95 ms | tokens/s on / off |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    on, off = r["results"]["batching"], r["results"]["no batching"]
    for key in on:
        a, b = on[key], off.get(key)
        path, n = key.split("/")
        batch = f"{a['mean_batch']:.2f}" if a["mean_batch"] else "–"
        if b is None:
            lines.append(f"| {path} | {n} | {a['tokens_per_s']:.1f} | {a['p50_ms']:.0f} | {a['p95_ms']:.0f} | {batch} "
                         "| | | | |")
            continue
        lines.append(f"| {path} | {n} | {a['tokens_per_s']:.1f} | {a['p50_ms']:.0f} | {a['p95_ms']:.0f} | {batch} "
                     f"| {b['tokens_per_s']:.1f} | {b['p50_ms']:.0f} | {b['p95_ms']:.0f} "
                     f"| {a['tokens_per_s'] / b['tokens_per_s']:.2f} |")
    t = r.get("targets", {})
    if t:
        lines += ["", "Targets (Python client): " + ", ".join(f"{k} = {v:.2f}" for k, v in t.items())]
    return "\n".join(lines)
