"""``stamen bench``: benchmarks, side by side with local baselines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stamen.cli.logs import setup_logging

bench_app = typer.Typer(help="Benchmarks, side by side with local baselines.", no_args_is_help=True)


def _bench_settings(model: str | None, preset: str, servers: int, prefix: list[int] | None, new_tokens: int | None,
                    runs: int | None, offload: bool, quick: bool):
    from stamen.bench.harness import BenchSettings

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
    from stamen.bench.suite import run_inference_bench

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
    from stamen.bench.suite import run_forward_bench

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
    from stamen.bench.suite import run_suite

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


@bench_app.command("concurrency")
def bench_concurrency(
    preset: BenchPresetOpt = "246m",
    servers: BenchServersOpt = 3,
    sessions: Annotated[list[int], typer.Option(help="Concurrent session counts.")] = [1, 2, 4, 8, 16],  # noqa: B006
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per session.")] = 32,
    runs: Annotated[int, typer.Option(help="Runs per case, alternating batching on and off (medians).")] = 2,
    api: Annotated[bool, typer.Option(help="Also generate through stamen api (streamed completions).")] = True,
    device: Annotated[str, typer.Option(help="The servers' torch device (cuda on a GPU machine).")] = "cpu",
    dtype: Annotated[str, typer.Option(help="The servers' compute dtype: float32, bfloat16 or float16.")] = "float32",
    json_out: BenchJsonOpt = False,
) -> None:
    """Many users at once: aggregate tokens/s and p50/p95 time per token with 1-16 concurrent sessions,
    through the Python client and the HTTP API, servers batching and not (--no-batching), in one run."""
    setup_logging("WARNING")
    from stamen.bench.concurrency import run_concurrency_bench

    run_concurrency_bench(preset=preset, servers=servers, sessions=sessions, new_tokens=new_tokens, runs=runs,
                          api=api, json_only=json_out, device=device, dtype=dtype)


@bench_app.command("failover")
def bench_failover(
    model: BenchModelOpt = None,
    preset: Annotated[str, typer.Option(help="Preset of the random model: small (default), tiny, 246m.")] = "small",
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per client and trial.")] = 32,
    fault_at: Annotated[int, typer.Option(help="The token after which the server in use is signalled.")] = 10,
    runs: Annotated[int, typer.Option(help="Trials per fault and client count (medians over all clients).")] = 3,
    clients: Annotated[list[int], typer.Option(help="Concurrent client counts.")] = [1, 4],  # noqa: B006
    fault: Annotated[list[str], typer.Option(help="kill (SIGKILL) and/or stop (SIGSTOP).")] = ["kill", "stop"],  # noqa: B006
    json_out: BenchJsonOpt = False,
) -> None:
    """The stall of a generation whose server dies (SIGKILL) or hangs (SIGSTOP) mid-way: time to notice it
    and to replace it (route, open, replay), with 1 and 4 concurrent clients."""
    setup_logging("WARNING")
    from stamen.bench.failover import SIGNALS, FailoverSettings, run_failover_bench

    unknown = [f for f in fault if f not in SIGNALS]
    if unknown:
        raise typer.BadParameter(f"unknown fault {unknown[0]!r}: use kill or stop", param_hint="--fault")
    run_failover_bench(FailoverSettings(model=model, preset=preset, new_tokens=new_tokens, fault_at=fault_at,
                                        runs=runs, clients=list(clients), signals=list(fault)), json_only=json_out)


@bench_app.command("audit")
def bench_audit(
    model: BenchModelOpt = None,
    preset: Annotated[str, typer.Option(help="Preset of the random model: small (default), tiny, 246m.")] = "small",
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per run.")] = 128,
    runs: Annotated[int, typer.Option(help="Interleaved generations per mode (medians).")] = 5,
    detection_runs: Annotated[int, typer.Option(help="Generations with the lying server allowed.")] = 10,
    json_out: BenchJsonOpt = False,
) -> None:
    """Inference audits: ms/token with audits at the default rate against verify="off", side by side,
    and how many decoding steps a lying server (1 % noise) goes undetected (median and worst)."""
    setup_logging("ERROR")
    from stamen.bench.audit import AuditBenchSettings, run_audit_bench

    run_audit_bench(AuditBenchSettings(model=model, preset=preset, new_tokens=new_tokens, runs=runs,
                                       detection_runs=detection_runs), json_only=json_out)


@bench_app.command("clip-cost")
def bench_clip_cost(
    peers: Annotated[int, typer.Option(help="Averaging peers (one of them Byzantine).")] = 4,
    elements: Annotated[int, typer.Option(help="float32 values each peer averages.")] = 1 << 22,
    rounds: Annotated[int, typer.Option(help="Rounds per aggregation (interleaved; medians).")] = 5,
    tau: Annotated[float, typer.Option(help="CenteredClip's clipping radius.")] = 1.0,
    json_out: BenchJsonOpt = False,
) -> None:
    """CenteredClip's cost per all-reduce round against the mean: real hivemind averagers in separate
    processes on 127.0.0.1, interleaved rounds, medians."""
    setup_logging("ERROR")
    from stamen.bench.audit import run_clip_cost

    run_clip_cost(peers=peers, elements=elements, rounds=rounds, tau=tau, json_only=json_out)


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


@bench_app.command("swarm-train")
def bench_swarm_train(
    model: Annotated[str | None, typer.Option(help="Model directory (default: a random Llama of --preset).")] = None,
    preset: Annotated[str, typer.Option(help="Preset of the random model: 246m (default), small, tiny.")] = "246m",
    averaging: Annotated[list[str] | None, typer.Option(help="Averagers to compare (default plain powersgd "
                                                              "acp).")] = None,
    rank: Annotated[int, typer.Option(help="PowerSGD / ACP-SGD rank.")] = 4,
    rounds: Annotated[int | None, typer.Option(help="Averaging rounds per kind and link (default 4; medians).")] = None,
    bandwidth: Annotated[list[str] | None, typer.Option(help="tc rates of the namespace averaging cells "
                                                             "(default 100mbit; needs root).")] = None,
    loopback: Annotated[bool, typer.Option(help="Skip namespaces: average on 127.0.0.1 only.")] = False,
    batch: Annotated[int | None, typer.Option(help="Global batch of a training step (default 32).")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per sequence (default 128).")] = None,
    microbatch: Annotated[int | None, typer.Option(help="Sequences per microbatch (default 4).")] = None,
    steps: Annotated[int | None, typer.Option(help="Measured training steps per contender (default 3; "
                                                   "medians).")] = None,
    ablations: Annotated[bool, typer.Option(help="Also measure recomputation, compression and bf16, one at a "
                                                 "time.")] = True,
    averaging_part: Annotated[bool, typer.Option("--averaging-part/--no-averaging-part",
                                                 help="Measure the averagers.")] = True,
    throughput_part: Annotated[bool, typer.Option("--throughput-part/--no-throughput-part",
                                                  help="Measure swarm vs local training.")] = True,
    server_threads: Annotated[int | None, typer.Option(help="torch threads per server (default: torch's).")] = None,
    peers_per_stage: Annotated[int, typer.Option(help="Training servers per stage (and averaging peers).")] = 2,
    inflight: Annotated[int, typer.Option(min=1, help="Microbatches the trainer keeps in flight (bounds the "
                                                      "servers' held graphs).")] = 2,
    quick: Annotated[bool, typer.Option(help="A smoke run: tiny model, 2 rounds, one short step.")] = False,
    out: Annotated[Path | None, typer.Option(help="Directory for swarm_train.json and swarm_train.md.")] = None,
    json_out: BenchJsonOpt = False,
) -> None:
    """Training the model's own weights in a SWARM: averager bytes and seconds per round (plain, PowerSGD,
    ACP-SGD) on loopback and at 100 Mbit/s between namespaces; a 2-stage × 2-peer swarm's training
    tokens/s vs one local process; recomputation, 8-bit activation compression and bf16 one at a time."""
    setup_logging("WARNING")
    from stamen.bench.swarm_train import SwarmTrainSettings, run_swarm_train_bench

    settings = SwarmTrainSettings.quick(model) if quick else SwarmTrainSettings(model=model, preset=preset)
    settings.rank, settings.loopback_only, settings.ablations = rank, loopback, ablations
    settings.averaging_part, settings.throughput_part = averaging_part, throughput_part
    settings.peers_per_stage, settings.inflight = peers_per_stage, inflight
    for name, value in (("averaging", averaging), ("rounds", rounds), ("bandwidths", bandwidth), ("batch", batch),
                        ("seq_len", seq_len), ("microbatch", microbatch), ("steps", steps),
                        ("server_threads", server_threads)):
        if value:
            setattr(settings, name, list(value) if isinstance(value, list) else value)
    unknown = [k for k in settings.averaging if k not in ("plain", "powersgd", "acp")]
    if unknown:
        raise typer.BadParameter(f"unknown averager {unknown[0]!r}: use plain, powersgd or acp",
                                 param_hint="--averaging")
    run_swarm_train_bench(settings, json_only=json_out, out=out)
