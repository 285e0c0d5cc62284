"""The ``stamen`` command."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from stamen.cli.streamer import TimedTextStreamer

app = typer.Typer(help="Stamen: run large language models over a swarm of peers.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
bench_app = typer.Typer(help="Benchmarks, side by side with local baselines.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("hivemind", "asyncio", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


PeersOpt = Annotated[list[str], typer.Option("--initial-peers", help="Multiaddrs of DHT peers to join.")]


@app.command()
def dht(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free port).")] = 0,
    identity: Annotated[Path | None, typer.Option(help="Private key file: a stable peer id across restarts.")] = None,
    initial_peers: PeersOpt = [],  # noqa: B006 (typer reads the default)
) -> None:
    """Start a bootstrap DHT peer and print its multiaddrs, one per line."""
    setup_logging("WARNING")
    from stamen.server.server import start_dht

    node = start_dht(initial_peers, host, port, str(identity) if identity else None)
    for maddr in node.get_visible_maddrs():
        print(maddr, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    from stamen.server.config import parent_gone

    while not stop.wait(1.0) and not parent_gone():
        pass
    node.shutdown()


@app.command()
def server(
    model: Annotated[str, typer.Argument(help="Hugging Face model directory or hub id.")],
    initial_peers: PeersOpt = [],  # noqa: B006
    blocks: Annotated[str | None, typer.Option(help="Span to host, START:END (half-open).")] = None,
    num_blocks: Annotated[int | None, typer.Option(help="Host N blocks where the swarm needs them "
                                                        "(default: as many as fit the memory).")] = None,
    max_memory: Annotated[str | None, typer.Option(help="Memory for weights and cache, e.g. 6GiB "
                                                        "(default: what the device has free).")] = None,
    rebalance: Annotated[bool, typer.Option(help="Move to where the swarm is weakest (not with --blocks).")] = True,
    balance_period: Annotated[float, typer.Option(help="Mean seconds between rebalancing checks.")] = 120.0,
    balance_quality: Annotated[float, typer.Option(help="Move only while the bottleneck is below this "
                                                         "fraction of the mean block throughput.")] = 0.9,
    move_jitter: Annotated[float, typer.Option(help="Most seconds to wait and look again before moving.")] = 10.0,
    move_grace: Annotated[float, typer.Option(help="Seconds old-span sessions may run on after a move.")] = 120.0,
    throughput_cache: Annotated[Path | None, typer.Option(help="Compute measurement cache (JSON).")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    compression: Annotated[str, typer.Option(help="How activations this server sends travel unless a client "
                                                  "asks otherwise: none or blockwise8 (8-bit, lossy).")] = "none",
    quant: Annotated[str, typer.Option(help="Quantize the blocks' weights: none, int8 (1 byte per weight) or nf4 "
                                            "(4-bit NormalFloat, ~0.56 bytes per weight).")] = "none",
    device: Annotated[str, typer.Option(help="Torch device.")] = "cpu",
    max_cache_tokens: Annotated[int, typer.Option(help="KV cache budget in tokens (batch × length).")] = 8192,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free port).")] = 0,
    announce_maddrs: Annotated[list[str], typer.Option(help="Multiaddrs to announce instead of the listening "
                                                             "ones (NAT, a relay in front).")] = [],  # noqa: B006
    identity: Annotated[Path | None, typer.Option(help="Private key file for a stable peer id.")] = None,
    dht_prefix: Annotated[str | None, typer.Option(help="The model's name in the swarm.")] = None,
    throughput: Annotated[float | None, typer.Option(help="Override measured steps/s per block.")] = None,
    max_step_tokens: Annotated[int, typer.Option(help="Most tokens (batch × length) in one request.")] = 8192,
    session_timeout: Annotated[float, typer.Option(help="Seconds before an idle session is freed.")] = 300.0,
    record_ttl: Annotated[float, typer.Option(help="Seconds a DHT record lives.")] = 60.0,
    max_train_graphs: Annotated[int, typer.Option(help="Training graphs kept between a forward and its "
                                                       "backward at once (0: always recompute).")] = 8,
    torch_threads: Annotated[int | None, typer.Option(help="torch intra-op threads of prefills, forwards and "
                                                           "backwards.")] = None,
    decode_threads: Annotated[int | None, typer.Option(help="torch threads of decoding steps (default: measured "
                                                            "at start).")] = None,
    public_name: Annotated[str | None, typer.Option(help="A name shown by health tools.")] = None,
) -> None:
    """Serve a span of a model's blocks to the swarm."""
    setup_logging()
    from pydantic import ValidationError

    from stamen.server.config import ServerConfig
    from stamen.server.memory import parse_bytes
    from stamen.server.placement import PlacementSettings
    from stamen.server.server import Server
    from stamen.types import Span

    try:
        placement = dict(max_memory=parse_bytes(max_memory) if max_memory else None, rebalance=rebalance,
                         balance_period=balance_period, move_jitter=move_jitter, move_grace=move_grace,
                         placement=PlacementSettings(balance_quality=balance_quality),
                         **({"throughput_cache": throughput_cache} if throughput_cache else {}))
        config = ServerConfig(
            **placement,
            model=model, initial_peers=initial_peers,
            blocks=Span.parse(blocks) if blocks else None,
            num_blocks=num_blocks, dtype=dtype, quant=quant, device=device, max_cache_tokens=max_cache_tokens,
            host=host,
            port=port, announce_maddrs=announce_maddrs, identity=identity, dht_prefix=dht_prefix, throughput=throughput,
            max_step_tokens=max_step_tokens, session_timeout=session_timeout, record_ttl=record_ttl,
            max_train_graphs=max_train_graphs, compression=compression,
            torch_threads=torch_threads, decode_threads=decode_threads,
            public_name=public_name,
        )
    except (ValidationError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None
    Server(config).run()


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="Hugging Face model directory or hub id.")],
    initial_peers: PeersOpt,
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "Hello",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 32,
    do_sample: Annotated[bool, typer.Option(help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option()] = 1.0,
    top_k: Annotated[int, typer.Option()] = 50,
    top_p: Annotated[float, typer.Option()] = 1.0,
    repetition_penalty: Annotated[float, typer.Option()] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling.")] = None,
    dht_prefix: Annotated[str | None, typer.Option(help="The model's name in the swarm.")] = None,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template.")] = False,
    no_eos: Annotated[bool, typer.Option("--no-eos", help="Ignore the end-of-sequence token.")] = False,
) -> None:
    """Generate text through the swarm, streaming tokens as they arrive."""
    setup_logging("WARNING")
    import torch
    from transformers import AutoTokenizer

    from stamen.client.model import AutoDistributedModelForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model)
    dmodel = AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers, dht_prefix=dht_prefix)
    if chat and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    streamer = TimedTextStreamer(tokenizer)
    with dmodel.inference_session(max_length=ids.shape[1] + max_new_tokens) as session:
        print(f"route: {session.describe_route()}", file=sys.stderr)
        dmodel.generate(ids, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                        top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, streamer=streamer,
                        **({"eos_token_id": None} if no_eos else {}))
    print(file=sys.stdout)
    print(streamer.summary(), file=sys.stderr)
    dmodel.shutdown()


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="A .gguf file, a directory with one, or `smollm2` (packaged default).")],
    out: Annotated[Path, typer.Argument(help="Hugging Face model directory to write.")],
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    force: Annotated[bool, typer.Option(help="Convert again even if OUT holds this conversion.")] = False,
) -> None:
    """Write a Hugging Face model directory (safetensors, config, tokenizer, chat template) from GGUF."""
    setup_logging("WARNING")
    from stamen.errors import CheckpointError
    from stamen.models.config import DTYPES
    from stamen.models.convert import convert_gguf

    if dtype not in DTYPES:
        raise typer.BadParameter(f"dtype must be one of {sorted(DTYPES)}")
    try:
        convert_gguf(src, out, DTYPES[dtype], force=force)
    except CheckpointError as e:
        raise typer.BadParameter(str(e)) from None


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help="Hugging Face model directory or hub id.")],
    initial_peers: PeersOpt,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per answer.")] = 256,
    max_length: Annotated[int, typer.Option(help="Tokens the conversation's session can hold.")] = 2048,
    temperature: Annotated[float, typer.Option(help="0 means greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling.")] = None,
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    dht_prefix: Annotated[str | None, typer.Option(help="The model's name in the swarm.")] = None,
) -> None:
    """Chat in the terminal: one inference session across turns, streamed answers; Ctrl-C stops an answer."""
    setup_logging("WARNING")
    from stamen.cli.chat import run_chat

    run_chat(model, initial_peers, max_new_tokens=max_new_tokens, max_length=max_length, temperature=temperature,
             top_p=top_p, seed=seed, system=system, dht_prefix=dht_prefix)


