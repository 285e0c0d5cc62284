"""``stamen bench swarm-train``: training the model's own weights in a SWARM, side by side in one run.

Three parts, each on the same model (default: the random 246M float32 Llama of the inference
benchmark, 16 blocks, split into 2 stages; ``--quick``: the tiny preset and a few steps):

1. **Averaging** (``run_averaging``). One stage's averaging group: 2 peers, each its own process,
   holding the parameters of the first stage in the shapes a ``--train`` server holds them (fused qkv
   and gate/up projections) with random gradients, and one averager per kind (plain, PowerSGD,
   ACP-SGD) from ``stamen.train.averaging.make_averager``, the exact averagers stages run. A round
   runs as ``StageAverager`` runs it (gradients copied into the averager's tensors, then
   ``DecentralizedAverager.step`` with metadata gathered); kinds alternate round by round. Per round:
   the seconds of the whole step (matchmaking included) and of the all-reduce alone (from the step
   entering hivemind's ``RUNNING_ALLREDUCE`` stage, which includes compressing and decompressing, to
   its end: what ACP-SGD changes); the bytes one peer sent, as the averager counts them
   (``ExactAveraging.bytes_sent``: the tensors handed to hivemind's runner and its actual shares),
   as computed with equal shares (2·S·(N−1)/N values of 4 bytes per all-reduce of S values), and,
   where the peer has a network namespace of its own, as measured on its interface (``/proc/net/dev``
   of its namespace: everything its processes sent, DHT and framing included). A round that fails on
   a peer is rolled back on all and run again (counted in the report). Cells: 127.0.0.1, and each
   ``--bandwidth`` (default 100mbit) with every peer in its own namespace, uplink and downlink limited
   by ``tc tbf`` (``stamen.testing.netns``, as ``stamen bench network``); without root the namespace
   cells are skipped ("skipping namespace runs").
2. **Throughput** (``run_throughput``). Training tokens/s of a 2-stage × 2-peer swarm (4
   ``stamen server --train`` processes on 127.0.0.1, ACP-SGD, a ``SwarmTrainer`` in this process,
   synchronous steps of a global batch of ``batch × seq_len`` tokens in microbatches) against one
   local process training the same checkpoint (transformers, float32, the same optimizer, gradients
   accumulated over the same microbatches). The local contender runs first, alone, and is freed
   before the swarm starts (at 246M they do not fit in 24 GiB together); a warm-up step each, then
   ``steps`` measured steps; medians.
3. **Optimisations, one at a time** (same part), against the swarm baseline (kept ``rpc_train``
   graphs, no compression, float32): activation recomputation (``train_streams=False``: kept
   streams with ``recompute``), 8-bit activation compression between stages (``blockwise8``, also
   for training), bf16 compute on the servers (``--compute-dtype bfloat16``: a second swarm, after
   the first). Client-side variants are trainers on the same swarm, one after the other;
   ``HopCounter`` checks that a variant's switch reached the wire, and the report marks one that
   did not.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from stamen.bench.harness import even_spans
from stamen.bench.report import swarm_train_markdown
from stamen.bench.timing import emit_report, machine_info, say_to
from stamen.testing.models import PRESETS, save_random_llama
from stamen.testing.netns import Topology, cleanup_stale, namespaces_unavailable
from stamen.types import Span

KINDS = ("plain", "powersgd", "acp")
BYTES_PER_VALUE = 4
"""float32: hivemind's averagers send without compression by default."""
PROTOCOL_PREFIX = "@@ "
"""A line of an averaging peer's stdout that carries a reply (anything else is ignored)."""


