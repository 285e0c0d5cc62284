"""Where a server computes: long work runs off the event loop, so the server keeps answering."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from stamen import AutoDistributedModelForCausalLM
from stamen.client import loop
from stamen.rpc.calls import ping
from stamen.testing.models import save_random_llama
from stamen.testing.swarm import LocalSwarm
from stamen.types import Span, default_dht_prefix

pytestmark = pytest.mark.swarm


def test_pings_are_answered_during_a_long_forward(tmp_path):
    """One forward of about a second of compute on one thread (one request; its reply fits one
    stream message) and, meanwhile, pings from the same client: they come back at once while the
    forward still runs, and the forward's logits are those of a forward run alone."""
    model_dir = save_random_llama(tmp_path / "mid", dict(
        hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=2,
        num_hidden_layers=20, max_position_embeddings=2048, vocab_size=512))
    with LocalSwarm(log_dir=tmp_path / "logs") as swarm:
        swarm.start_bootstrap()
        swarm.add_server(model_dir, Span(0, 20), "--torch-threads", "1")
        swarm.wait_online(default_dht_prefix(str(model_dir)), 20)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(model_dir), initial_peers=swarm.initial_peers, request_timeout=120, sub_batch_tokens=8192)
        try:
            ids = torch.randint(3, 512, (1, 480), generator=torch.Generator().manual_seed(0))  # 0.94 MiB out
            small = ids[:1, :16]
            with torch.no_grad():
                alone = model(small).logits
            result: dict = {}

            def forward() -> None:
                start = time.perf_counter()
                with torch.no_grad():
                    result["logits"] = model(ids).logits
                result["seconds"] = time.perf_counter() - start
                result["done_at"] = time.perf_counter()

            peer = model.swarm.peer(next(iter(model.swarm.servers())).peer_id)
            worker = threading.Thread(target=forward)
            worker.start()
            answered = []
            while worker.is_alive():  # ping back to back for as long as the forward runs
                rtt = loop.run(ping(model.swarm.p2p, peer, timeout=5.0))
                answered.append((rtt, time.perf_counter()))
            worker.join()
        finally:
            model.shutdown()
    # No fixed sleep or wall-clock bound: the pings cover the whole forward, and each must come back
    # in well under half of its time (compute on the loop would hold the first ones for all of it).
    during = [(rtt, at) for rtt, at in answered if at < result["done_at"]]
    assert len(during) >= 5, answered
    assert all(rtt is not None for rtt, _ in during), answered
    slowest = max(rtt for rtt, _ in during)
    assert slowest < result["seconds"] / 2, (slowest, result["seconds"], answered)
    with torch.no_grad():
        assert torch.allclose(result["logits"][:1, :16], alone, atol=1e-4)  # causal: the prefix's logits