@app.command()
def api(
    model: Annotated[str, typer.Argument(help="Hugging Face model directory or hub id.")],
    initial_peers: PeersOpt,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    model_id: Annotated[str | None, typer.Option(help="The model name clients send (default: the swarm's).")] = None,
    default_max_tokens: Annotated[int, typer.Option(help="New tokens when a request sets no limit.")] = 256,
    dht_prefix: Annotated[str | None, typer.Option(help="The model's name in the swarm.")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve an OpenAI-compatible HTTP API (chat completions, completions, models) over the swarm."""
    setup_logging("INFO")
    import uvicorn
    from transformers import AutoTokenizer

    from stamen.api.app import create_app
    from stamen.api.engine import Engine
    from stamen.client.model import AutoDistributedModelForCausalLM
    from stamen.types import default_dht_prefix

    tokenizer = AutoTokenizer.from_pretrained(model)
    dmodel = AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers, dht_prefix=dht_prefix,
                                                             wait_for_servers=False)
    engine = Engine(dmodel, tokenizer, model_id or dht_prefix or default_dht_prefix(model),
                    default_max_tokens=default_max_tokens)
    logging.getLogger(__name__).info("serving %s at http://%s:%d/v1", engine.model_id, host, port)
    try:
        uvicorn.run(create_app(engine), host=host, port=port, log_level=log_level)
    finally:
        dmodel.shutdown()


@app.command()
def health(
    model: Annotated[str, typer.Argument(help="Hugging Face model directory or hub id.")],
    initial_peers: PeersOpt,
    dht_prefix: Annotated[str | None, typer.Option(help="The model's name in the swarm.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print the swarm: servers with span, state, throughput, free cache, version; per-block coverage."""
    setup_logging("WARNING")
    from hivemind import DHT

    from stamen.dht.health import format_health, swarm_health
    from stamen.dht.records import fetch_servers
    from stamen.models import BlockConfig, load_config
    from stamen.types import default_dht_prefix

    num_blocks = BlockConfig.from_hf(load_config(model)).num_blocks
    name = dht_prefix or default_dht_prefix(model)
    node = DHT(initial_peers=initial_peers, start=True, client_mode=True)
    try:
        report = swarm_health(name, num_blocks, fetch_servers(node, name, num_blocks))
    finally:
        node.shutdown()
    print(report.model_dump_json(indent=2) if json_out else format_health(report))


@app.command()
def simulate(
    servers: Annotated[int, typer.Option(help="Virtual servers present at once.")] = 500,
    blocks: Annotated[int, typer.Option(help="Blocks of the model.")] = 80,
    hours: Annotated[float, typer.Option(help="Simulated hours.")] = 24.0,
    warmup_hours: Annotated[float, typer.Option(help="Hours left out of the means.")] = 2.0,
    churn: Annotated[float, typer.Option(help="Fraction of servers replaced per hour.")] = 0.2,
    min_throughput: Annotated[float, typer.Option(help="Slowest server (log-uniform range).")] = 1.0,
    max_throughput: Annotated[float, typer.Option(help="Fastest server.")] = 10.0,
    min_memory: Annotated[int, typer.Option(help="Fewest blocks a server can hold.")] = 4,
    max_memory: Annotated[int, typer.Option(help="Most blocks a server can hold.")] = 40,
    balance_period: Annotated[float, typer.Option(help="Mean seconds between rebalancing checks.")] = 120.0,
    balance_quality: Annotated[float, typer.Option(help="Move only below this bottleneck / mean.")] = 0.9,
    exodus_hour: Annotated[float | None, typer.Option(help="Hour at which a quarter of the model loses its "
                                                           "servers at once, unreplaced.")] = None,
    no_rebalance: Annotated[bool, typer.Option("--no-rebalance", help="Servers only choose when joining.")] = False,
    baseline: Annotated[bool, typer.Option(help="Also run the same swarm without rebalancing.")] = False,
    seed: Annotated[int, typer.Option()] = 0,
    png: Annotated[Path | None, typer.Option(help="Write the plot here.")] = Path("simulate.png"),
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the summary here.")] = Path("simulate.json"),
) -> None:
    """Simulate a swarm of virtual servers placing themselves with the real placement code."""
    from stamen.server.placement import PlacementSettings
    from stamen.sim.report import run_and_report
    from stamen.sim.simulate import SimConfig

    config = SimConfig(
        num_servers=servers, num_blocks=blocks, hours=hours, warmup_hours=warmup_hours, churn_per_hour=churn,
        min_throughput=min_throughput, max_throughput=max_throughput, min_memory_blocks=min_memory,
        max_memory_blocks=max_memory, balance_period=balance_period, exodus_hour=exodus_hour,
        rebalance=not no_rebalance, placement=PlacementSettings(balance_quality=balance_quality), seed=seed,
    )
    run_and_report(config, baseline, png, json_path)


def _bench_settings(model: str | None, preset: str, servers: int, prefix: list[int] | None, new_tokens: int | None,
                    runs: int | None, offload: bool, quick: bool):
    from stamen.bench.inference import BenchSettings

    settings = BenchSettings.quick(model, preset if preset != "246m" else "small") if quick else \
        BenchSettings(model=model, preset=preset)
    settings.servers, settings.offload = servers, offload
    if prefix:
        settings.prefixes = list(prefix)
    if new_tokens is not None:
        settings.new_tokens = new_tokens
    if runs is not None:
        settings.runs = settings.forward_runs = runs
    return settings


BenchModelOpt = Annotated[str | None, typer.Option(help="Model directory (default: a random Llama of --preset).")]
BenchPresetOpt = Annotated[str, typer.Option(help="Preset of the random model: 246m (default), small, tiny.")]
BenchServersOpt = Annotated[int, typer.Option(help="Loopback servers to split the blocks over.")]
BenchPrefixOpt = Annotated[list[int] | None, typer.Option(help="Prompt lengths to decode after (default 128 2048).")]
BenchTokensOpt = Annotated[int | None, typer.Option(help="Tokens generated per run (default 32).")]
BenchRunsOpt = Annotated[int | None, typer.Option(help="Interleaved runs per contender (default 3; medians).")]
BenchOffloadOpt = Annotated[bool, typer.Option(help="Time transformers + accelerate with layers offloaded to disk.")]
BenchQuickOpt = Annotated[bool, typer.Option(help="A smoke run: small model, short prompts, one run.")]
BenchJsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON only.")]


@bench_app.command("inference")
def bench_inference(
    model: BenchModelOpt = None,
    preset: BenchPresetOpt = "246m",
    servers: BenchServersOpt = 3,
    prefix: BenchPrefixOpt = None,
    new_tokens: BenchTokensOpt = None,
    runs: BenchRunsOpt = None,
    offload: BenchOffloadOpt = True,
    push_off: Annotated[bool, typer.Option(help="Also time a client with server-to-server push off.")] = False,
    forward: Annotated[bool, typer.Option(help="Also run the forward benchmark.")] = False,
    breakdown: Annotated[bool, typer.Option(help="Per-token breakdown of a swarm decode step.")] = True,
    quick: BenchQuickOpt = False,
    json_out: BenchJsonOpt = False,
) -> None:
    """Decoding (steps/s, ms/token, time to first token at each prefix): swarm vs local transformers,
    our blocks in-process and offloading, side by side in one run; the offloading bound; a breakdown."""
    setup_logging("WARNING")
    from stamen.bench.inference import run_inference_bench

    settings = _bench_settings(model, preset, servers, prefix, new_tokens, runs, offload, quick)
    settings.push_off = push_off
    run_inference_bench(settings, json_only=json_out, forward=forward, breakdown=breakdown)


@bench_app.command("forward")
def bench_forward(
    model: BenchModelOpt = None,
    preset: BenchPresetOpt = "246m",
    servers: BenchServersOpt = 3,
    runs: BenchRunsOpt = None,
    offload: BenchOffloadOpt = True,
    quick: BenchQuickOpt = False,
    json_out: BenchJsonOpt = False,
) -> None:
    """Forward tokens/s (no cache, the rpc_forward path) at batch 1 × 128 and 64 × 16: swarm vs local vs offload."""
    setup_logging("WARNING")
    from stamen.bench.inference import run_forward_bench

    settings = _bench_settings(model, preset, servers, None, None, runs, offload, quick)
    settings.cpu_offload = False
    run_forward_bench(settings, json_only=json_out)


@bench_app.command("suite")
def bench_suite(
    out: Annotated[Path, typer.Option(help="Directory for suite.json and suite.md.")] = Path("bench-results"),
    model: BenchModelOpt = None,
    preset: BenchPresetOpt = "246m",
    servers: BenchServersOpt = 3,
    prefix: BenchPrefixOpt = None,
    new_tokens: BenchTokensOpt = None,
    runs: BenchRunsOpt = None,
    offload: BenchOffloadOpt = True,
    train: Annotated[bool, typer.Option(help="Also run `stamen bench train` (its own swarm; minutes).")] = False,
    quick: BenchQuickOpt = False,
    json_out: BenchJsonOpt = False,
) -> None:
    """Inference + forward (+ training with --train) side by side with local runs and offloading; writes
    OUT/suite.json and OUT/suite.md."""
    setup_logging("WARNING")
    from stamen.bench.inference import run_suite

    settings = _bench_settings(model, preset, servers, prefix, new_tokens, runs, offload, quick)
    run_suite(settings, out, train=train, json_only=json_out)


@bench_app.command("train")
def bench_train(
    model: Annotated[str | None, typer.Option(help="Model directory (default: a random 246M Llama).")] = None,
    servers: Annotated[int, typer.Option(help="Loopback servers to split the blocks over.")] = 3,
    batch: Annotated[int, typer.Option(help="Sequences per step.")] = 8,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 128,
    runs: Annotated[int, typer.Option(help="Steps per contender (median reported).")] = 3,
    rank: Annotated[int, typer.Option(help="LoRA rank (all 7 target modules).")] = 8,
    pre_seq_len: Annotated[int, typer.Option(help="Deep prompt length.")] = 16,
    sub_batch_tokens: Annotated[int, typer.Option(help="Tokens per parallel sub-batch.")] = 512,
    server_threads: Annotated[int | None, typer.Option(help="torch threads per server (default: torch's).")] = None,
    skip_memory: Annotated[bool, typer.Option(help="Skip the client memory probes.")] = False,
    stateless: Annotated[bool, typer.Option(help="Also time a client with train_streams=False (servers "
                                                 "recompute forwards in backward).")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Training tokens/s (forward + backward) through the swarm vs locally, deep_ptune and LoRA; client memory."""
    setup_logging("WARNING")
    from stamen.bench.train import run_train_bench

    run_train_bench(model=model, num_servers=servers, batch=batch, seq_len=seq_len, runs=runs, rank=rank,
                    pre_seq_len=pre_seq_len, sub_batch_tokens=sub_batch_tokens, json_only=json_out,
                    server_threads=server_threads, skip_memory=skip_memory, stateless=stateless)


@bench_app.command("api")
def bench_api(
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per run.")] = 64,
    runs: Annotated[int, typer.Option(help="Alternating runs per path (median reported).")] = 5,
    concurrency: Annotated[list[int], typer.Option(help="Concurrent stream counts to measure.")] = [1, 4, 8],  # noqa: B006
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """The OpenAI-compatible API vs the Python client on the same swarm of the default real model."""
    setup_logging("WARNING")
    from stamen.bench.api import run_api_bench

    run_api_bench(new_tokens=new_tokens, runs=runs, concurrency=concurrency, json_only=json_out)


@bench_app.command("network")
def bench_network(
    model: Annotated[str | None, typer.Option(help="Model directory (default: a random Llama of --preset).")] = None,
    preset: Annotated[str, typer.Option(help="Preset of the random model: 246m (default), small, tiny.")] = "246m",
    servers: Annotated[int, typer.Option(help="Servers to split the blocks over.")] = 3,
    bandwidth: Annotated[list[str] | None, typer.Option(help="tc rates per host link (default 1gbit 100mbit).")] = None,
    rtt_ms: Annotated[list[float] | None, typer.Option(help="Round trips injected per link (default 0 100).")] = None,
    prefix: Annotated[int, typer.Option(help="Prompt length before decoding.")] = 128,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per run.")] = 16,
    runs: Annotated[int, typer.Option(help="Runs per cell (medians).")] = 3,
    forward_batch: Annotated[list[int] | None, typer.Option(help="Forward batch sizes (default 1 16).")] = None,
    push_off: Annotated[bool, typer.Option(help="Also time generation with server-to-server push off.")] = True,
    loopback: Annotated[bool, typer.Option(help="Skip namespaces: round trips on 127.0.0.1 only.")] = False,
    quick: Annotated[bool, typer.Option(help="A smoke run: small model, short prompt, one run per cell.")] = False,
    out: Annotated[Path | None, typer.Option(help="Directory for network.json and network.md.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Inference and forward through the swarm under bandwidth limits (tc tbf between network namespaces;
    needs root) and round trips (emulated at the transport by relays), with the analytic model's prediction."""
    setup_logging("WARNING")
    from stamen.bench.network import NetworkSettings, run_network_bench

    settings = NetworkSettings.quick(model) if quick else NetworkSettings(
        model=model, preset=preset, prefix=prefix, new_tokens=new_tokens, runs=runs)
    settings.servers, settings.push_off, settings.loopback = servers, push_off and not quick, loopback
    if bandwidth:
        settings.bandwidths = list(bandwidth)
    if rtt_ms:
        settings.rtts_ms = list(rtt_ms)
    if forward_batch:
        settings.forward_batches = list(forward_batch)
    run_network_bench(settings, json_only=json_out, out=out)


@bench_app.command("quant")
def bench_quant(
    model: Annotated[str | None, typer.Option(help="Model directory (default: SmolLM2-135M-Instruct, converted "
                                                   "once).")] = None,
    text: Annotated[Path | None, typer.Option(help="Text to measure perplexity on (default: "
                                                   "examples/data/swarm_notes.txt).")] = None,
    random_246m: Annotated[bool, typer.Option(help="Also time one block of the random 246M Llama shape.")] = True,
    rounds: Annotated[int, typer.Option(help="Interleaved timing rounds (medians reported).")] = 5,
    steps: Annotated[int, typer.Option(help="Decoding steps timed per round.")] = 10,
    json_path: Annotated[Path | None, typer.Option("--json-path", help="Also write the JSON here.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's choice).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Quantized server weights (none, int8, nf4): bytes and speed per block, perplexity cost on a real model."""
    setup_logging("WARNING")
    from stamen.bench.quant import run_quant_bench

    run_quant_bench(model=model, text=text, random_246m=random_246m, rounds=rounds, steps=steps,
                    json_path=json_path, json_only=json_out, threads=threads)


@bench_app.command("wire")
def bench_wire(
    model: Annotated[str | None, typer.Option(help="Model directory (default: the converted SmolLM2-135M).")] = None,
    preset: Annotated[str | None, typer.Option(help="Use a random Llama of this preset instead (e.g. 246m).")] = None,
    servers: Annotated[int, typer.Option(help="Loopback servers to split the blocks over.")] = 3,
    new_tokens: Annotated[int, typer.Option(help="Decoding steps measured.")] = 64,
    dtype: Annotated[list[str], typer.Option(help="Server dtypes to measure.")] = ["float32", "bfloat16"],  # noqa: B006
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Bytes per token per hop on the wire, and the accuracy cost of blockwise8 activation compression."""
    setup_logging("WARNING")
    from stamen.bench.wire import run_wire_bench

    run_wire_bench(model=model, preset=preset, num_servers=servers, new_tokens=new_tokens, dtypes=dtype,
                   json_only=json_out)


@app.command("make-model")
def make_model(
    out: Annotated[Path, typer.Argument(help="Directory to write.")],
    preset: Annotated[str, typer.Option(help="tiny, small (demo) or 246m (benchmark).")] = "small",
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Create a random Llama-architecture model in the Hugging Face format (nothing is downloaded)."""
    from stamen.testing.models import PRESETS, save_random_llama

    if preset not in PRESETS:
        raise typer.BadParameter(f"preset must be one of {sorted(PRESETS)}")
    save_random_llama(out, PRESETS[preset], seed=seed)
    print(out)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # libgomp's idle OpenMP workers spin ~300 000 times after every parallel region, holding a core
    # for milliseconds; when a client and servers share cores, that core is the one the next hop
    # computes on, and a 2-thread team then waits for it at every barrier. 3 000 spins (~0.1 ms on
    # the development machine) still cover the gaps between the parallel regions of a step (a
    # step's compute in-process is the same at 300, 3 000 and 30 000), and with 3 servers sharing
    # 2 cores the servers' compute went from 1.12x the same blocks in-process at 30 000 to 0.97x
    # side by side (0.93-1.09x over five runs; docs/benchmarks.md). Read when torch loads.
    os.environ.setdefault("GOMP_SPINCOUNT", "3000")
    app()


if __name__ == "__main__":
    main()
