"""``stamen bench inference`` / ``forward`` / ``suite``: the swarm side by side with local runs and offloading.

One process runs every contender on the same model and machine, interleaved run by run:

- **local**: transformers ``generate`` / forward of the whole model in this process;
- **swarm**: ``AutoDistributedModelForCausalLM`` over loopback servers (a bootstrap peer plus
  ``servers`` processes, blocks split evenly);
- **blocks**: our own blocks in this process with an in-place KV cache, the pure compute the
  swarm's servers do; timed alone and with the client's part (embeddings, final norm, LM head,
  argmax) as a greedy loop of its own, just before and just after the swarm in each run (the mean
  of the two counts);
- **offload**: transformers + accelerate with every decoder layer offloaded to disk
  (``device_map`` "disk"): accelerate's hooks read each layer's weights from the safetensors file
  at every forward. With the file in the page cache ("warm") that is a memory copy; "cold" drops
  the file's pages (``posix_fadvise(DONTNEED)``) before every token, as if weights came from disk.
  ``cpu_offload``: accelerate's hooks with execution device CPU (weights in RAM; on a machine
  without a GPU this measures the hooks only).

Plus the analytic bound of offloading over GPU links (weight bytes / bandwidth per token) and a
per-token breakdown of a swarm decode step (attention, MLP, norms, client head, serialization,
network wait). ``run_suite`` writes everything as one JSON and one Markdown file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from stamen import trace
from stamen.bench.timeline import critical_path
from stamen.testing.models import PRESETS, save_random_llama
from stamen.testing.swarm import LocalSwarm
from stamen.types import Span


class TokenClock:
    """A transformers-style streamer that timestamps every new token (``put``); ``times[0]`` is the
    prompt, put before any compute. ``on_put`` runs after the timestamp (e.g. to drop the page
    cache); its own time is excluded from the next gap."""

    def __init__(self, on_put: Callable[[], float | None] | None = None):
        self.times: list[float] = []
        self.starts: list[float] = []
        self.on_put = on_put
        self.extra: list[float] = []
        """What ``on_put`` returned at every put (e.g. the servers' compute so far)."""

    def put(self, value) -> None:
        now = time.perf_counter()
        self.times.append(now)
        if self.on_put is not None:
            self.extra.append(self.on_put())
        self.starts.append(time.perf_counter())

    def end(self) -> None:
        pass

    def gaps_ms(self) -> list[float]:
        """Time of every decode step after the first token (prefill excluded)."""
        return [1000 * (b - a) for a, b in zip(self.starts[1:], self.times[2:], strict=False)]

    def ms_per_token(self) -> float:
        """The median decode step (robust to the spikes of a shared machine)."""
        return statistics.median(self.gaps_ms())

    def first_token_ms(self) -> float:
        return 1000 * (self.times[1] - self.starts[0])


def even_spans(num_blocks: int, parts: int) -> list[Span]:
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return [Span(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def _load_all_blocks(model_dir: str):
    from stamen.models import BlockConfig, load_config, load_span, open_checkpoint

    config = BlockConfig.from_hf(load_config(model_dir))
    return load_span(open_checkpoint(model_dir), config, Span(0, config.num_blocks), torch.float32, progress=False)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _r(x: float, digits: int = 2) -> float:
    return round(x, digits)


# --- settings ---


@dataclass
class BenchSettings:
    model: str | None = None
    """A model directory; None: a random Llama of ``preset`` created for the run."""
    preset: str = "246m"
    servers: int = 3
    prefixes: list[int] = field(default_factory=lambda: [128, 2048])
    """Prompt lengths (positions in the cache when decoding starts)."""
    new_tokens: int = 32
    runs: int = 3
    offload: bool = True
    offload_tokens: int = 8
    """New tokens per offload run (each streams every block's weights)."""
    cold_tokens: int = 4
    """New tokens of the cold-disk offload run (first prefix only; 0 skips it)."""
    cpu_offload: bool = True
    push_off: bool = False
    """Also time a swarm client with server-to-server push off."""
    forward_shapes: list[tuple[int, int]] = field(default_factory=lambda: [(1, 128), (64, 16)])
    """(batch, sequence length) of the forward benchmark."""
    forward_runs: int = 3
    breakdown_tokens: int = 32
    server_env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables of the server processes (experiments)."""

    @classmethod
    def quick(cls, model: str | None = None, preset: str = "small") -> BenchSettings:
        return cls(model=model, preset=preset, prefixes=[16, 64], new_tokens=4, runs=1, offload_tokens=2,
                   cold_tokens=2, forward_shapes=[(1, 16), (4, 8)], forward_runs=1, breakdown_tokens=4)


# --- the contenders, loaded once per process ---


class Harness:
    """The model, a running loopback swarm and every contender, shared by the benchmarks of one run."""

    def __init__(self, settings: BenchSettings, say: Callable[[str], None]):
        self.settings, self.say = settings, say
        self.workdir = Path(tempfile.mkdtemp(prefix="stamen-bench-"))
        self.trace_dir = self.workdir / "trace"
        self._stack = contextlib.ExitStack()
        self.kept_logs: Path | None = None
        """Where the servers' logs went after a failed run (None: removed with the run)."""

    def __enter__(self) -> Harness:
        from transformers import AutoModelForCausalLM

        from stamen.client.model import AutoDistributedModelForCausalLM
        from stamen.types import default_dht_prefix

        s = self.settings
        try:
            if s.model is None:
                self.say(f"creating a random {s.preset} Llama (float32) ...")
                # long enough for a prefix of 2048 plus the new tokens (RoPE itself has no limit)
                overrides = dict(PRESETS[s.preset], max_position_embeddings=max(4096, max(s.prefixes) * 2))
                s.model = str(save_random_llama(self.workdir / f"llama-{s.preset}", overrides, with_tokenizer=False))
            self.model = s.model
            self.local = AutoModelForCausalLM.from_pretrained(s.model, dtype=torch.float32).eval()
            self.hf_config = self.local.config
            self.num_blocks = self.hf_config.num_hidden_layers
            self.vocab = self.hf_config.vocab_size
            self.blocks = _load_all_blocks(s.model)
            self.spans = even_spans(self.num_blocks, s.servers)
            self.say(f"starting a bootstrap peer and {s.servers} servers on 127.0.0.1: "
                     f"{', '.join(map(str, self.spans))}")
            env = {"STAMEN_TRACE_DIR": str(self.trace_dir), **s.server_env}  # the breakdown's step timeline
            swarm = self._stack.enter_context(LocalSwarm(log_dir=self.workdir / "logs", env=env))
            swarm.start_bootstrap()
            for span in self.spans:
                swarm.add_server(s.model, span)
            swarm.wait_online(default_dht_prefix(s.model), self.num_blocks)
            self.swarm = swarm
            self.dmodel = AutoDistributedModelForCausalLM.from_pretrained(s.model, initial_peers=swarm.initial_peers,
                                                                          request_timeout=600)
            self._stack.callback(self.dmodel.shutdown)
            self.nopush = None
            if s.push_off:
                self.nopush = AutoDistributedModelForCausalLM.from_pretrained(
                    s.model, initial_peers=swarm.initial_peers, use_push=False, request_timeout=600)
                self._stack.callback(self.nopush.shutdown)
            self.offload = self.cpu_offloaded = None
            self.offload_files: list[Path] = []
            if s.offload:
                self.offload, self.offload_files = self._disk_offloaded(s.model)
            if s.cpu_offload:
                self.cpu_offloaded = self._cpu_offloaded(s.model)
        except BaseException:
            self.close(failed=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def close(self, failed: bool = False) -> None:
        """Stop the swarm and remove the run's files; after a failure, keep the servers' logs (a
        failure seen once in a suite could not be diagnosed because its logs went with the run)."""
        try:
            self._stack.close()
        finally:
            logs = self.workdir / "logs"
            if failed and logs.is_dir() and any(logs.iterdir()):
                self.kept_logs = Path(tempfile.mkdtemp(prefix="stamen-bench-logs-")) / "logs"
                shutil.move(str(logs), self.kept_logs)
                print(f"the run failed: the swarm's logs are kept in {self.kept_logs}", file=sys.stderr, flush=True)
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _disk_offloaded(self, model: str):
        """transformers + accelerate with every decoder layer on "disk": read from a private copy of
        the checkpoint (so dropping its page cache never touches the file the servers read)."""
        from transformers import AutoModelForCausalLM

        copy = self.workdir / "offload-checkpoint"
        shutil.copytree(model, copy)
        device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                      **{f"model.layers.{i}": "disk" for i in range(self.num_blocks)}}
        folder = self.workdir / "offload-folder"
        offloaded = AutoModelForCausalLM.from_pretrained(copy, dtype=torch.float32, device_map=device_map,
                                                         offload_folder=folder).eval()
        files = sorted(copy.glob("*.safetensors")) + sorted(folder.glob("*.dat"))
        return offloaded, files

    def _cpu_offloaded(self, model: str):
        from accelerate import cpu_offload
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        cpu_offload(m, execution_device=torch.device("cpu"))
        return m

    def prompt(self, length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
        return torch.randint(3, self.vocab, (batch, length), generator=torch.Generator().manual_seed(seed))

    @property
    def block_weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.blocks.blocks.parameters())


# --- page cache ---


def drop_page_cache(files: list[Path]) -> float:
    """Ask the kernel to drop the files' pages from the page cache; returns the seconds it took."""
    start = time.perf_counter()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return time.perf_counter() - start


def warm_page_cache(files: list[Path]) -> None:
    """Read the files once so that their pages are in the page cache (this machine also evicts page
    cache that nobody touched for a while)."""
    for path in files:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def _read_bytes() -> int:
    """Bytes this process made the kernel fetch from storage (page-cache misses), /proc/self/io."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


# --- decoding ---


def _generate(model, prompt: torch.Tensor, new_tokens: int, clock: TokenClock, session=None) -> None:
    settings = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        if session is None:
            model.generate(prompt, streamer=clock, **settings)
        else:
            model.generate(prompt, streamer=clock, session=session, **settings)


def _swarm_generate(dmodel, prompt: torch.Tensor, new_tokens: int) -> tuple[TokenClock, list[float]]:
    """Generate through the swarm; returns the clock and the servers' reported compute ms per decode
    step: their mean, once per step (servers of a push chain hold their replies and send a few at
    once, so the replies in by a token's time do not tell that token's compute)."""
    with dmodel.inference_session(max_length=prompt.shape[1] + new_tokens, batch_size=prompt.shape[0]) as session:
        clock = TokenClock(on_put=lambda: sum(h.stream.server_compute_ms for h in session._hops))
        _generate(dmodel, prompt, new_tokens, clock, session=session)
        session.settle()
        total = sum(h.stream.server_compute_ms for h in session._hops)
    steps = len(clock.extra) - 2  # the decoding steps after the first token (the prompt's step)
    return clock, [(total - clock.extra[1]) / steps] * steps if steps > 0 else []


@torch.inference_mode()
def _blocks_generate(h: Harness, prompt: torch.Tensor, new_tokens: int) -> dict[str, float]:
    """A greedy loop with our blocks in-process: embeddings -> blocks (KV cache) -> norm -> LM head ->
    argmax. Returns ms per token with and without the client's part, and time to first token."""
    from stamen.models import KVCache

    d = h.dmodel
    cache = KVCache(h.blocks.config, h.num_blocks, prompt.shape[0], prompt.shape[1] + new_tokens + 1, torch.float32)
    start = time.perf_counter()
    hidden = h.blocks.step(d.embed_tokens(prompt), cache)
    token = d.decode_logits(d.norm(hidden[:, -1])).argmax(-1)
    ttft = time.perf_counter() - start
    blocks_s, total_s = [], []
    for _ in range(new_tokens - 1):
        t0 = time.perf_counter()
        x = d.embed_tokens(token[:, None])
        t1 = time.perf_counter()
        hidden = h.blocks.step(x, cache)
        t2 = time.perf_counter()
        token = d.decode_logits(d.norm(hidden[:, -1])).argmax(-1)
        t3 = time.perf_counter()
        blocks_s.append(t2 - t1)
        total_s.append(t3 - t0)
    return {"blocks_ms": 1000 * statistics.median(blocks_s), "blocks_head_ms": 1000 * statistics.median(total_s),
            "head_ms": 1000 * statistics.median(t - b for t, b in zip(total_s, blocks_s, strict=True)),
            "ttft_ms": 1000 * ttft}


DECODE_CONTENDERS = ("local", "swarm", "swarm_push_off", "blocks", "blocks_head", "disk_offload", "cpu_offload",
                     "disk_offload_cold")


def run_decode(h: Harness) -> dict:
    """Steps/s, ms/token and time to first token at every prefix, contenders interleaved run by run."""
    s = h.settings
    raw: dict[int, dict[str, dict[str, list[float]]]] = {
        p: {c: {"ms": [], "ttft_ms": []} for c in DECODE_CONTENDERS} for p in s.prefixes}
    server_compute: dict[int, list[float]] = {p: [] for p in s.prefixes}
    offload_io: dict[str, list[float]] = {"warm_read_mb_per_token": [], "cold_read_mb_per_token": [],
                                          "cold_drop_ms": []}

    def record(prefix: int, name: str, ms: float, ttft: float) -> None:
        raw[prefix][name]["ms"].append(ms)
        raw[prefix][name]["ttft_ms"].append(ttft)

    loads: list[float] = []
    h.say("warming up ...")
    warm = h.prompt(8)
    for m in (h.local, h.dmodel, h.nopush, h.offload, h.cpu_offloaded):
        if m is not None:
            _generate(m, warm, 3, TokenClock())
    _blocks_generate(h, warm, 3)
    for run in range(s.runs):
        for prefix in s.prefixes:
            prompt = h.prompt(prefix, seed=run)
            clock = TokenClock()
            _generate(h.local, prompt, s.new_tokens, clock)
            record(prefix, "local", clock.ms_per_token(), clock.first_token_ms())
            # the in-process blocks run just before and just after the swarm, and count as the mean
            # of the two: on a shared machine whose speed drifts within seconds, the swarm / blocks
            # ratio of a run then compares the swarm with the machine's speed around it
            before = _blocks_generate(h, prompt, s.new_tokens)
            clock, compute = _swarm_generate(h.dmodel, prompt, s.new_tokens)
            record(prefix, "swarm", clock.ms_per_token(), clock.first_token_ms())
            server_compute[prefix].append(statistics.mean(compute))
            after = _blocks_generate(h, prompt, s.new_tokens)
            b = {k: (before[k] + after[k]) / 2 for k in before}
            record(prefix, "blocks", b["blocks_ms"], b["ttft_ms"])
            record(prefix, "blocks_head", b["blocks_head_ms"], b["ttft_ms"])
            if h.nopush is not None:
                clock, _ = _swarm_generate(h.nopush, prompt, s.new_tokens)
                record(prefix, "swarm_push_off", clock.ms_per_token(), clock.first_token_ms())
            # offloading is slow: every run at the first prefix, only the first run at the others
            offload_now = prefix == s.prefixes[0] or run == 0
            if h.offload is not None and offload_now:
                warm_page_cache(h.offload_files)
                clock = TokenClock()
                before = _read_bytes()
                _generate(h.offload, prompt, s.offload_tokens, clock)
                offload_io["warm_read_mb_per_token"].append((_read_bytes() - before) / 2**20 / s.offload_tokens)
                record(prefix, "disk_offload", clock.ms_per_token(), clock.first_token_ms())
                if s.cold_tokens and prefix == s.prefixes[0]:
                    drops = [drop_page_cache(h.offload_files)]
                    clock = TokenClock(on_put=lambda drops=drops: drops.append(drop_page_cache(h.offload_files)))
                    before = _read_bytes()
                    _generate(h.offload, prompt, s.cold_tokens, clock)
                    offload_io["cold_read_mb_per_token"].append((_read_bytes() - before) / 2**20 / s.cold_tokens)
                    offload_io["cold_drop_ms"].append(1000 * statistics.mean(drops))
                    # the first gap starts after the prompt's drop: clock.starts[0] is taken after it
                    record(prefix, "disk_offload_cold", clock.ms_per_token(), clock.first_token_ms())
            if h.cpu_offloaded is not None and offload_now:
                clock = TokenClock()
                _generate(h.cpu_offloaded, prompt, s.offload_tokens, clock)
                record(prefix, "cpu_offload", clock.ms_per_token(), clock.first_token_ms())
            r = raw[prefix]
            loads.append(round(os.getloadavg()[0], 2))
            h.say(f"run {run + 1}/{s.runs} prefix {prefix} (load {loads[-1]}): "
                  f"local {r['local']['ms'][-1]:.1f} ms/token, "
                  f"swarm {r['swarm']['ms'][-1]:.1f} (servers computed {server_compute[prefix][-1]:.1f}), "
                  f"blocks {r['blocks']['ms'][-1]:.1f} (+head {r['blocks_head']['ms'][-1]:.1f})"
                  + (f", disk offload {r['disk_offload']['ms'][-1]:.0f}" if r["disk_offload"]["ms"] else "")
                  + (f" (cold {r['disk_offload_cold']['ms'][-1]:.0f})" if r["disk_offload_cold"]["ms"] else "")
                  + (f", cpu_offload {r['cpu_offload']['ms'][-1]:.1f}" if r["cpu_offload"]["ms"] else ""))

    out: dict = {"prefixes": {}, "offload_io": {k: _r(_median(v), 1) for k, v in offload_io.items() if v}}
    for prefix in s.prefixes:
        r = raw[prefix]
        row: dict = {}
        for name, vals in r.items():
            if not vals["ms"]:
                continue
            ms = _median(vals["ms"])
            row[name] = {"ms_per_token": _r(ms), "steps_per_s": _r(1000 / ms, 3),
                         "time_to_first_token_ms": _r(_median(vals["ttft_ms"]), 1)}

        def ratio(a: str, b: str, r: dict = r) -> dict | None:
            if not r[a]["ms"] or not r[b]["ms"]:
                return None
            per_run = [x / y for x, y in zip(r[a]["ms"], r[b]["ms"], strict=False)]
            return {"of_medians": _r(_median(r[a]["ms"]) / _median(r[b]["ms"]), 3),
                    "median_of_runs": _r(_median(per_run), 3), "per_run": [_r(x, 3) for x in per_run]}

        ratios = {"swarm_over_local": ratio("swarm", "local"), "swarm_over_blocks": ratio("swarm", "blocks"),
                  "swarm_over_blocks_with_head": ratio("swarm", "blocks_head"),
                  "local_over_blocks_with_head": ratio("local", "blocks_head"),
                  "disk_offload_over_swarm": ratio("disk_offload", "swarm"),
                  "disk_offload_cold_over_swarm": ratio("disk_offload_cold", "swarm"),
                  "cpu_offload_over_local": ratio("cpu_offload", "local"),
                  "swarm_push_off_over_local": ratio("swarm_push_off", "local")}
        out["prefixes"][str(prefix)] = {
            "contenders": row, "ratios": {k: v for k, v in ratios.items() if v is not None},
            "swarm_server_compute_ms_per_token": _r(_median(server_compute[prefix])),
            "raw_ms_per_token": {k: [_r(x) for x in v["ms"]] for k, v in r.items() if v["ms"]},
            "raw_ttft_ms": {k: [_r(x, 1) for x in v["ttft_ms"]] for k, v in r.items() if v["ttft_ms"]},
            "raw_server_compute_ms": [_r(x) for x in server_compute[prefix]],
        }
    out["load_average_1min_after_each_prefix"] = loads
    out["new_tokens"] = s.new_tokens
    out["offload_tokens"] = s.offload_tokens
    out["cold_tokens"] = s.cold_tokens
    return out


# --- forward (stateless, no cache: the rpc_forward path) ---


def run_forward(h: Harness) -> dict:
    """Tokens/s of one forward (logits for every position) at each (batch, length), interleaved."""
    s = h.settings
    contenders: list[tuple[str, object]] = [("local", h.local), ("swarm", h.dmodel)]
    if h.offload is not None:
        contenders.append(("disk_offload", h.offload))
    out: dict = {}
    with torch.no_grad():
        for m in (m for _, m in contenders):  # warm-up
            m(h.prompt(4))
        raw = {shape: {name: [] for name, _ in contenders} for shape in s.forward_shapes}
        for run in range(s.forward_runs):
            for shape in s.forward_shapes:
                ids = h.prompt(shape[1], batch=shape[0], seed=run)
                for name, m in contenders:
                    start = time.perf_counter()
                    m(ids)
                    raw[shape][name].append(time.perf_counter() - start)
                h.say(f"forward run {run + 1}/{s.forward_runs} batch {shape[0]} × {shape[1]}: " + ", ".join(
                    f"{name} {shape[0] * shape[1] / raw[shape][name][-1]:.0f} tokens/s" for name, _ in contenders))
    for shape, r in raw.items():
        tokens = shape[0] * shape[1]
        entry: dict = {"batch": shape[0], "seq_len": shape[1], "tokens": tokens}
        for name, secs in r.items():
            entry[name] = {"tokens_per_s": _r(tokens / _median(secs), 1), "seconds": _r(_median(secs), 3)}
        entry["swarm_over_local"] = _r(_median(r["local"]) / _median(r["swarm"]), 3)
        entry["swarm_over_local_per_run"] = [_r(a / b, 3) for a, b in zip(r["local"], r["swarm"], strict=True)]
        if "disk_offload" in r:
            entry["swarm_over_disk_offload"] = _r(_median(r["disk_offload"]) / _median(r["swarm"]), 3)
        entry["raw_seconds"] = {k: [_r(x, 3) for x in v] for k, v in r.items()}
        out[f"{shape[0]}x{shape[1]}"] = entry
    return out


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
    table = {name: {"weight_gb": _r(nbytes / 1e9, 3),
                    "ms_per_token": {link: _r(1000 * nbytes / bw, 1) for link, bw in LINKS.items()}}
             for name, nbytes in models.items()}
    out = {"links_bytes_per_s": LINKS, "models": table}
    if measured:
        out["measured_on_this_machine"] = measured
    return out


# --- per-token breakdown of a swarm decode step ---


class _OpTimer:
    """Forward pre/post hooks that sum wall time per module kind (CPU ops are synchronous); the
    projections, which decoding steps may run through ``models.llama.project`` rather than the
    module's forward, are timed by wrapping that function while the timer is on."""

    def __init__(self, span_model):
        from stamen.models import llama

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
    from stamen.models import KVCache

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
    from hivemind.proto import runtime_pb2

    from stamen.wire.messages import (
        PushTarget,
        Step,
        StepDone,
        decode_inference_reply,
        decode_inference_request,
        encode,
    )
    from stamen.wire.tensors import FLOAT_DTYPES, decode_tensor, encode_tensor

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
        clock, compute = _swarm_generate(h.dmodel, h.prompt(prefix, seed=99), s.breakdown_tokens)
    finally:
        trace.disable()
    path = critical_path(_server_marks(h), h.spans)
    step_ms = _median(clock.gaps_ms())
    server_ms = _median(compute)
    ops = block_op_times(h, prefix, s.breakdown_tokens)
    b = _blocks_generate(h, h.prompt(prefix, seed=99), s.breakdown_tokens)
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
        "prefix": prefix, "tokens": s.breakdown_tokens, "step_ms": _r(step_ms),
        "server_compute_ms": _r(server_ms), "in_process_block_ops_ms": {k: _r(v, 3) for k, v in ops.items()},
        "serialization_ms_per_message": {k: _r(v, 4) for k, v in ser.items()}, "messages_per_token": messages,
        "parts_ms": {k: _r(v) for k, v in parts.items()},
        "parts_percent": {k: _r(100 * v / step_ms, 1) for k, v in parts.items()},
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


# --- entry points ---


def _say_to(json_only: bool) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if not json_only:
            print(msg, file=sys.stderr, flush=True)
    return say


def _machine() -> dict:
    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average_at_end": [round(x, 2) for x in load], "cuda": torch.cuda.is_available()}


def _header(h: Harness) -> dict:
    s = h.settings
    return {"model": s.model, "num_blocks": h.num_blocks, "hidden_size": h.hf_config.hidden_size, "vocab_size": h.vocab,
            "block_weight_bytes": h.block_weight_bytes, "servers": s.servers,
            "spans": [str(span) for span in h.spans], "settings": asdict(s)}


def run_inference_bench(settings: BenchSettings, json_only: bool = False, forward: bool = False,
                        breakdown: bool = True) -> dict:
    say = _say_to(json_only)
    with Harness(settings, say) as h:
        report = {**_header(h), "decode": run_decode(h)}
        if forward:
            report["forward"] = run_forward(h)
        if breakdown:
            report["breakdown"] = run_breakdown(h)
        report["offload_bound"] = offload_bound(h, _measured_stream_rate(h, report["decode"]))
    report["machine"] = _machine()
    _emit(report, json_only)
    return report


def run_forward_bench(settings: BenchSettings, json_only: bool = False) -> dict:
    say = _say_to(json_only)
    with Harness(settings, say) as h:
        report = {**_header(h), "forward": run_forward(h)}
    report["machine"] = _machine()
    _emit(report, json_only)
    return report


def run_suite(settings: BenchSettings, out_dir: Path, train: bool = False, train_runs: int = 3,
              json_only: bool = False) -> dict:
    """Inference (prefixes, offload, bound, breakdown) and forward on one swarm; training (optional)
    with ``stamen.bench.train`` on its own swarm of the same model. Writes suite.json and suite.md."""
    say = _say_to(json_only)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with Harness(settings, say) as h:
        report = {**_header(h), "decode": run_decode(h)}
        report["forward"] = run_forward(h)
        report["breakdown"] = run_breakdown(h)
        report["offload_bound"] = offload_bound(h, _measured_stream_rate(h, report["decode"]))
        if train:
            from stamen.bench.train import run_train_bench

            say("training (stamen.bench.train) ...")
            quick = settings.runs == 1
            report["train"] = run_train_bench(
                model=h.model, num_servers=settings.servers, batch=2 if quick else 8, seq_len=16 if quick else 128,
                runs=1 if quick else train_runs, rank=8, pre_seq_len=4 if quick else 16, sub_batch_tokens=512,
                json_only=True, skip_memory=True, stateless=False)
    report["machine"] = _machine()
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    (out_dir / "suite.json").write_text(json.dumps(report, indent=2))
    (out_dir / "suite.md").write_text(markdown(report) + "\n")
    _emit(report, json_only)
    say(f"wrote {out_dir / 'suite.json'} and {out_dir / 'suite.md'} in {report['wall_seconds']} s")
    return report


def _measured_stream_rate(h: Harness, decode: dict) -> dict | None:
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
        out[f"{name}_ms_per_token"] = _r(extra, 1)
        if extra > 0:
            out[f"{name}_implied_gb_per_s"] = _r(h.block_weight_bytes / (extra / 1000) / 1e9, 2)
    return out or None


def _emit(report: dict, json_only: bool) -> None:
    if json_only:
        print(json.dumps(report, indent=2))
    else:
        print(markdown(report))
        print(json.dumps(report), file=sys.stderr)


# --- Markdown ---

_NAMES = {
    "local": "local transformers `generate`",
    "swarm": "swarm ({servers} loopback servers)",
    "swarm_push_off": "swarm, push off",
    "blocks": "our blocks in-process (pure compute)",
    "blocks_head": "our blocks in-process + client head (embeddings, norm, LM head, argmax)",
    "disk_offload": "transformers + accelerate, layers offloaded to disk (page cache warm)",
    "disk_offload_cold": "the same, page cache dropped before every token (cold disk)",
    "cpu_offload": "transformers + accelerate `cpu_offload` (execution device CPU: hooks only)",
}


def markdown(report: dict) -> str:
    lines: list[str] = []
    servers = report.get("servers")
    if "decode" in report:
        d = report["decode"]
        lines += [f"### Decoding ({report['num_blocks']} blocks, greedy, {d['new_tokens']} new tokens; offload "
                  f"contenders {d['offload_tokens']}, cold {d['cold_tokens']}; medians of "
                  f"{report['settings']['runs']} interleaved runs)", ""]
        for prefix, p in d["prefixes"].items():
            c, r = p["contenders"], p["ratios"]
            swarm_ms = c["swarm"]["ms_per_token"]
            lines += [f"Prefix {prefix}:", "",
                      "| contender | ms/token | steps/s | time to first token ms | vs swarm |",
                      "|---|---:|---:|---:|---:|"]
            for name, v in c.items():
                lines.append(f"| {_NAMES[name].format(servers=servers)} | {v['ms_per_token']:.1f} | "
                             f"{v['steps_per_s']:.2f} | {v['time_to_first_token_ms']:.0f} | "
                             f"{v['ms_per_token'] / swarm_ms:.2f}× |")
            lines.append("")
            for key, v in r.items():
                lines.append(f"- {key.replace('_', ' ')}: {v['of_medians']:.3f} (median of per-run ratios "
                             f"{v['median_of_runs']:.3f}; runs {', '.join(f'{x:.2f}' for x in v['per_run'])})")
            lines += [f"- servers' reported compute per swarm token: {p['swarm_server_compute_ms_per_token']:.1f} ms",
                      ""]
        if d.get("offload_io"):
            lines += ["Offload reads from storage (`/proc/self/io` read_bytes, MB per token): " + ", ".join(
                f"{k} {v}" for k, v in d["offload_io"].items()), ""]
    if "forward" in report:
        lines += ["### Forward (no cache, logits for every position; `model(ids)`)", "",
                  "| batch × length | tokens | local tokens/s | swarm tokens/s | swarm / local | "
                  "disk offload tokens/s | swarm / offload |", "|---|---:|---:|---:|---:|---:|---:|"]
        for f in report["forward"].values():
            off = f.get("disk_offload")
            lines.append(f"| {f['batch']} × {f['seq_len']} | {f['tokens']} | {f['local']['tokens_per_s']:.0f} | "
                         f"{f['swarm']['tokens_per_s']:.0f} | {f['swarm_over_local']:.2f} | "
                         + (f"{off['tokens_per_s']:.0f} | {f['swarm_over_disk_offload']:.2f}× |" if off else "– | – |"))
        lines.append("")
    if "offload_bound" in report:
        b = report["offload_bound"]
        links = list(b["links_bytes_per_s"])
        lines += ["### Offloading bound: block weights / link bandwidth, ms per token", "",
                  "| model | weights GB | " + " | ".join(links) + " |", "|---|---:|" + "---:|" * len(links)]
        for name, m in b["models"].items():
            lines.append(f"| {name} | {m['weight_gb']:.2f} | " + " | ".join(
                f"{m['ms_per_token'][link]:.0f}" for link in links) + " |")
        if b.get("measured_on_this_machine"):
            lines += ["", "Measured here: " + ", ".join(f"{k} {v}" for k, v in b["measured_on_this_machine"].items())]
        lines.append("")
    if "breakdown" in report:
        br = report["breakdown"]
        lines += [f"### Where a swarm decode step goes (prefix {br['prefix']}, {br['tokens']} tokens, "
                  f"step {br['step_ms']:.1f} ms, servers' reported compute {br['server_compute_ms']:.1f} ms)", "",
                  "| part | ms/token | % |", "|---|---:|---:|"]
        for name, ms in br["parts_ms"].items():
            lines.append(f"| {name} | {ms:.2f} | {br['parts_percent'][name]:.1f} |")
        lines.append("")
        path = br.get("critical_path", {})
        if path.get("steps"):
            lines += [f"Measured critical path (`stamen/trace.py` marks in the client and every server, one "
                      f"clock; medians over {path['steps']} decoding steps):", "", "| part | ms |", "|---|---:|"]
            lines += [f"| {name} | {ms:.2f} |" for name, ms in path["parts_ms"].items()]
            lines += [f"| **{name}** | **{ms:.2f}** |" for name, ms in path["totals_ms"].items()]
            lines.append("")
    if "train" in report:
        from stamen.bench.train import _table as train_table

        lines += ["### Training (`stamen.bench.train`)", "", train_table(report["train"]), ""]
    if "machine" in report:
        m = report["machine"]
        lines.append(f"Machine: {m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
                     f"load average at the end {m['load_average_at_end']}.")
    return "\n".join(lines)
