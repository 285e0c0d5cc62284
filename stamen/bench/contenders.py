"""The contenders timed side by side, and how each one is loaded and run:

- **local**: transformers ``generate`` / forward of the whole model in this process;
- **swarm**: ``AutoDistributedModelForCausalLM`` over loopback servers;
- **blocks**: our own blocks in this process with an in-place KV cache (the pure compute the
  swarm's servers do), alone and with the client's part (embeddings, final norm, LM head, argmax);
- **offload**: transformers + accelerate with every decoder layer offloaded to disk (its page
  cache warm or dropped before every token) or ``cpu_offload`` (execution device CPU).
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from accelerate import cpu_offload
from transformers import AutoModelForCausalLM

from stamen.bench.timing import TokenClock
from stamen.models import BlockConfig, KVCache, load_config, load_span, open_checkpoint
from stamen.types import Span

# --- loading ---


def load_all_blocks(model_dir: str):
    """Every block of the checkpoint as one span model, float32, in this process."""
    config = BlockConfig.from_hf(load_config(model_dir))
    return load_span(open_checkpoint(model_dir), config, Span(0, config.num_blocks), torch.float32, progress=False)


def disk_offloaded(model: str, workdir: Path, num_blocks: int):
    """transformers + accelerate with every decoder layer on "disk": read from a private copy of
    the checkpoint (so dropping its page cache never touches the file the servers read). Returns
    the model and the files its weights are read from."""
    copy = workdir / "offload-checkpoint"
    shutil.copytree(model, copy)
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "disk" for i in range(num_blocks)}}
    folder = workdir / "offload-folder"
    offloaded = AutoModelForCausalLM.from_pretrained(copy, dtype=torch.float32, device_map=device_map,
                                                     offload_folder=folder).eval()
    files = sorted(copy.glob("*.safetensors")) + sorted(folder.glob("*.dat"))
    return offloaded, files


def cpu_offloaded(model: str):
    """transformers + accelerate's ``cpu_offload`` hooks, execution device CPU."""
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    cpu_offload(m, execution_device=torch.device("cpu"))
    return m


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


def read_bytes() -> int:
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


def generate(model, prompt: torch.Tensor, new_tokens: int, clock: TokenClock, session=None) -> None:
    """Greedy ``generate`` of ``new_tokens`` tokens, timed by ``clock``."""
    settings = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        if session is None:
            model.generate(prompt, streamer=clock, **settings)
        else:
            model.generate(prompt, streamer=clock, session=session, **settings)


def swarm_generate(dmodel, prompt: torch.Tensor, new_tokens: int) -> tuple[TokenClock, list[float]]:
    """Generate through the swarm; returns the clock and the servers' reported compute ms per decode
    step: their mean, once per step (servers of a push chain hold their replies and send a few at
    once, so the replies in by a token's time do not tell that token's compute)."""
    with dmodel.inference_session(max_length=prompt.shape[1] + new_tokens, batch_size=prompt.shape[0]) as session:
        clock = TokenClock(on_put=lambda: sum(h.stream.server_compute_ms for h in session._hops))
        generate(dmodel, prompt, new_tokens, clock, session=session)
        session.settle()
        total = sum(h.stream.server_compute_ms for h in session._hops)
    steps = len(clock.extra) - 2  # the decoding steps after the first token (the prompt's step)
    return clock, [(total - clock.extra[1]) / steps] * steps if steps > 0 else []


@torch.inference_mode()
def blocks_generate(blocks, client, prompt: torch.Tensor, new_tokens: int) -> dict[str, float]:
    """A greedy loop with our ``blocks`` in-process and the ``client``'s part (a distributed model's
    embeddings, final norm and LM head): embeddings -> blocks (KV cache) -> norm -> LM head -> argmax.
    Returns ms per token with and without the client's part, and time to first token."""
    d = client
    num_blocks = blocks.config.num_blocks
    cache = KVCache(blocks.config, num_blocks, prompt.shape[0], prompt.shape[1] + new_tokens + 1, torch.float32)
    start = time.perf_counter()
    hidden = blocks.step(d.embed_tokens(prompt), cache)
    token = d.decode_logits(d.norm(hidden[:, -1])).argmax(-1)
    ttft = time.perf_counter() - start
    blocks_s, total_s = [], []
    for _ in range(new_tokens - 1):
        t0 = time.perf_counter()
        x = d.embed_tokens(token[:, None])
        t1 = time.perf_counter()
        hidden = blocks.step(x, cache)
        t2 = time.perf_counter()
        token = d.decode_logits(d.norm(hidden[:, -1])).argmax(-1)
        t3 = time.perf_counter()
        blocks_s.append(t2 - t1)
        total_s.append(t3 - t0)
    return {"blocks_ms": 1000 * statistics.median(blocks_s), "blocks_head_ms": 1000 * statistics.median(total_s),
            "head_ms": 1000 * statistics.median(t - b for t, b in zip(total_s, blocks_s, strict=True)),
            "ttft_ms": 1000 * ttft}
