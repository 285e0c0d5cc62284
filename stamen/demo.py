"""``make demo``: a bootstrap peer and 3 servers on 127.0.0.1 split a locally created Llama model,
and a client generates text through them, showing the route and the time per token."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from stamen.cli.main import setup_logging
from stamen.cli.streamer import TimedTextStreamer
from stamen.testing.models import PRESETS, save_random_llama
from stamen.testing.swarm import LocalSwarm
from stamen.types import Span

MODEL_DIR = Path("demo-model")


def main() -> None:
    setup_logging("WARNING")
    from transformers import AutoTokenizer

    from stamen.client.model import AutoDistributedModelForCausalLM
    from stamen.server.config import default_dht_prefix

    if not (MODEL_DIR / "config.json").exists():
        print(f"creating a small random Llama-architecture model in {MODEL_DIR}/ (nothing is downloaded)")
        save_random_llama(MODEL_DIR, PRESETS["small"])
    spans = [Span(0, 2), Span(2, 4), Span(4, 6)]
    with LocalSwarm(log_dir=Path(".stamen") / "demo-logs") as swarm:
        print("starting a bootstrap peer:", *swarm.start_bootstrap())
        for span in spans:
            print(f"starting a server for blocks {span}")
            swarm.add_server(MODEL_DIR, span)
        swarm.wait_online(default_dht_prefix(str(MODEL_DIR)), 6)
        print("all servers online; logs in", swarm.log_dir)
        tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
        model = AutoDistributedModelForCausalLM.from_pretrained(MODEL_DIR, initial_peers=swarm.initial_peers)
        prompt = "The swarm shares the work"
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        streamer = TimedTextStreamer(tokenizer)
        with model.inference_session(max_length=ids.shape[1] + 40) as session:
            print("route:", session.describe_route())
            sys.stdout.write(f"\n{prompt}")
            model.generate(ids, max_new_tokens=40, do_sample=True, top_k=40, temperature=0.8, streamer=streamer)
        print(f"\n\n{streamer.summary()} through 3 servers "
              "(random weights: the text is noise; see the tests for parity with transformers)")
        model.shutdown()
    print("swarm shut down cleanly")


if __name__ == "__main__":
    logging.captureWarnings(True)
    main()
