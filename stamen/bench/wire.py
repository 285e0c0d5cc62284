"""``stamen bench wire``: bytes on the wire per token per hop, and the accuracy cost of compressing
activations (``--compression blockwise8``), through a real swarm on 127.0.0.1.

For each server dtype a swarm of ``servers`` loopback servers is started (server default: no
compression). Clients then ask for ``none`` or ``blockwise8`` per request (``ClientConfig.compression``):

- **bytes**: a session prefills a prompt and decodes ``new_tokens`` tokens one step each; the
  client's counters (``InferenceSession.hop_counters``: protobuf ``ByteSize`` of every message it
  sent to / received from each hop) give bytes per decoding step per hop, and the servers'
  ``InfoReply.push_bytes`` the bytes of each server-to-server push;
- **accuracy**: the reference is greedy decoding without compression at the same dtype; the
  compressed client is teacher-forced on the reference tokens (logits compared position by
  position: max abs error, error relative to the largest logit, top-1 agreement), then decodes
  freely (tokens equal to the reference, first divergence); and perplexity of a local text
  (``examples/data/swarm_notes.txt``) through stateless forwards (``rpc_forward``), both ways.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from stamen.client import loop
from stamen.client.model import AutoDistributedModelForCausalLM
from stamen.models import BlockConfig, load_config
from stamen.models.convert import default_model_dir
from stamen.rpc.calls import call_info
from stamen.testing.models import PRESETS, save_random_llama
from stamen.testing.swarm import LocalSwarm
from stamen.types import Span, default_dht_prefix

PROMPT = "The swarm shares the work of one large model. Each server holds"
TEXT = Path(__file__).resolve().parents[2] / "examples" / "data" / "swarm_notes.txt"
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _spans(num_blocks: int, parts: int) -> list[Span]:
    edges = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return [Span(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]


def _push_totals(model) -> tuple[int, int]:
    infos = [loop.run(call_info(model.swarm.p2p, model.swarm.peer(s.peer_id), 30))
             for s in model.swarm.servers(refresh=True)]
    return sum(i.push_messages for i in infos), sum(i.push_bytes for i in infos)


def _decode(model, prompt: torch.Tensor, new_tokens: int, forced: torch.Tensor | None = None):
    """Prefill then ``new_tokens`` single-token steps (greedy, or the ``forced`` tokens): the logits
    of every step (new_tokens, vocab), the tokens fed, per-hop counters of the decoding steps, the
    push traffic meanwhile, and ms per decoding step."""
    logits, tokens = [], []
    with torch.no_grad(), model.inference_session(prompt.shape[1] + new_tokens + 1) as session:
        last = model.step_logits(session, prompt)
        before = session.hop_counters()
        pushes_before = _push_totals(model)
        start = time.perf_counter()
        for i in range(new_tokens):
            logits.append(last[0].float())
            token = int(last[0].argmax()) if forced is None else int(forced[i])
            tokens.append(token)
            last = model.step_logits(session, torch.tensor([[token]]))
        elapsed = time.perf_counter() - start
        session.settle()  # the replies that servers of the push chain still hold
        counters = [after - b for after, b in zip(session.hop_counters(), before, strict=True)]
        route = [str(h.blocks) for h in session.route]
    pushes = [a - b for a, b in zip(_push_totals(model), pushes_before, strict=True)]
    return torch.stack(logits), torch.tensor(tokens), counters, pushes, route, 1000 * elapsed / new_tokens


def _perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


def _bytes_row(counters, pushes, steps: int, hidden: int, dtype: str) -> dict:
    per_hop = [dict(sent=c.bytes_sent / steps, received=c.bytes_received / steps,
                    messages_sent=c.messages_sent / steps, messages_received=c.messages_received / steps)
               for c in counters]
    push_messages, push_bytes = pushes
    return dict(
        activation_bytes_uncompressed=hidden * ELEMENT_BYTES[dtype],
        per_hop=per_hop,
        received_per_hop=sum(h["received"] for h in per_hop) / len(per_hop),
        sent_hop0=per_hop[0]["sent"],
        sent_later_hops=sum(h["sent"] for h in per_hop[1:]) / max(1, len(per_hop) - 1),
        push_bytes_per_message=push_bytes / push_messages if push_messages else None,
        push_messages_per_step=push_messages / steps,
        client_bytes_per_token=sum(h["sent"] + h["received"] for h in per_hop),
    )


def _accuracy(logits: torch.Tensor, ref_logits: torch.Tensor, free_tokens: torch.Tensor,
              ref_tokens: torch.Tensor) -> dict:
    err = (logits - ref_logits).abs()
    same = free_tokens == ref_tokens
    return dict(
        logits_max_abs_error=err.max().item(),
        logits_mean_abs_error=err.mean().item(),
        logits_relative_error=(err.max() / ref_logits.abs().max()).item(),
        teacher_forced_top1_agreement=(logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
        free_greedy_same_tokens=int(same.sum()),
        free_greedy_first_divergence=int((~same).nonzero()[0]) if not bool(same.all()) else None,
    )


def _run_dtype(model_dir: str, dtype: str, num_servers: int, new_tokens: int, prompt: torch.Tensor,
               text_ids: torch.Tensor | None, workdir: Path, float32_ref: dict | None) -> list[dict]:
    """Rows for none and blockwise8 at this dtype; with ``float32_ref`` (the float32 reference's
    logits, tokens and perplexity) also a yardstick row: this dtype without compression against float32."""
    config = BlockConfig.from_hf(load_config(model_dir))
    rows = []
    with LocalSwarm(log_dir=workdir / f"logs-{dtype}") as swarm:
        swarm.start_bootstrap()
        for span in _spans(config.num_blocks, num_servers):
            swarm.add_server(model_dir, span, "--dtype", dtype, "--torch-threads", "1", "--throughput", "100")
        swarm.wait_online(default_dht_prefix(model_dir), config.num_blocks)
        clients = {c: AutoDistributedModelForCausalLM.from_pretrained(
            model_dir, initial_peers=swarm.initial_peers, request_timeout=300, compression=c,
            torch_dtype=torch.float32) for c in ("none", "blockwise8")}
        try:
            _say(f"[{dtype}] reference: greedy without compression")
            ref_logits, ref_tokens, counters, pushes, route, ms = _decode(clients["none"], prompt, new_tokens)
            ref_ppl = _perplexity(clients["none"], text_ids) if text_ids is not None else None
            rows.append(dict(dtype=dtype, compression="none", route=route, ms_per_token=ms,
                             bytes=_bytes_row(counters, pushes, new_tokens, config.hidden_size, dtype),
                             perplexity=ref_ppl, reference=dict(logits=ref_logits, tokens=ref_tokens)))
            if float32_ref is not None and dtype != "float32":
                _say(f"[{dtype}] yardstick: no compression, teacher-forced on the float32 reference tokens")
                logits, *_ = _decode(clients["none"], prompt, new_tokens, forced=float32_ref["tokens"])
                rows.append(dict(dtype=dtype, compression="none, vs float32", yardstick=True,
                                 **_accuracy(logits, float32_ref["logits"], ref_tokens, float32_ref["tokens"]),
                                 perplexity=ref_ppl, reference_perplexity=float32_ref["perplexity"]))
            model = clients["blockwise8"]
            _say(f"[{dtype}] blockwise8: teacher-forced on the reference tokens")
            logits, _, counters, pushes, route, ms = _decode(model, prompt, new_tokens, forced=ref_tokens)
            _say(f"[{dtype}] blockwise8: free greedy decoding")
            _, free_tokens, _, _, _, _ = _decode(model, prompt, new_tokens)
            rows.append(dict(
                dtype=dtype, compression="blockwise8", route=route, ms_per_token=ms,
                bytes=_bytes_row(counters, pushes, new_tokens, config.hidden_size, dtype),
                **_accuracy(logits, ref_logits, free_tokens, ref_tokens),
                perplexity=_perplexity(model, text_ids) if text_ids is not None else None,
                reference_perplexity=ref_ppl,
            ))
        finally:
            for c in clients.values():
                c.shutdown()
    return rows


def _markdown(report: dict) -> str:
    lines = [f"Model: {report['model']} (hidden {report['hidden_size']}, {report['num_blocks']} blocks, "
             f"{report['servers']} servers); {report['new_tokens']} decoding steps after a "
             f"{report['prompt_tokens']}-token prompt; bytes are protobuf sizes per decoding step.", "",
             "| server dtype | compression | hidden bytes (uncompressed) | hop → client | client → hop 0 | "
             "client → later hops | server → server push | client total / token |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        if "bytes" not in r:
            continue
        b = r["bytes"]
        push = f"{b['push_bytes_per_message']:.0f}" if b["push_bytes_per_message"] else "–"
        lines.append(f"| {r['dtype']} | {r['compression']} | {b['activation_bytes_uncompressed']} | "
                     f"{b['received_per_hop']:.0f} | {b['sent_hop0']:.0f} | {b['sent_later_hops']:.0f} | {push} | "
                     f"{b['client_bytes_per_token']:.0f} |")
    lines += ["", "Accuracy: blockwise8 against no compression at the same dtype (teacher-forced on the reference's "
              "greedy tokens; free greedy decoding compared token by token); the yardstick row is bfloat16 "
              "against float32, both uncompressed.", "",
              "| server dtype | compared | max abs logit error | relative to max logit | mean abs error | "
              "top-1 agreement (teacher-forced) | free greedy: same tokens | perplexity reference → compared |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        if "logits_max_abs_error" not in r:
            continue
        ppl = f"{r['reference_perplexity']:.3f} → {r['perplexity']:.3f}" if r["perplexity"] else "–"
        div = r["free_greedy_first_divergence"]
        lines.append(f"| {r['dtype']} | {r['compression'].replace('none, vs float32', 'none vs float32 none')} | "
                     f"{r['logits_max_abs_error']:.4f} | {r['logits_relative_error']:.2%} | "
                     f"{r['logits_mean_abs_error']:.5f} | {r['teacher_forced_top1_agreement']:.1%} | "
                     f"{r['free_greedy_same_tokens']}/{report['new_tokens']}"
                     f"{'' if div is None else f' (first differs at {div})'} | {ppl} |")
    return "\n".join(lines)


def run_wire_bench(model: str | None, preset: str | None, num_servers: int, new_tokens: int,
                   dtypes: list[str], json_only: bool) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="stamen-bench-wire-"))
    if preset is not None:
        model_dir = str(save_random_llama(workdir / f"llama-{preset}", PRESETS[preset], with_tokenizer=False))
        name = f"random Llama ({preset})"
    else:
        model_dir = model or str(default_model_dir())
        name = Path(model_dir).name
    config = BlockConfig.from_hf(load_config(model_dir))
    text_ids = None
    if (Path(model_dir) / "tokenizer_config.json").exists() or (Path(model_dir) / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
        text_ids = tokenizer(TEXT.read_text(), return_tensors="pt").input_ids
    else:  # a random model without a tokenizer: random ids (no perplexity)
        prompt = torch.randint(3, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    rows: list[dict] = []
    float32_ref = None
    for dtype in sorted(dtypes, key=lambda d: d != "float32"):  # float32 first: the yardstick's reference
        rows += _run_dtype(model_dir, dtype, num_servers, new_tokens, prompt, text_ids, workdir, float32_ref)
        if dtype == "float32":
            float32_ref = dict(rows[-2]["reference"], perplexity=rows[-2]["perplexity"])
    for r in rows:
        r.pop("reference", None)
    report = dict(model=name, hidden_size=config.hidden_size, num_blocks=config.num_blocks, servers=num_servers,
                  new_tokens=new_tokens, prompt_tokens=prompt.shape[1],
                  text_tokens=None if text_ids is None else text_ids.shape[1],
                  torch=torch.__version__, rows=rows)
    if json_only:
        print(json.dumps(report, indent=2))
    else:
        print(_markdown(report))
        print()
        print(json.dumps(report, indent=2))
    return report
