"""What the side-by-side benches share: their settings, how blocks are split over loopback servers,
and the :class:`Harness`, which creates the model, starts the swarm and loads every contender once
per run (``stamen bench inference`` / ``forward`` / ``suite``)."""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from stamen.bench.contenders import cpu_offloaded, disk_offloaded, load_all_blocks
from stamen.client.model import AutoDistributedModelForCausalLM
from stamen.testing.models import PRESETS, save_random_llama
from stamen.testing.swarm import LocalSwarm
from stamen.types import Span, default_dht_prefix


def even_spans(num_blocks: int, parts: int) -> list[Span]:
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return [Span(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


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
            self.blocks = load_all_blocks(s.model)
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
                self.offload, self.offload_files = disk_offloaded(s.model, self.workdir, self.num_blocks)
            if s.cpu_offload:
                self.cpu_offloaded = cpu_offloaded(s.model)
        except BaseException:
            self.close(failed=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def close(self, failed: bool = False) -> None:
        """Stop the swarm and remove the run's files; after a failure, keep the servers' logs: a
        rare failure can only be diagnosed from them."""
        try:
            self._stack.close()
        finally:
            logs = self.workdir / "logs"
            if failed and logs.is_dir() and any(logs.iterdir()):
                self.kept_logs = Path(tempfile.mkdtemp(prefix="stamen-bench-logs-")) / "logs"
                shutil.move(str(logs), self.kept_logs)
                print(f"the run failed: the swarm's logs are kept in {self.kept_logs}", file=sys.stderr, flush=True)
            shutil.rmtree(self.workdir, ignore_errors=True)

    def prompt(self, length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
        return torch.randint(3, self.vocab, (batch, length), generator=torch.Generator().manual_seed(seed))

    @property
    def block_weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.blocks.blocks.parameters())

    def header(self) -> dict:
        """The run's model, swarm and settings: the first keys of every report."""
        s = self.settings
        return {"model": s.model, "num_blocks": self.num_blocks, "hidden_size": self.hf_config.hidden_size,
                "vocab_size": self.vocab, "block_weight_bytes": self.block_weight_bytes, "servers": s.servers,
                "spans": [str(span) for span in self.spans], "settings": asdict(s)}