@dataclass
class SwarmTrainSettings:
    model: str | None = None
    """A model directory; None: a random Llama of ``preset``."""
    preset: str = "246m"
    """``stamen.testing.models.PRESETS`` name of the random model."""
    stages: int = 2
    """Stages the blocks split into (evenly); the averaging part uses the first one's parameters."""
    peers_per_stage: int = 2
    """Training servers per stage, and peers of the averaging group."""
    averaging: list[str] = field(default_factory=lambda: list(KINDS))
    """Averager kinds of the averaging part."""
    rank: int = 4
    """PowerSGD / ACP-SGD rank."""
    rounds: int = 4
    """Measured averaging rounds per kind and cell (even: ACP-SGD's P and Q rounds alike), after one warm-up."""
    bandwidths: list[str] = field(default_factory=lambda: ["100mbit"])
    """tc rates of the namespace cells of the averaging part."""
    loopback_only: bool = False
    """Skip the namespace cells even with root."""
    matchmaking_time: float = 1.0
    """hivemind's ``min_matchmaking_time`` of every averager (peers, stages, trainer)."""
    averaging_timeout: float = 600.0
    """Seconds an all-reduce may take (plain averaging of a 246M stage at 100 Mbit/s: ~40 s)."""
    swarm_averaging: str = "acp"
    """How the swarm's stages and trainer average (throughput part)."""
    batch: int = 32
    """Global batch of a training step (sequences)."""
    seq_len: int = 128
    microbatch: int = 4
    """Sequences per microbatch."""
    steps: int = 3
    """Measured training steps per contender (medians), after one warm-up step each."""
    optimizer: str = "sgd"
    """Of the stages, the trainer's client parts and the local contender alike (sgd: no optimizer state,
    so the 4 servers, the trainer and the local model fit in memory together)."""
    lr: float = 1e-4
    """Learning rate of every contender."""
    epoch_timeout: float = 1800.0
    """Seconds a synchronous step may wait for the stages to step (the trainer's ``epoch_timeout``)."""
    ablations: bool = True
    """Also measure recomputation, compression and bf16 one at a time."""
    averaging_part: bool = True
    """Run the averaging part."""
    throughput_part: bool = True
    """Run the throughput part (and the optimisations)."""
    server_threads: int | None = None
    """torch threads per server (None: torch's choice)."""
    inflight: int = 2
    """Microbatches the trainer keeps in flight (its ``max_inflight``): each holds a graph on one peer
    per stage, so this bounds the servers' activation memory (at 246M about 0.3 GB per graph of 4 × 128
    tokens on a span of 8 blocks); 2 keep this machine's 2 cores busy."""

    @classmethod
    def quick(cls, model: str | None = None) -> SwarmTrainSettings:
        return cls(model=model, preset="tiny", rounds=2, batch=4, seq_len=16, microbatch=2, steps=1,
                   averaging_timeout=60.0, epoch_timeout=60.0, server_threads=1)


