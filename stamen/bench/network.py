"""``stamen bench network``: inference and forward through a swarm under bandwidth limits and round trips.

Topology (when this process may create network namespaces, i.e. runs as root): one namespace per
server and one for the client and the bootstrap DHT peer, joined by a bridge in a namespace of its
own (``stamen.testing.netns``); every host's uplink and downlink is limited with ``tc tbf`` to the
cell's bandwidth. Servers are real ``stamen server`` processes started with ``ip netns exec``;
this process enters the client's namespace for the client and the measurements.

Latency: this kernel has no ``netem``, so round trips are **emulated at the transport, not by
the kernel**: a relay process in each server's namespace (``stamen.testing.latency``) sits in
front of the server's port, the server announces the relay's address, and the relay holds every
byte for RTT/2 in each direction. Every libp2p connection to a server (from the client or from
another server) crosses one relay, so every link's round trip grows by the injected RTT. The
relays stay in the path in every cell (with 0 ms in the "< 5 ms" cells); the delay and the tbf
rates change between cells without restarting anything.

Without the rights to create namespaces the benchmark says "skipping namespace runs: ..." and runs
the round-trip cells on 127.0.0.1 (relays only, bandwidth unlimited).

Each cell measures: the round trip as pinged (an ``rpc_info`` call to each server); greedy
generation after a ``prefix``-token prompt (ms/token = mean gap between new tokens after the
first; time to first token from the ``generate`` call, so choosing a route and opening the sessions
count), with server-to-server push on and off; forward tokens/s of
``B × length`` tokens through all blocks (stateless ``rpc_forward`` hops, as fine-tuning
forwards without streams). Next to each measurement stands what the analytic model predicts: the
base cell's measurement (highest bandwidth, lowest round trip: compute and local overheads) with
the network time of ``network_ms`` for the base cell swapped for this cell's (pinged round trip,
bandwidth, message bytes). Our blocks timed in this process before the swarm starts give the
compute floor for reference (on a loaded 2-core machine that timing is noisy, which is why the
model does not start from it).
"""

from __future__ import annotations

import contextlib
import math
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig

from stamen.bench.harness import even_spans
from stamen.bench.network_model import network_ms, predict
from stamen.bench.network_swarm import NetSwarm
from stamen.bench.timing import TokenClock, emit_report, say_to
from stamen.client import loop
from stamen.client.model import AutoDistributedModelForCausalLM
from stamen.models import BlockConfig, KVCache, load_config, load_span, open_checkpoint
from stamen.rpc.calls import ping
from stamen.testing.models import PRESETS, save_random_llama
from stamen.testing.netns import Topology, cleanup_stale, entered, namespaces_unavailable, parse_rate
from stamen.types import Span, default_dht_prefix


