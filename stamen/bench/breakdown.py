"""Where the time goes: the analytic bound of offloading over host-to-device links (weight bytes /
bandwidth per token, projected to a Llama-2-70B shape, with the read rate measured here) and the
per-token breakdown of a swarm decode step (attention, MLP, norms, client head, serialization,
network wait), with the critical path measured from ``stamen.trace`` marks."""

from __future__ import annotations

import statistics
import time

import torch
from hivemind.proto import runtime_pb2

from stamen import trace
from stamen.bench.contenders import blocks_generate, swarm_generate
from stamen.bench.harness import Harness
from stamen.bench.timeline import critical_path
from stamen.bench.timing import median_or_nan, rounded
from stamen.models import KVCache, llama
from stamen.wire.messages import (
    PushTarget,
    Step,
    StepDone,
    decode_inference_reply,
    decode_inference_request,
    encode,
)
from stamen.wire.tensors import FLOAT_DTYPES, decode_tensor, encode_tensor

# --- the analytic bound of offloading over a link ---

LINKS = {  # effective bytes/s one can stream host -> device
    "PCIe 3.0 x16 (~12 GB/s)": 12e9,
    "PCIe 4.0 x16 (~25 GB/s)": 25e9,
    "PCIe 5.0 x16 (~50 GB/s)": 50e9,
    "H100 pinned host->device, measured (54.6 GB/s)": 54.6e9,
    "NVMe SSD (~3.5 GB/s)": 3.5e9,
}

LLAMA2_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8)


def block_params(hidden: int, intermediate: int, heads: int, kv_heads: int) -> int:
    head_dim = hidden // heads
    return hidden * (hidden + 2 * kv_heads * head_dim) + hidden * hidden + 3 * hidden * intermediate + 2 * hidden


def offload_bound(h: Harness | None = None, measured: dict | None = None) -> dict:
    """Seconds per token to stream every block's weights once over each link: a floor for offloading
    (decoding reads every weight once per token; batching amortises it, a single stream cannot)."""
    models = {}
    if h is not None:
        models[f"this model ({h.num_blocks} blocks, float32)"] = h.block_weight_bytes
    p70 = block_params(LLAMA2_70B["hidden_size"], LLAMA2_70B["intermediate_size"],
                       LLAMA2_70B["num_attention_heads"], LLAMA2_70B["num_key_value_heads"])
    models["Llama-2-70B shape (80 blocks, float16)"] = p70 * LLAMA2_70B["num_hidden_layers"] * 2
    table = {name: {"weight_gb": rounded(nbytes / 1e9, 3),
                    "ms_per_token": {link: rounded(1000 * nbytes / bw, 1) for link, bw in LINKS.items()}}
             for name, nbytes in models.items()}
    out = {"links_bytes_per_s": LINKS, "models": table}
    if measured:
        out["measured_on_this_machine"] = measured
    return out


def measured_stream_rate(h: Harness, decode: dict) -> dict | None:
    """What reading the weights cost the disk offload here, per token at the first prefix: warm
    offload minus ``cpu_offload`` (the same hooks without reads) and cold minus warm, as medians of
    the per-run differences, with the read rate they imply for the block weights."""
    raw = decode["prefixes"][str(h.settings.prefixes[0])]["raw_ms_per_token"]

    def diff(a: str, b: str) -> float | None:
        if a not in raw or b not in raw:
            return None
        return statistics.median(x - y for x, y in zip(raw[a], raw[b], strict=False))

    out = {}
    for name, (a, b) in {"warm_disk_offload_minus_cpu_offload": ("disk_offload", "cpu_offload"),
                         "cold_minus_warm_disk_offload": ("disk_offload_cold", "disk_offload")}.items():
        extra = diff(a, b)
        if extra is None:
            continue
        out[f"{name}_ms_per_token"] = rounded(extra, 1)
        if extra > 0:
            out[f"{name}_implied_gb_per_s"] = rounded(h.block_weight_bytes / (extra / 1000) / 1e9, 2)
    return out or None


# --- per-token breakdown of a swarm decode step ---


class _OpTimer:
    """Forward pre/post hooks that sum wall time per module kind (CPU ops are synchronous); the
    projections, which decoding steps may run through ``models.llama.project`` rather than the
    module's forward, are timed by wrapping that function while the timer is on."""

    def __init__(self, span_model):
        self.totals: dict[str, float] = {}
        self._starts: dict[int, float] = {}
        self._handles = []
        projections: dict[int, str] = {}
        for block in span_model.blocks:
            for name, module in (("block", block), ("input_norm", block.input_layernorm),
                                 ("post_norm", block.post_attention_layernorm), ("attention", block.self_attn),
                                 ("mlp", block.mlp)):
                self._handles.append(module.register_forward_pre_hook(self._pre))
                self._handles.append(module.register_forward_hook(self._post(name)))
            projections[id(block.self_attn.qkv_proj)] = projections[id(block.self_attn.o_proj)] = "attn_proj"
        self._llama, self._project = llama, llama.project

        def timed_project(linear, x):
            start = time.perf_counter()
            out = self._project(linear, x)
            name = projections.get(id(linear), "other_proj")
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start
            return out

        llama.project = timed_project

    def _pre(self, module, args) -> None:
        self._starts[id(module)] = time.perf_counter()

    def _post(self, name: str):
        def hook(module, args, output) -> None:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - self._starts[id(module)]
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._llama.project = self._project