def stage_shapes(hf_config, span: Span) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the parameters a ``--train`` server of ``span`` holds (our blocks' layout)."""
    from stamen.models import BlockConfig
    from stamen.models.span import SpanModel

    with torch.device("meta"):
        model = SpanModel(BlockConfig.from_hf(hf_config), span)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


# ---------------------------------------------------------------------------------------------
# Averaging: one process per peer
# ---------------------------------------------------------------------------------------------


def _reply(obj: dict) -> None:
    sys.stdout.write(PROTOCOL_PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _iface_bytes(iface: str | None) -> tuple[int, int] | None:
    """(tx, rx) bytes of ``iface`` in this process's network namespace."""
    if iface is None:
        return None
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == iface:
                fields = rest.split()
                return int(fields[8]), int(fields[0])
    return None


def allreduce_values(averager) -> list[int]:
    """Values this round hands to each of its all-reduces (PowerSGD: two; plain and ACP-SGD: one)."""
    from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager
    from hivemind.utils.math import get_flatten_greedy_dims

    from stamen.train.acp import ACPSGDGradientAverager

    grads = list(averager._grads_from_parameters())
    if isinstance(averager, ACPSGDGradientAverager):
        return [averager.compressed_elements()]
    if isinstance(averager, PowerSGDGradientAverager):
        plain = averager._uncompressed_gradients_indexes
        ps = sum(get_flatten_greedy_dims(g)[0] * averager.rank for i, g in enumerate(grads) if i not in plain)
        qs = sum(q.numel() for q in averager._qs) + sum(grads[i].numel() for i in plain)
        return [ps, qs]
    return [sum(g.numel() for g in grads)]


def sent_bytes(values: list[int], group_size: int) -> float:
    """Bytes one peer sends in hivemind's all-reduces of ``values`` (equal shares; see the module)."""
    return sum(2 * v * (group_size - 1) / group_size * BYTES_PER_VALUE for v in values)


def _averaging_round(averager, grads: list[torch.Tensor], timeout: float, iface: str | None) -> dict:
    """One round as ``StageAverager`` runs it: the mean gradients copied into the averager's tensors,
    then hivemind's ``DecentralizedAverager.step`` with the round's metadata gathered."""
    from hivemind.averaging import DecentralizedAverager
    from hivemind.averaging.control import AveragingStage

    values = allreduce_values(averager)
    before, counted = _iface_bytes(iface), averager.bytes_sent
    start = time.perf_counter()
    with averager.get_tensors() as buffers:
        for buffer, grad in zip(buffers, grads, strict=True):
            buffer.copy_(grad)
    control = DecentralizedAverager.step(averager, gather=dict(epoch=0, samples=1), weight=1.0, timeout=timeout,
                                         allow_retries=False, wait=False)
    reducing = None
    while not control.done():
        if reducing is None and control.stage == AveragingStage.RUNNING_ALLREDUCE:
            reducing = time.perf_counter()
        time.sleep(0.0005)
    end = time.perf_counter()
    control.result()  # raises if the round failed
    after = _iface_bytes(iface)
    out = {"step_s": end - start, "allreduce_s": end - (reducing or end), "values": values,
           "counted_bytes": averager.bytes_sent - counted}
    if before is not None and after is not None:
        out |= {"tx_bytes": after[0] - before[0], "rx_bytes": after[1] - before[1]}
    return out


def averaging_peer_main(config: str | None = None) -> None:
    """One averaging peer (its own process): a DHT, the stage's parameters with random gradients and
    one averager per kind; then rounds on request (JSON lines on stdin, replies on stdout)."""
    cfg = json.loads(config if config is not None else sys.argv[1])
    torch.set_num_threads(cfg["threads"])
    from hivemind import DHT

    from stamen.train.averaging import make_averager

    dht = DHT(start=True, host_maddrs=[f"/ip4/{cfg['host']}/tcp/0"], initial_peers=cfg["initial_peers"])
    averagers = {}
    try:
        _reply({"maddrs": [str(a) for a in dht.get_visible_maddrs()]})
        gen = torch.Generator().manual_seed(cfg["seed"])
        params = [torch.nn.Parameter(torch.empty(shape)) for shape in cfg["shapes"]]  # never touched: not resident
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        averaged = [torch.zeros(p.shape).share_memory_() for p in params]  # shared by the kinds (rounds run one by one)
        for kind in cfg["kinds"]:
            averagers[kind] = make_averager(kind, params, dht=dht, prefix=f"{cfg['prefix']}.{kind}", rank=cfg["rank"],
                                            matchmaking_time=cfg["matchmaking_time"], averaging_timeout=cfg["timeout"],
                                            target_group_size=cfg["group_size"], averaged_grads=averaged)
        _reply({"ready": True, "averager": type(averagers[cfg["kinds"][0]]).__module__})
        saved: list[torch.Tensor] = []
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                break
            averager = averagers[cmd["kind"]]
            buffers = averager.shared_buffers() + averager.local_buffers()
            if cmd["op"] == "restore":  # a round failed somewhere in the group: all go back, as StageAverager does
                for buffer, old in zip(buffers, saved, strict=True):
                    buffer.copy_(old)
                _reply({"restored": True})
                continue
            saved = [b.clone() for b in buffers]
            try:
                _reply(_averaging_round(averager, grads, cfg["timeout"], cfg["iface"]))
            except Exception as e:  # the parent restores the group and runs the round again
                _reply({"failed": f"{type(e).__name__}: {e}"})
    finally:
        for averager in averagers.values():
            with contextlib.suppress(Exception):
                averager.shutdown()
        dht.shutdown()


class _PeerProcess:
    """An averaging peer's process, talked to over its stdin and stdout."""

    def __init__(self, cmd_prefix: list[str], cfg: dict, log_path: Path):
        self.log_path = log_path
        code = "from stamen.bench.swarm_train import averaging_peer_main; averaging_peer_main()"
        env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"])}
        self.proc = subprocess.Popen([*cmd_prefix, sys.executable, "-c", code, json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log_path, "w"),
                                     text=True, start_new_session=True, env=env)
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL_PREFIX):
                self.replies.put(json.loads(line[len(PROTOCOL_PREFIX):]))
        self.replies.put(None)

    def send(self, obj: dict) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float) -> dict:
        try:
            reply = self.replies.get(timeout=timeout)
        except queue.Empty:
            reply = {"error": f"no reply in {timeout:.0f} s"}
        if reply is None:
            reply = {"error": f"the peer exited with {self.proc.wait()}"}
        if "error" in reply:
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"averaging peer: {reply['error']}\n--- {self.log_path}\n{tail}")
        return reply

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.send({"op": "quit"})
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its DHT, averagers and p2p daemons
        self.proc.wait()


