"""``stamen chat``: a terminal chat over the swarm.

One inference session lives across turns: each turn's prompt is the whole conversation through the
chat template, and the session sends the servers only the tokens they have not seen. Ctrl-C stops
the current answer (the part already shown stays in the conversation); Ctrl-D or /exit quits.
"""

from __future__ import annotations

import signal
import sys
import threading

from stamen.api.engine import Engine, Event, SamplingParams, TextDelta
from stamen.client.session import InferenceSession


def _print_text(event: Event) -> None:
    if isinstance(event, TextDelta):
        sys.stdout.write(event.text)
        sys.stdout.flush()


def run_chat(model: str, initial_peers: list[str], *, max_new_tokens: int, max_length: int, temperature: float,
             top_p: float, seed: int | None, system: str | None, dht_prefix: str | None) -> None:
    from transformers import AutoTokenizer

    from stamen.client.model import AutoDistributedModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model)
    dmodel = AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers, dht_prefix=dht_prefix)
    try:
        _chat(dmodel, tokenizer, model, max_new_tokens=max_new_tokens, max_length=max_length,
              temperature=temperature, top_p=top_p, seed=seed, system=system)
    finally:
        dmodel.shutdown()


def _chat(dmodel, tokenizer, model: str, *, max_new_tokens: int, max_length: int, temperature: float, top_p: float,
          seed: int | None, system: str | None) -> None:
    engine = Engine(dmodel, tokenizer, model)
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    session = InferenceSession(dmodel.swarm, max_length)
    session.open()
    print(f"chatting with {model} through {session.describe_route()}", file=sys.stderr)
    print("Ctrl-C stops an answer; Ctrl-D or /exit quits.", file=sys.stderr)
    turn = 0
    try:
        while True:
            try:
                line = input("\nyou> ")
            except EOFError:
                break
            except KeyboardInterrupt:
                print("\n(Ctrl-D or /exit quits)", file=sys.stderr)
                continue
            if not line.strip():
                continue
            if line.strip() in ("/exit", "/quit"):
                break
            messages.append({"role": "user", "content": line})
            ids = engine.chat_prompt(messages)
            if len(ids) + max_new_tokens > session.max_length:
                session.close()
                session = InferenceSession(dmodel.swarm, max(session.max_length * 2, len(ids) + max_new_tokens))
                session.open()
                print(f"[the conversation outgrew the session: opened one of {session.max_length} tokens]",
                      file=sys.stderr)
            turn += 1
            answer = _answer(engine, session, ids, SamplingParams(
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                seed=None if seed is None else seed + turn))
            messages.append({"role": "assistant", "content": answer})
    finally:
        session.close()


def _answer(engine: Engine, session: InferenceSession, ids: list[int], params: SamplingParams) -> str:
    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    sent_before = session.sent_tokens
    sys.stdout.write("bot> ")
    sys.stdout.flush()
    try:
        done = engine.generate(ids, params, _print_text, cancel, session=session)
    finally:
        signal.signal(signal.SIGINT, previous)
    # every generated token but the last went through the servers as a step of its own
    sent = session.sent_tokens - sent_before - max(done.completion_tokens - 1, 0)
    rate = f", {1000 / done.ms_per_token:.1f} tokens/s" if done.ms_per_token > 0 else ""
    stopped = " (stopped)" if cancel.is_set() else ""
    print(f"\n[{done.completion_tokens} tokens{rate}{stopped}; prompt: sent {sent} new tokens to the servers, "
          f"{len(ids) - sent} reused from the session's cache]", file=sys.stderr)
    return done.text