@dataclass
class NetworkSettings:
    model: str | None = None
    """A model directory (default: a random Llama of ``preset``)."""
    preset: str = "246m"
    servers: int = 3
    bandwidths: list[str] = field(default_factory=lambda: ["1gbit", "100mbit"])
    """tc rates of every host's uplink and downlink (namespace runs only)."""
    rtts_ms: list[float] = field(default_factory=lambda: [0.0, 100.0])
    """Round trips injected at the transport on every link (0: none, what the path itself costs)."""
    prefix: int = 128
    new_tokens: int = 16
    runs: int = 3
    forward_batches: list[int] = field(default_factory=lambda: [1, 16])
    forward_length: int = 128
    push_off: bool = True
    """Also time generation with server-to-server push off."""
    loopback: bool = False
    """Skip namespaces even when they are available (round trips on 127.0.0.1 only)."""

    @classmethod
    def quick(cls, model: str | None = None) -> NetworkSettings:
        return cls(model=model, preset="small", prefix=32, new_tokens=6, runs=1, forward_batches=[1, 4],
                   push_off=False)


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def _generate(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(ms per token after the first, time to first token in ms) of one greedy generation."""
    clock = TokenClock()
    start = time.perf_counter()  # the first token's time includes choosing a route and opening sessions
    with torch.no_grad():
        model.generate(prompt, streamer=clock, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                       pad_token_id=0)
    return statistics.mean(clock.gaps_ms()), 1000 * (clock.times[1] - start)


def _forward(model, batch: int, length: int, hidden_size: int) -> float:
    """Tokens per second of one forward of ``batch × length`` tokens through every block."""
    hidden = torch.randn(batch, length, hidden_size, generator=torch.Generator().manual_seed(batch))
    start = time.perf_counter()
    with torch.no_grad():
        model.run_blocks(hidden)
    return batch * length / (time.perf_counter() - start)


class Compute:
    """Our blocks in this process (the compute the servers do, without network) and the client's
    head, timed once per run between the swarm's runs so both see the same load on the machine."""

    def __init__(self, model_dir: str, prefix: int, new_tokens: int, forward_batches: list[int],
                 forward_length: int):
        hf_config = load_config(model_dir)
        self.config = BlockConfig.from_hf(hf_config)
        self.span = load_span(open_checkpoint(model_dir), self.config, Span(0, self.config.num_blocks),
                              torch.float32, progress=False)
        self.head = torch.randn(hf_config.vocab_size, self.config.hidden_size)
        self.prefix, self.new_tokens = prefix, new_tokens
        self.forward_batches, self.forward_length = forward_batches, forward_length
        self.gen = torch.Generator().manual_seed(0)
        self.KVCache = KVCache
        with torch.inference_mode():  # first touches of the weights
            warm = KVCache(self.config, self.config.num_blocks, 1, 16, torch.float32)
            self.span.step(self._x(1, 8), warm)
            self.span.step(self._x(1, 1), warm)
            self.span.forward(self._x(1, 8))

    def _x(self, batch: int, length: int) -> torch.Tensor:
        return torch.randn(batch, length, self.config.hidden_size, generator=self.gen)

    def measure(self) -> dict[str, float]:
        """One run: ms of the prefill, of a decode step (median), of the head, of each forward."""
        config, span = self.config, self.span
        with torch.inference_mode():
            cache = self.KVCache(config, config.num_blocks, 1, self.prefix + self.new_tokens + 1, torch.float32)
            start = time.perf_counter()
            span.step(self._x(1, self.prefix), cache)
            prefill = time.perf_counter() - start
            x, steps = self._x(1, 1), []
            for _ in range(self.new_tokens):
                start = time.perf_counter()
                span.step(x, cache)
                steps.append(time.perf_counter() - start)
            heads = []
            for _ in range(5):
                start = time.perf_counter()
                (x[0] @ self.head.T).argmax()
                heads.append(time.perf_counter() - start)
            out = {"prefill_ms": 1000 * prefill, "step_ms": 1000 * statistics.median(steps),
                   "head_ms": 1000 * statistics.median(heads)}
            for batch in self.forward_batches:
                hidden = self._x(batch, self.forward_length)
                start = time.perf_counter()
                span.forward(hidden)
                out[f"forward_b{batch}_ms"] = 1000 * (time.perf_counter() - start)
        return out


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------


def _ping_ms(model, repeats: int = 5) -> float:
    swarm = model.swarm
    peers = [swarm.peer(s.peer_id) for s in swarm.servers(refresh=True)]
    rtts = []
    for _ in range(repeats):
        for peer in peers:
            rtt = loop.run(ping(swarm.p2p, peer, timeout=10.0))
            if rtt is not None:
                rtts.append(1000 * rtt)
    return statistics.median(rtts) if rtts else float("nan")


def _cell(settings: NetworkSettings, clients: dict, prompt: torch.Tensor, hidden_size: int, say) -> dict:
    raw: dict[str, list[float]] = {"ping_ms": []}
    push = clients["push"]
    raw["ping_ms"] = [_ping_ms(push)]
    for model in clients.values():  # warm-up: routes, connections and the new delay in place
        _generate(model, prompt[:, :8], 2)
    _forward(push, 1, 8, hidden_size)
    for run in range(settings.runs):
        for name, model in clients.items():
            ms, ttft = _generate(model, prompt, settings.new_tokens)
            raw.setdefault(f"{name}_ms_per_token", []).append(ms)
            raw.setdefault(f"{name}_ttft_ms", []).append(ttft)
        for batch in settings.forward_batches:
            raw.setdefault(f"forward_b{batch}_tokens_per_s", []).append(
                _forward(push, batch, settings.forward_length, hidden_size))
        say(f"    run {run + 1}/{settings.runs}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in raw.items()))
    raw["ping_ms"].append(_ping_ms(push))
    medians = {k: statistics.median(v) for k, v in raw.items()}
    return {"measured": medians, "raw": {k: [round(x, 2) for x in v] for k, v in raw.items()}}


def run_network_bench(settings: NetworkSettings, json_only: bool = False, out: Path | None = None) -> dict:
    say = say_to(json_only)

    # SIGTERM ends the run through the finally blocks below (namespaces and processes cleaned up)
    if sys.platform.startswith("linux") and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    reason = "--loopback was given" if settings.loopback else namespaces_unavailable()
    use_netns = reason is None
    if use_netns:
        stale = cleanup_stale()
        if stale:
            say(f"removed stale namespaces of dead runs: {', '.join(stale)}")
    else:
        say(f"skipping namespace runs: {reason}; running the round-trip cells on 127.0.0.1 "
            f"(bandwidth unlimited)")
    bandwidths: list[str | None] = list(settings.bandwidths) if use_netns else [None]

    workdir = Path(tempfile.mkdtemp(prefix="stamen-bench-network-"))
    model = settings.model
    if model is None:
        say(f"creating a random {settings.preset} Llama (float32) ...")
        model = str(save_random_llama(workdir / f"llama-{settings.preset}", PRESETS[settings.preset],
                                      with_tokenizer=False))
    hf = AutoConfig.from_pretrained(model)
    H, num_blocks = hf.hidden_size, hf.num_hidden_layers
    prompt = torch.randint(3, hf.vocab_size, (1, settings.prefix), generator=torch.Generator().manual_seed(0))

    say("timing our blocks in this process (the compute floor, for reference) ...")
    compute = Compute(model, settings.prefix, settings.new_tokens, settings.forward_batches,
                      settings.forward_length).measure()
    say("  " + ", ".join(f"{k} {v:.1f}" for k, v in compute.items()))

    spans = even_spans(num_blocks, settings.servers)
    hosts = ["client", *(f"s{i}" for i in range(settings.servers))]
    cells = []
    started = time.monotonic()
    topo = Topology(hosts) if use_netns else None
    try:
        swarm = NetSwarm(workdir / "logs", topo)
        with swarm:
            if topo is not None:
                topo.set_rate(bandwidths[0])
            say(f"starting a bootstrap peer and {settings.servers} servers "
                f"({'one network namespace each, on a bridge' if topo else '127.0.0.1'}), each behind a "
                f"latency relay: {', '.join(map(str, spans))}")
            swarm.start_bootstrap()
            for i, span in enumerate(spans):
                swarm.add_relayed_server(model, span, i)
            clients: dict = {}
            with entered(topo.ns("client")) if topo else contextlib.nullcontext():
                try:
                    swarm.wait_online(default_dht_prefix(model), num_blocks)
                    clients["push"] = AutoDistributedModelForCausalLM.from_pretrained(
                        model, initial_peers=swarm.initial_peers)
                    if settings.push_off:
                        clients["push_off"] = AutoDistributedModelForCausalLM.from_pretrained(
                            model, initial_peers=swarm.initial_peers, use_push=False)
                    for bandwidth in bandwidths:
                        if topo is not None:
                            topo.set_rate(bandwidth)
                        for rtt in settings.rtts_ms:
                            swarm.set_rtt(rtt)
                            label = f"{bandwidth or 'loopback'}, RTT +{rtt:g} ms"
                            say(f"cell: {label}")
                            cell = _cell(settings, clients, prompt, H, say)
                            bits = parse_rate(bandwidth) if bandwidth else math.inf
                            cell.update(bandwidth=bandwidth or "unlimited (loopback)", rtt_injected_ms=rtt,
                                        bits_per_s=bits, network_ms=network_ms(
                                            settings.servers, cell["measured"]["ping_ms"], bits, H, settings.prefix,
                                            settings.forward_batches, settings.forward_length))
                            cells.append(cell)
                finally:
                    for client in clients.values():
                        client.shutdown()
                    if swarm._dht is not None:
                        swarm._dht.shutdown()
                        swarm._dht = None
    finally:
        if topo is not None:
            topo.teardown()

    base = max(cells, key=lambda c: (c["bits_per_s"], -c["rtt_injected_ms"]))
    for cell in cells:
        cell["predicted"] = predict(base["measured"], base["network_ms"], cell["network_ms"], settings.forward_length)
        cell["base"] = cell is base
        if math.isinf(cell["bits_per_s"]):
            cell["bits_per_s"] = None  # JSON has no infinity
    summary = {
        "settings": asdict(settings),
        "model": model,
        "hidden_size": H,
        "num_blocks": num_blocks,
        "spans": [str(s) for s in spans],
        "topology": "network namespaces on a bridge, tc tbf on every uplink and downlink" if use_netns
        else f"127.0.0.1 (namespace runs skipped: {reason})",
        "latency": "emulated at the transport, not by the kernel: a TCP relay in front of each server "
                   "holds every byte for RTT/2 each way",
        "compute_in_process_ms": compute,
        "analytic_model": "a cell = the base cell's measurement - the network time the model gives the base "
                          "cell + the network time it gives this cell (RTT as pinged; see network_ms)",
        "torch_threads": torch.get_num_threads(),
        "wall_s": round(time.monotonic() - started, 1),
        "cells": cells,
    }
    emit_report(summary, markdown(summary), out, "network", json_only)
    return summary


def markdown(summary: dict) -> str:
    s = summary["settings"]
    batches = s["forward_batches"]

    def pair(m: dict, p: dict, key: str, fmt: str, base: bool) -> str:
        if key not in m:
            return "–"
        if base or key not in p:
            return fmt.format(m[key])
        if isinstance(p[key], list):
            return f"{fmt.format(m[key])} ({'–'.join(fmt.format(x) for x in p[key])})"
        return f"{fmt.format(m[key])} ({fmt.format(p[key])})"

    head = ["bandwidth", "RTT injected", "RTT pinged ms", "ms/token push", "ms/token push off", "TTFT ms push",
            *(f"forward {b}×{s['forward_length']} tokens/s" for b in batches)]
    lines = [
        f"network: {summary['num_blocks']} blocks over {s['servers']} servers ({', '.join(summary['spans'])}), "
        f"prefix {s['prefix']}, {s['new_tokens']} new tokens, medians of {s['runs']} runs; "
        f"measured (analytic model in parentheses; * = the base cell the model starts from)",
        f"topology: {summary['topology']}; latency {summary['latency']}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * 2 + "---:|" * (len(head) - 2),
    ]
    for c in summary["cells"]:
        m, p, b = c["measured"], c["predicted"], c["base"]
        row = [c["bandwidth"] + (" *" if b else ""), f"+{c['rtt_injected_ms']:g} ms", f"{m['ping_ms']:.1f}",
               pair(m, p, "push_ms_per_token", "{:.1f}", b), pair(m, p, "push_off_ms_per_token", "{:.1f}", b),
               pair(m, p, "push_ttft_ms", "{:.0f}", b),
               *(pair(m, p, f"forward_b{n}_tokens_per_s", "{:.0f}", b) for n in batches)]
        lines.append("| " + " | ".join(row) + " |")
    comp = summary["compute_in_process_ms"]
    lines += ["", "our blocks in this process before the swarm started (compute floor): decode step "
              f"{comp['step_ms']:.1f} ms + head {comp['head_ms']:.1f} ms, prefill {comp['prefill_ms']:.0f} ms, "
              + ", ".join(f"forward {b}×{s['forward_length']} {comp[f'forward_b{b}_ms']:.0f} ms" for b in batches)]
    return "\n".join(lines)
