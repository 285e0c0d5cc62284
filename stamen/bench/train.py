"""``stamen bench train``: training tokens/s through the swarm vs locally (transformers + peft), same
model, one run, for deep prompt tuning and LoRA; and peak client memory with LoRA vs LoRA-FA.

A step is forward + backward + an SGD update of the trained parameters (so the swarm pays for
uploading each new version of the LoRA weights, as in real training). Swarm contenders: the default
client (``train_streams``: servers keep each hop's graph inside one ``rpc_train`` call) and, with
``stateless``, one with ``train_streams=False`` (servers recompute the forward in ``rpc_backward``).
Contenders alternate run by run; medians are reported.
"""

from __future__ import annotations

import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from stamen.bench.harness import even_spans
from stamen.bench.report import TRAIN_MODES, train_table
from stamen.bench.timing import say_to
from stamen.client.model import AutoDistributedModelForCausalLM
from stamen.client.tuning import LoraSettings, lorafa_optimizer
from stamen.testing.finetune import causal_lm_loss, local_logits, local_model
from stamen.testing.models import PRESETS, save_random_llama
from stamen.testing.swarm import LocalSwarm
from stamen.types import default_dht_prefix

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _swarm_model(model: str, peers: list[str], mode: str, pre_seq_len: int, rank: int, sub_batch_tokens: int,
                 fa: bool = False, train_streams: bool = True):
    kwargs = dict(initial_peers=peers, sub_batch_tokens=sub_batch_tokens, request_timeout=600,
                  train_streams=train_streams)
    if mode == "deep_ptune":
        return AutoDistributedModelForCausalLM.from_pretrained(model, tuning_mode="deep_ptune",
                                                               pre_seq_len=pre_seq_len, **kwargs)
    lora = LoraSettings(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, fa=fa)
    return AutoDistributedModelForCausalLM.from_pretrained(model, lora=lora, **kwargs)


