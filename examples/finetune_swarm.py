"""Fine-tune a model through a local swarm: the blocks stay frozen on 3 server processes, the client
trains a LoRA adapter (or prompts) on a small text file shipped next to this script.

    .venv/bin/python examples/finetune_swarm.py                    # LoRA
    .venv/bin/python examples/finetune_swarm.py --mode deep_ptune  # prompts at every block
    .venv/bin/python examples/finetune_swarm.py --model DIR        # your own Llama-family model

Nothing is downloaded: without --model a small random Llama and its tokenizer are made locally (so
"before" is gibberish and "after" recites the notes it learnt). The script shows the loss falling
with a progress bar, generates before and after, saves the adapter (peft format) or the prompts
(safetensors), loads them into a fresh client and generates again.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from stamen import AutoDistributedModelForCausalLM
from stamen.client.tuning import LoraSettings
from stamen.models.lora import LORA_TARGETS
from stamen.testing.models import PRESETS, save_random_llama
from stamen.testing.swarm import LocalSwarm
from stamen.types import Span, default_dht_prefix

DATA = Path(__file__).parent / "data" / "swarm_notes.txt"


def batches(tokenizer, lines: list[str], batch_size: int, generator: torch.Generator):
    """Shuffled right-padded batches with labels (-100 on padding), forever."""
    while True:
        order = torch.randperm(len(lines), generator=generator).tolist()
        for i in range(0, len(order), batch_size):
            chunk = [tokenizer.bos_token + lines[j] + tokenizer.eos_token for j in order[i : i + batch_size]]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
            yield enc.input_ids, enc.attention_mask, labels


def complete(model, tokenizer, prompt: str, new_tokens: int = 24) -> str:
    ids = tokenizer(tokenizer.bos_token + prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Llama-family model directory (default: a small random one)")
    parser.add_argument("--mode", choices=["lora", "lora_fa", "ptune", "deep_ptune"], default="lora")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="stamen-finetune-"))
    model_dir = args.model or str(save_random_llama(workdir / "small-llama", PRESETS["small"]))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    lines = [line.strip() for line in DATA.read_text().splitlines() if line.strip()]
    num_blocks = PRESETS["small"]["num_hidden_layers"] if args.model is None else None

    with LocalSwarm(log_dir=workdir / "logs") as swarm:
        swarm.start_bootstrap()
        from transformers import AutoConfig

        num_blocks = num_blocks or AutoConfig.from_pretrained(model_dir).num_hidden_layers
        bounds = [round(i * num_blocks / 3) for i in range(4)]
        for a, b in zip(bounds, bounds[1:], strict=False):
            swarm.add_server(model_dir, Span(a, b), "--torch-threads", "1")
        print(f"starting 3 servers on 127.0.0.1 for {num_blocks} blocks ...")
        swarm.wait_online(default_dht_prefix(model_dir), num_blocks)

        if "ptune" in args.mode:
            tuning = dict(tuning_mode=args.mode, pre_seq_len=8)
        else:  # LoRA on every linear layer of every block
            tuning = dict(lora=LoraSettings(r=16, lora_alpha=32, target_modules=list(LORA_TARGETS),
                                            fa=args.mode == "lora_fa"))
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers, **tuning)
        prompt = lines[2][:24]
        print(f"before: {prompt!r} -> {complete(model, tokenizer, prompt)!r}")

        trained = [p for p in model.parameters() if p.requires_grad]
        print(f"training {sum(p.numel() for p in trained)} parameters on the client ({args.mode}); "
              f"{sum(p.numel() for p in model.parameters())} frozen client parameters, the blocks stay remote")
        if args.mode == "lora_fa":
            from stamen.client.tuning import lorafa_optimizer

            optimizer = lorafa_optimizer(model, lr=args.lr)
        else:
            optimizer = torch.optim.AdamW(trained, lr=args.lr)
        data = batches(tokenizer, lines, args.batch_size, torch.Generator().manual_seed(0))
        bar = tqdm(range(args.steps), desc="fine-tuning through the swarm", unit="step")
        first = None
        for _ in bar:
            ids, mask, labels = next(data)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            first = first if first is not None else loss.item()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        print(f"loss: {first:.3f} -> {loss.item():.3f}")
        print(f"after:  {prompt!r} -> {complete(model, tokenizer, prompt)!r}")

        saved = workdir / ("adapter" if model.lora is not None else "prompts.safetensors")
        if model.lora is not None:
            model.save_adapter(saved)
        else:
            model.save_prompts(saved)
        model.shutdown()
        fresh = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers)
        if saved.is_dir():
            fresh.load_adapter(saved)
        else:
            fresh.load_prompts(saved)
        print(f"saved to {saved}; a fresh client with it loaded: {complete(fresh, tokenizer, prompt)!r}")
        fresh.shutdown()


if __name__ == "__main__":
    main()