def _averaging_cell(settings: SwarmTrainSettings, shapes: list[tuple[int, ...]], rate: str | None, workdir: Path,
                    say) -> dict:
    """One cell: ``peers_per_stage`` peers on 127.0.0.1 (``rate`` None) or each in its own namespace
    with every link limited to ``rate``; a warm-up round and ``rounds`` measured rounds per kind."""
    n = settings.peers_per_stage
    hosts = [f"a{i}" for i in range(n)]
    topo = Topology(hosts) if rate else None
    peers: list[_PeerProcess] = []
    raw: dict[str, list[dict]] = {kind: [] for kind in settings.averaging}
    failures: dict[str, list[str]] = {}
    try:
        if topo is not None:
            topo.set_rate(rate)
        cfg = dict(shapes=[list(s) for s in shapes], kinds=list(settings.averaging), rank=settings.rank,
                   prefix=f"bench{os.getpid()}.stage.0-{len(shapes)}", group_size=n,
                   matchmaking_time=settings.matchmaking_time, timeout=settings.averaging_timeout,
                   threads=max(1, (os.cpu_count() or 2) // n))
        initial: list[str] = []
        label = rate or "loopback"
        for i, host in enumerate(hosts):
            peer_cfg = dict(cfg, seed=i, initial_peers=initial, host=topo.addresses[host] if topo else "127.0.0.1",
                            iface="eth0" if topo else None)
            peer = _PeerProcess(topo.exec_prefix(host) if topo else [], peer_cfg,
                                workdir / f"averaging-{label}-{host}.log")
            peers.append(peer)
            maddrs = peer.recv(120)["maddrs"]
            if not initial:
                initial = maddrs
        sources = {peer.recv(300)["averager"] for peer in peers}

        def round_of(kind: str, attempts: int = 3) -> dict:
            for attempt in range(attempts):
                for peer in peers:
                    peer.send({"op": "round", "kind": kind})
                replies = [peer.recv(settings.averaging_timeout + 60) for peer in peers]
                failed = [r["failed"] for r in replies if "failed" in r]
                if not failed:
                    break
                failures.setdefault(kind, []).append(failed[0])
                say(f"    a {kind} round failed ({failed[0]}): the group restores its state and runs it again")
                for peer in peers:
                    peer.send({"op": "restore", "kind": kind})
                for peer in peers:
                    peer.recv(60)
                if attempt == attempts - 1:
                    raise RuntimeError(f"{kind}: {attempts} rounds in a row failed: {failed[0]}")
            out = {"step_s": max(r["step_s"] for r in replies), "allreduce_s": max(r["allreduce_s"] for r in replies),
                   "values": replies[0]["values"], "sent_bytes_computed": sent_bytes(replies[0]["values"], n),
                   "sent_bytes_counted": statistics.mean(r["counted_bytes"] for r in replies)}
            if all("tx_bytes" in r for r in replies):
                out |= {"sent_bytes_measured": statistics.mean(r["tx_bytes"] for r in replies),
                        "received_bytes_measured": statistics.mean(r["rx_bytes"] for r in replies)}
            return out

        for kind in settings.averaging:  # warm-up: connections, first matchmaking
            round_of(kind)
        for r in range(settings.rounds):
            for kind in settings.averaging:
                raw[kind].append(round_of(kind))
            say(f"    round {r + 1}/{settings.rounds}: " + ", ".join(
                f"{kind} {raw[kind][-1]['allreduce_s']:.2f} s ({raw[kind][-1]['step_s']:.2f} s step)"
                for kind in settings.averaging))
    finally:
        for peer in peers:
            peer.close()
        if topo is not None:
            topo.teardown()
    kinds = {}
    for kind, rounds in raw.items():
        k = {"allreduce_s": statistics.median(x["allreduce_s"] for x in rounds),
             "step_s": statistics.median(x["step_s"] for x in rounds),
             "allreduces_per_round": len(rounds[0]["values"]),
             "values_per_round": statistics.mean(sum(x["values"]) for x in rounds),
             "sent_mb_computed": statistics.mean(x["sent_bytes_computed"] for x in rounds) / 1e6,
             "sent_mb_counted": statistics.mean(x["sent_bytes_counted"] for x in rounds) / 1e6}
        if "sent_bytes_measured" in rounds[0]:
            k["sent_mb_measured"] = statistics.mean(x["sent_bytes_measured"] for x in rounds) / 1e6
            k["received_mb_measured"] = statistics.mean(x["received_bytes_measured"] for x in rounds) / 1e6
        k["raw"] = [{key: (round(v, 4) if isinstance(v, float) else v) for key, v in x.items()} for x in rounds]
        kinds[kind] = k
    cell = {"bandwidth": rate or "unlimited (127.0.0.1)", "namespaces": topo is not None,
            "averager": sorted(sources), "kinds": kinds, "ratios": _averaging_ratios(kinds),
            "failed_rounds": failures}
    return cell


def _averaging_ratios(kinds: dict) -> dict:
    out = {}
    if "acp" in kinds and "powersgd" in kinds:
        out["powersgd_over_acp_allreduce_s"] = kinds["powersgd"]["allreduce_s"] / kinds["acp"]["allreduce_s"]
        out["powersgd_over_acp_step_s"] = kinds["powersgd"]["step_s"] / kinds["acp"]["step_s"]
    if "acp" in kinds and "plain" in kinds:
        out["plain_over_acp_bytes_counted"] = kinds["plain"]["sent_mb_counted"] / kinds["acp"]["sent_mb_counted"]
        if "sent_mb_measured" in kinds["acp"]:
            out["plain_over_acp_bytes_measured"] = kinds["plain"]["sent_mb_measured"] / kinds["acp"]["sent_mb_measured"]
        out["plain_over_acp_allreduce_s"] = kinds["plain"]["allreduce_s"] / kinds["acp"]["allreduce_s"]
    return {k: round(v, 2) for k, v in out.items()}


def run_averaging(settings: SwarmTrainSettings, hf_config, workdir: Path, say) -> dict:
    spans = even_spans(hf_config.num_hidden_layers, settings.stages)
    named = stage_shapes(hf_config, spans[0])
    shapes = [s for _, s in named]
    values = sum(torch.Size(s).numel() for s in shapes)
    reason = "--loopback-only was given" if settings.loopback_only else namespaces_unavailable()
    rates: list[str | None] = [None]
    if reason is None:
        stale = cleanup_stale()
        if stale:
            say(f"removed stale namespaces of dead runs: {', '.join(stale)}")
        rates += list(settings.bandwidths)
    else:
        say(f"skipping namespace runs: {reason}; averaging on 127.0.0.1 only")
    say(f"averaging: one stage's group ({settings.peers_per_stage} peers, blocks {spans[0]}, {len(shapes)} tensors, "
        f"{values / 1e6:.1f}M values), kinds {', '.join(settings.averaging)}, rank {settings.rank}")
    cells = []
    for rate in rates:
        say(f"  cell: {rate or 'loopback (127.0.0.1)'}" + (" between network namespaces (tc tbf)" if rate else ""))
        cells.append(_averaging_cell(settings, shapes, rate, workdir, say))
    return {"span": str(spans[0]), "tensors": len(shapes), "values": values, "group_size": settings.peers_per_stage,
            "rank": settings.rank, "rounds": settings.rounds,
            "namespaces": "used" if reason is None else f"skipped: {reason}",
            "bytes": "counted: the averager's own count (ExactAveraging.bytes_sent: per all-reduce, the bytes of "
                     "the tensors handed to hivemind's runner times what the runner sends of them with its actual "
                     "shares: the other peers' shares, and the reduced own share back to each other peer); "
                     "computed: the same with equal shares, 2·S·(N−1)/N float32 values per all-reduce of S values; "
                     "measured (namespace cells): tx bytes of the peer's eth0 in its namespace, everything its "
                     "processes sent (DHT, matchmaking, libp2p and TCP/IP framing included)",
            "seconds": "allreduce_s: from the step entering RUNNING_ALLREDUCE (compression included) to its end, "
                       "the slower peer; step_s: the whole step as the caller sees it, matchmaking included",
            "cells": cells}


# ---------------------------------------------------------------------------------------------
# Throughput: a 2-stage × 2-peer swarm vs one local process
# ---------------------------------------------------------------------------------------------


class LocalTrainer:
    """The local contender: transformers' model of the same checkpoint, float32, the same optimizer,
    gradients accumulated over the same microbatches (loss = mean of the microbatches' losses)."""

    def __init__(self, model: str, optimizer: str, lr: float, microbatch: int):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).train()
        params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(params, lr=lr) if optimizer == "adamw" else torch.optim.SGD(params, lr=lr)
        self.microbatch = microbatch

    def train_step(self, ids: torch.Tensor) -> float:
        chunks = ids.split(self.microbatch)
        total = 0.0
        for chunk in chunks:
            loss = self.model(input_ids=chunk, labels=chunk).loss / len(chunks)
            loss.backward()
            total += float(loss.detach())
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total


VARIANTS: dict[str, dict] = {
    "swarm": {},
    "recompute": {"train_streams": False},
    "compression": {"compression": "blockwise8", "train_compression": True},
}
"""Trainers on the float32 swarm: the baseline (kept ``rpc_train`` graphs, no compression) and the
client-side switches, one at a time (``ClientConfig`` fields, passed through ``SwarmTrainer``)."""


class HopCounter:
    """Counts the hops a trainer opens as kept ``rpc_train`` streams, and how many of them asked for
    compression: whether a variant's switch reached the wire (``TrainStream.open`` wrapped while the
    benchmark runs)."""

    def __init__(self):
        self.kept = self.compressed = self.recomputed = 0

    @contextlib.contextmanager
    def installed(self):
        from stamen.rpc.train import TrainStream

        original = TrainStream.__dict__["open"]
        counter = self

        async def open_counted(cls, *args, **kwargs):
            counter.kept += 1
            counter.compressed += kwargs.get("compression") not in (None, "none")
            counter.recomputed += bool(kwargs.get("recompute"))
            return await original.__func__(cls, *args, **kwargs)

        TrainStream.open = classmethod(open_counted)
        try:
            yield self
        finally:
            TrainStream.open = original


def _server_args(settings: SwarmTrainSettings, compute_dtype: str) -> list[str]:
    args = ["--train", "--averaging", settings.swarm_averaging, "--rank", str(settings.rank),
            "--optimizer", settings.optimizer, "--lr", str(settings.lr), "--target-batch-size", str(settings.batch),
            "--compute-dtype", compute_dtype, "--matchmaking-time", str(settings.matchmaking_time),
            "--averaging-timeout", str(settings.averaging_timeout)]
    if settings.server_threads:
        args += ["--torch-threads", str(settings.server_threads)]
    return args


def _start_stages(swarm, model: str, settings: SwarmTrainSettings, spans: list[Span], compute_dtype: str,
                  num_blocks: int, say) -> None:
    from stamen.dht.records import ServerState
    from stamen.types import default_dht_prefix

    swarm.start_bootstrap()
    say(f"  starting {len(spans)} stages × {settings.peers_per_stage} `stamen server --train` ({compute_dtype}, "
        f"{settings.swarm_averaging}) on 127.0.0.1: {', '.join(map(str, spans))}")
    for span in spans:
        for _ in range(settings.peers_per_stage):
            swarm.add_server(model, span, *_server_args(settings, compute_dtype))

    def ready(records) -> bool:
        online = [(r.start, r.end) for r in records.values() if r.state == ServerState.ONLINE and r.stage]
        return all(online.count((s.start, s.end)) >= settings.peers_per_stage for s in spans)

    swarm.wait_for(default_dht_prefix(model), num_blocks, ready, f"{settings.peers_per_stage} online peers per stage",
                   timeout=900)


def _trainer(model: str, peers: list[str], settings: SwarmTrainSettings, switches: dict):
    from stamen.client.swarm_train import SwarmTrainer

    return SwarmTrainer(model, peers, microbatch=settings.microbatch, lr=settings.lr, optimizer=settings.optimizer,
                        averaging=settings.swarm_averaging, rank=settings.rank, sync=True,
                        matchmaking_time=settings.matchmaking_time,
                        averaging_timeout=settings.averaging_timeout, max_inflight=settings.inflight,
                        epoch_timeout=settings.epoch_timeout, request_timeout=900.0, **switches)


def _timed(step, ids: torch.Tensor) -> tuple[float, float]:
    start = time.perf_counter()
    result = step(ids)
    return time.perf_counter() - start, float(getattr(result, "loss", result))


class _Contenders:
    """Seconds per step and losses of every contender, and the hops of each swarm contender."""

    def __init__(self, tokens: int, say):
        self.tokens, self.say = tokens, say
        self.seconds: dict[str, list[float]] = {}
        self.losses: dict[str, list[float]] = {}
        self.hops: dict[str, dict[str, int]] = {}

    def run(self, name: str, step, ids: torch.Tensor) -> None:
        seconds, loss = _timed(step, ids)
        self.seconds.setdefault(name, []).append(seconds)
        self.losses.setdefault(name, []).append(loss)

    def local_steps(self, settings: SwarmTrainSettings, model: str, batches: list[torch.Tensor]) -> None:
        """The local contender's measured steps, in a process of its own that exits before the swarm
        starts (so its memory is the system's again, and no averager forks a copy of it)."""
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            seconds, losses = pool.apply(_local_contender, (model, settings.optimizer, settings.lr,
                                                            settings.microbatch, batches))
        self.seconds["local"], self.losses["local"] = seconds, losses
        self.say("    local: " + ", ".join(f"{self.tokens / s:.0f}" for s in seconds) + " tokens/s")

    def swarm_steps(self, name: str, trainer, batches: list[torch.Tensor]) -> None:
        """A warm-up step, then one measured step per batch."""
        counter = HopCounter()
        with counter.installed():
            _timed(trainer.train_step, batches[0])
            for i, ids in enumerate(batches[1:]):
                self.run(name, trainer.train_step, ids)
                self.say(f"    {name} step {i + 1}/{len(batches) - 1}: " + ", ".join(
                    f"{n} {self.tokens / v[-1]:.0f} tokens/s" for n, v in self.seconds.items()))
        self.hops[name] = {"kept_streams": counter.kept, "compressed_streams": counter.compressed,
                           "recomputed_streams": counter.recomputed}


def _local_contender(model: str, optimizer: str, lr: float, microbatch: int,
                     batches: list[torch.Tensor]) -> tuple[list[float], list[float]]:
    """A warm-up step, then one measured step per batch (seconds, losses)."""
    local = LocalTrainer(model, optimizer, lr, microbatch)
    _timed(local.train_step, batches[0])
    measured = [_timed(local.train_step, ids) for ids in batches[1:]]
    return [s for s, _ in measured], [loss for _, loss in measured]


def _applied(name: str, hops: dict[str, int]) -> bool:
    """Whether a variant's switch reached the wire (see ``HopCounter``)."""
    if name == "recompute":
        return hops["recomputed_streams"] > 0
    if name == "compression":
        return hops["compressed_streams"] > 0
    return True


def run_throughput(settings: SwarmTrainSettings, model: str, hf_config, workdir: Path, say) -> dict:
    from stamen.testing.swarm import LocalSwarm

    num_blocks, vocab = hf_config.num_hidden_layers, hf_config.vocab_size
    spans = even_spans(num_blocks, settings.stages)
    tokens = settings.batch * settings.seq_len
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, vocab, (settings.batch, settings.seq_len), generator=gen)
               for _ in range(settings.steps + 1)]
    c = _Contenders(tokens, say)
    variants = dict(VARIANTS) if settings.ablations else {"swarm": {}}
    # The local contender runs first, alone, in a process that exits before the swarm starts: the 4
    # training servers (each with its span's weights, accumulators, the averager's buffers and held
    # graphs), the trainer and a whole local model with its gradients do not fit in 24 GiB together at 246M.
    say("throughput: the local contender (transformers, float32), alone, in its own process ...")
    c.local_steps(settings, model, batches)
    with LocalSwarm(log_dir=workdir / "logs-float32") as swarm:
        _start_stages(swarm, model, settings, spans, "float32", num_blocks, say)
        for name, switches in variants.items():  # one trainer at a time: a step of one is a stage step
            say(f"  {name}: a trainer with {switches or 'the defaults'}")
            with _trainer(model, swarm.initial_peers, settings, switches) as trainer:
                c.swarm_steps(name, trainer, batches)
            time.sleep(3)  # the trainer's progress record expires before the next one starts at epoch 0
    if settings.ablations:
        with LocalSwarm(log_dir=workdir / "logs-bfloat16") as swarm:
            _start_stages(swarm, model, settings, spans, "bfloat16", num_blocks, say)
            with _trainer(model, swarm.initial_peers, settings, {}) as trainer:
                c.swarm_steps("bf16", trainer, batches)
    medians = {name: statistics.median(v) for name, v in c.seconds.items()}
    contenders = {}
    for name, secs in medians.items():
        contenders[name] = {"tokens_per_s": round(tokens / secs, 1), "seconds_per_step": round(secs, 3),
                            "over_local": round(medians["local"] / secs, 3),
                            "over_swarm": round(medians["swarm"] / secs, 3)}
        if name in c.hops:
            contenders[name] |= c.hops[name] | {"applied": _applied(name, c.hops[name])}
    return {"stages": settings.stages, "peers_per_stage": settings.peers_per_stage, "spans": [str(s) for s in spans],
            "batch": settings.batch, "seq_len": settings.seq_len, "microbatch": settings.microbatch,
            "tokens_per_step": tokens, "steps": settings.steps, "optimizer": settings.optimizer, "lr": settings.lr,
            "averaging": settings.swarm_averaging, "contenders": contenders,
            "raw_seconds_per_step": {k: [round(x, 3) for x in v] for k, v in c.seconds.items()},
            "losses": {k: [round(x, 4) for x in v] for k, v in c.losses.items()}}


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def run_swarm_train_bench(settings: SwarmTrainSettings, json_only: bool = False, out: Path | None = None) -> dict:
    from transformers import AutoConfig

    say = say_to(json_only)
    if sys.platform.startswith("linux") and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # namespaces and processes cleaned up
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="stamen-bench-swarm-train-"))
    model = settings.model
    if model is None and settings.throughput_part:
        say(f"creating a random {settings.preset} Llama (float32) ...")
        model = str(save_random_llama(workdir / f"llama-{settings.preset}", PRESETS[settings.preset],
                                      with_tokenizer=False))
    hf_config = AutoConfig.from_pretrained(model) if model else _preset_config(settings.preset)
    report: dict = {"model": model or f"random {settings.preset} Llama (shapes only)", "settings": asdict(settings),
                    "num_blocks": hf_config.num_hidden_layers, "hidden_size": hf_config.hidden_size}
    failed = True
    try:
        if settings.averaging_part:
            report["averaging"] = run_averaging(settings, hf_config, workdir, say)
        if settings.throughput_part:
            report["throughput"] = run_throughput(settings, model, hf_config, workdir, say)
        failed = False
    finally:
        if failed:
            say(f"the run failed: logs kept in {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    report["machine"] = machine_info()
    report["wall_s"] = round(time.monotonic() - started, 1)
    emit_report(report, swarm_train_markdown(report), out, "swarm_train", json_only)
    return report


def _preset_config(preset: str):
    from transformers import AutoConfig

    return AutoConfig.for_model("llama", **{"vocab_size": 512, **PRESETS[preset]})