@torch.inference_mode()
def block_op_times(h: Harness, prefix: int, steps: int) -> dict[str, float]:
    """ms per decode step of the in-process blocks, split by op kind (hooks around our own modules)."""
    cfg = h.blocks.config
    cache = KVCache(cfg, h.num_blocks, 1, prefix + steps + 1, torch.float32)
    hidden = torch.randn(1, prefix, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    h.blocks.step(hidden, cache)
    x = hidden[:, :1]
    timer = _OpTimer(h.blocks)
    total = 0.0
    try:
        for _ in range(steps):
            start = time.perf_counter()
            h.blocks.step(x, cache)
            total += time.perf_counter() - start
    finally:
        timer.remove()
    t = {k: 1000 * v / steps for k, v in timer.totals.items()}
    step_ms = 1000 * total / steps
    return {
        "attention_projections": t["attn_proj"],
        "attention_core": t["attention"] - t["attn_proj"],  # rope, cache write, SDPA, reshapes
        "mlp": t["mlp"],
        "norms": t["input_norm"] + t["post_norm"],
        "other": step_ms - t["attention"] - t["mlp"] - t["input_norm"] - t["post_norm"],  # residuals, rotary, masks
        "step": step_ms,
    }


def serialization_ms(hidden_size: int, reps: int = 300) -> dict[str, float]:
    """ms to encode, serialize, parse and decode one decode-step message of each kind (B=1, T=1)."""
    hidden = torch.randn(1, 1, hidden_size)
    push = [PushTarget(peer_id="12D3KooW" + "x" * 44, session_id="f" * 32)]

    def step_request() -> None:  # client (or a pushing server) -> server
        msg = Step(session_id="a" * 32, step_id=7, position=130, has_attention_mask=False, has_position_ids=False,
                   has_hypo_ids=False, push_to=push)
        wire = runtime_pb2.ExpertRequest(metadata=encode(msg), tensors=[encode_tensor(hidden)]).SerializeToString()
        req = runtime_pb2.ExpertRequest.FromString(wire)
        decode_inference_request(req.metadata)
        decode_tensor(req.tensors[0], "hidden_states", FLOAT_DTYPES, 1 << 20)

    def step_reply() -> None:  # server -> client
        msg = StepDone(session_id="a" * 32, step_id=7, position=131, compute_ms=12.5)
        wire = runtime_pb2.ExpertResponse(metadata=encode(msg), tensors=[encode_tensor(hidden)]).SerializeToString()
        resp = runtime_pb2.ExpertResponse.FromString(wire)
        decode_inference_reply(resp.metadata)
        decode_tensor(resp.tensors[0], "output", FLOAT_DTYPES, 1 << 20)

    out = {}
    for name, fn in (("request", step_request), ("reply", step_reply)):
        for _ in range(20):
            fn()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        out[name] = 1000 * (time.perf_counter() - start) / reps
    return out


def run_breakdown(h: Harness, decode: dict | None = None) -> dict:
    """Where one swarm decode step's time goes, at the first prefix.

    Servers' compute is what they report (``StepDone.compute_ms``), split into attention, MLP and
    norms in the proportions our blocks show in-process; serialization is the measured cost of one
    message times the messages of a token (per hop a request and a reply, plus a push per hop but
    the last); the client's part (embeddings, final norm, LM head, argmax) is timed in-process;
    network wait is what is left of the step."""
    s = h.settings
    prefix = s.prefixes[0]
    trace.enable(str(h.trace_dir))
    trace.set_role("client")
    try:
        clock, compute = swarm_generate(h.dmodel, h.prompt(prefix, seed=99), s.breakdown_tokens)
    finally:
        trace.disable()
    path = critical_path(_server_marks(h), h.spans)
    step_ms = median_or_nan(clock.gaps_ms())
    server_ms = median_or_nan(compute)
    ops = block_op_times(h, prefix, s.breakdown_tokens)
    b = blocks_generate(h.blocks, h.dmodel, h.prompt(prefix, seed=99), s.breakdown_tokens)
    client_ms = b["head_ms"]
    ser = serialization_ms(h.blocks.config.hidden_size)
    hops = len(h.spans)
    messages = {"request": hops + (hops - 1), "reply": hops}  # push: hops-1 extra step messages
    ser_ms = sum(ser[k] * n for k, n in messages.items())
    scale = server_ms / ops["step"]
    parts = {
        "attention: q/k/v and o projections (servers)": ops["attention_projections"] * scale,
        "attention: RoPE, cache write, SDPA (servers)": ops["attention_core"] * scale,
        "MLP (servers)": ops["mlp"] * scale,
        "norms (servers)": ops["norms"] * scale,
        "other block ops: residual adds, rotary, masks (servers)": ops["other"] * scale,
        "client: embeddings, final norm, LM head, argmax": client_ms,
        "serialization (client and servers)": ser_ms,
    }
    parts["network wait (libp2p on loopback, process wake-ups, scheduling)"] = step_ms - sum(parts.values())
    return {
        "prefix": prefix, "tokens": s.breakdown_tokens, "step_ms": rounded(step_ms),
        "server_compute_ms": rounded(server_ms), "in_process_block_ops_ms": {k: rounded(v, 3) for k, v in ops.items()},
        "serialization_ms_per_message": {k: rounded(v, 4) for k, v in ser.items()}, "messages_per_token": messages,
        "parts_ms": {k: rounded(v) for k, v in parts.items()},
        "parts_percent": {k: rounded(100 * v / step_ms, 1) for k, v in parts.items()},
        "critical_path": path,
    }


def _server_marks(h: Harness, timeout: float = 10.0) -> list:
    """The merged marks once every server has written those of the breakdown's last step (servers
    write their marks when a session closes)."""
    roles = {f"server{span.start}" for span in h.spans}
    deadline = time.monotonic() + timeout
    while True:
        events = trace.load(str(h.trace_dir))
        last_step = max((t for t, role, name, _ in events if role == "client" and name == "c.step"), default=0)
        if roles <= {role for t, role, _, _ in events if t > last_step} or time.monotonic() > deadline:
            return events
        time.sleep(0.2)