def _trained(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _swarm_step(model, ids: torch.Tensor, labels: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    _sgd(_trained(model))
    return time.perf_counter() - start


def _local_step(reference, prompts, ids: torch.Tensor, labels: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = causal_lm_loss(local_logits(reference, ids, None, prompts), labels)
    loss.backward()
    _sgd([p for p in reference.parameters() if p.requires_grad] + (list(prompts.parameters()) if prompts else []))
    return time.perf_counter() - start


@torch.no_grad()
def _sgd(params: list[torch.Tensor], lr: float = 1e-4) -> None:
    for p in params:
        if p.grad is not None:
            p.add_(p.grad, alpha=-lr)
            p.grad = None


def run_train_bench(model: str | None, num_servers: int, batch: int, seq_len: int, runs: int, rank: int,
                    pre_seq_len: int, sub_batch_tokens: int, json_only: bool, server_threads: int | None = None,
                    skip_memory: bool = False, stateless: bool = True) -> dict:
    say = say_to(json_only)
    workdir = Path(tempfile.mkdtemp(prefix="stamen-bench-train-"))
    if model is None:
        say("creating a random 246M-parameter Llama (float32) ...")
        model = str(save_random_llama(workdir / "llama-246m", PRESETS["246m"], with_tokenizer=False))
    hf_config = AutoConfig.from_pretrained(model)
    num_blocks, vocab = hf_config.num_hidden_layers, hf_config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    spans = even_spans(num_blocks, num_servers)
    swarms = ("swarm", "stateless") if stateless else ("swarm",)
    results: dict[str, list[float]] = {f"{c}_{m}_s": [] for m in TRAIN_MODES for c in ("local", *swarms)}
    say(f"starting a bootstrap peer and {num_servers} servers on 127.0.0.1: {', '.join(map(str, spans))}")
    with LocalSwarm(log_dir=workdir / "logs") as swarm:
        swarm.start_bootstrap()
        for span in spans:
            swarm.add_server(model, span, *(["--torch-threads", str(server_threads)] if server_threads else []))
        swarm.wait_online(default_dht_prefix(model), num_blocks)
        contenders = {}
        for mode in TRAIN_MODES:
            dmodel = _swarm_model(model, swarm.initial_peers, mode, pre_seq_len, rank, sub_batch_tokens)
            reference = local_model(model, dmodel.lora)
            prompts = None
            if dmodel.prompts is not None:
                prompts = copy.deepcopy(dmodel.prompts)
            dmodels = {"swarm": dmodel}
            if stateless:  # same initial weights: a copy of the trained parameters
                dmodels["stateless"] = other = _swarm_model(model, swarm.initial_peers, mode, pre_seq_len, rank,
                                                            sub_batch_tokens, train_streams=False)
                with torch.no_grad():
                    for a, b in zip(_trained(other), _trained(dmodel), strict=True):
                        a.copy_(b)
            contenders[mode] = (dmodels, reference, prompts)
        try:
            for dmodels, reference, prompts in contenders.values():  # warm-up
                _local_step(reference, prompts, ids, ids)
                for dmodel in dmodels.values():
                    _swarm_step(dmodel, ids, ids)
            for i in range(runs):
                for mode, (dmodels, reference, prompts) in contenders.items():
                    results[f"local_{mode}_s"].append(_local_step(reference, prompts, ids, ids))
                    for name, dmodel in dmodels.items():
                        results[f"{name}_{mode}_s"].append(_swarm_step(dmodel, ids, ids))
                    say(f"run {i + 1}/{runs} {mode}: " + ", ".join(
                        f"{c} {results[f'{c}_{mode}_s'][-1]:.2f} s/step" for c in ("local", *dmodels)))
        finally:
            for dmodels, _, _ in contenders.values():
                for dmodel in dmodels.values():
                    dmodel.shutdown()
        memory = {} if skip_memory else {
            name: _memory_probe(model, swarm.initial_peers, rank, sub_batch_tokens, batch, seq_len, fa)
            for name, fa in (("lora", False), ("lora_fa", True))}
    tokens = batch * seq_len
    summary: dict = {
        "model": model, "num_blocks": num_blocks, "servers": num_servers, "batch": batch, "seq_len": seq_len,
        "runs": runs, "lora_rank": rank, "lora_targets": LORA_TARGETS, "pre_seq_len": pre_seq_len,
        "sub_batch_tokens": sub_batch_tokens, "torch_threads": torch.get_num_threads(),
        "server_threads": server_threads,
    }
    for mode in TRAIN_MODES:
        local_s = statistics.median(results[f"local_{mode}_s"])
        summary[mode] = {"local_tokens_per_s": round(tokens / local_s, 1)}
        for name in swarms:
            swarm_s = statistics.median(results[f"{name}_{mode}_s"])
            summary[mode] |= {
                f"{name}_tokens_per_s": round(tokens / swarm_s, 1),
                f"{name}_over_local": round(local_s / swarm_s, 3),
                f"{name}_over_local_median_of_runs": round(statistics.median(
                    a / b for a, b in zip(results[f"local_{mode}_s"], results[f"{name}_{mode}_s"], strict=True)), 3),
            }
    summary["client_memory"] = memory
    summary["raw_seconds_per_step"] = {k: [round(v, 3) for v in vs] for k, vs in results.items()}
    if json_only:
        print(json.dumps(summary, indent=2))
    else:
        print(train_table(summary))
        print(json.dumps(summary), file=sys.stderr)
    return summary


def _memory_probe(model: str, peers: list[str], rank: int, sub_batch_tokens: int, batch: int, seq_len: int,
                  fa: bool) -> dict:
    """Peak RSS of a fresh client process training 2 LoRA (or LoRA-FA) steps with its optimizer."""
    code = (
        "import json, sys; from stamen.bench.train import memory_probe_main; "
        f"print(json.dumps(memory_probe_main({model!r}, {peers!r}, {rank}, {sub_batch_tokens}, {batch}, "
        f"{seq_len}, {fa})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_probe_main(model: str, peers: list[str], rank: int, sub_batch_tokens: int, batch: int, seq_len: int,
                      fa: bool) -> dict:
    dmodel = _swarm_model(model, peers, "lora", 0, rank, sub_batch_tokens, fa=fa)
    try:
        ids = torch.randint(3, dmodel.block_config.vocab_size, (batch, seq_len),
                            generator=torch.Generator().manual_seed(0))
        baseline = _rss_mb()
        opt = lorafa_optimizer(dmodel, lr=1e-4) if fa else torch.optim.AdamW(_trained(dmodel), lr=1e-4)
        for _ in range(2):
            opt.zero_grad()
            dmodel(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor))
        grads = sum(p.grad.numel() * p.grad.element_size() for p in dmodel.lora.tensors() if p.grad is not None)
        params = sum(p.numel() * p.element_size() for p in dmodel.lora.tensors())
        return {
            "peak_rss_mb": round(_peak_rss_mb(), 1),
            "rss_after_load_mb": round(baseline, 1),
            "training_overhead_mb": round(_peak_rss_mb() - baseline, 1),
            "lora_params_mb": round(params / 2**20, 2),
            "lora_grads_mb": round(grads / 2**20, 2),
            "optimizer_state_mb": round(state / 2**20, 2),
        }
    finally:
        dmodel.shutdown()


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM; ru_maxrss would include the parent's RSS at fork time)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
