"""Servers batch the inference steps of concurrent sessions (``server/batching.py``), with fair shares
per peer: real processes on 127.0.0.1.

Dedicated swarm: a 4-block float32 Llama (hidden 256) on A[0:2) and B[2:4), both batching, at most
4 sessions per peer (``--max-peer-sessions 4``) and iterations of at most 64 rows (prefills run in
chunks). Two client peers: a plain model and a tuned one (deep prompts and a LoRA adapter). Tests
that kill a server start their own; A and B stay up, so every test passes alone and in any order.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
import torch

from stamen import AutoDistributedModelForCausalLM
from stamen.bench.timing import run_together
from stamen.client import loop
from stamen.client.session import InferenceSession
from stamen.client.tuning import LoraSettings
from stamen.dht.records import ServerState, fetch_servers
from stamen.errors import ServerBusyError
from stamen.rpc.calls import call_info
from stamen.testing.models import TRAINED_SPREAD, save_random_llama
from stamen.testing.scores import generate_with_scores
from stamen.testing.swarm import LocalSwarm
from stamen.types import Span

pytestmark = pytest.mark.swarm

CONFIG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=4096, **TRAINED_SPREAD)
SERVER_ARGS = ("--torch-threads", "1", "--max-peer-sessions", "4", "--max-batch-tokens", "64")
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def batch_swarm(tmp_path_factory):
    path = str(save_random_llama(tmp_path_factory.mktemp("batch") / "llama-batch", CONFIG))
    with LocalSwarm(log_dir=tmp_path_factory.mktemp("batch-logs")) as swarm:
        swarm.start_bootstrap()
        for span in (Span(0, 2), Span(2, 4)):
            swarm.add_server(path, span, *SERVER_ARGS)
        swarm.wait_online("llama-batch", 4)
        plain = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                request_timeout=30, full_wait=0.5)
        tuned = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers, tuning_mode="deep_ptune", pre_seq_len=3,
            lora=LoraSettings(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
            request_timeout=30)
        torch.manual_seed(0)
        with torch.no_grad():
            for t in [*tuned.lora.tensors(), tuned.prompts.prompt_embeddings, tuned.prompts.deep_prompts]:
                t.normal_(0, 0.1)
        yield swarm, path, plain, tuned
        plain.shutdown()
        tuned.shutdown()


def _prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 200, (1, length), generator=torch.Generator().manual_seed(seed))


def _batch_stats(swarm, model) -> dict[str, tuple[int, int, int]]:
    """(iterations, steps, chunks) of every server of the model, by peer id."""
    peers = fetch_servers(swarm.client_dht(), model.swarm.model_name, 4)
    stats = {}
    for peer in peers:
        info = loop.run(call_info(model.swarm.p2p, model.swarm.peer(peer), timeout=10))
        stats[peer] = (info.batch_iterations, info.batch_steps, info.batch_chunks)
    return stats


def test_concurrent_sessions_batch_and_give_their_own_tokens(batch_swarm):
    """8 sessions of two peers (4 plain, 4 with deep prompts and LoRA), prompts of 3 to 40 tokens:
    run together, each gives the tokens and logits it gives alone, and the servers batched them."""
    swarm, _, plain, tuned = batch_swarm
    jobs = [(plain, _prompt(n, i)) for i, n in enumerate((3, 9, 17, 40))] + \
           [(tuned, _prompt(n, 10 + i)) for i, n in enumerate((5, 12, 2, 25))]
    alone = [generate_with_scores(model, ids, max_new_tokens=NEW_TOKENS) for model, ids in jobs]
    before = _batch_stats(swarm, plain)
    together = run_together([lambda m=m, ids=ids: generate_with_scores(m, ids, max_new_tokens=NEW_TOKENS)
                              for m, ids in jobs])
    after = _batch_stats(swarm, plain)
    for (tokens, logits), (tokens_alone, logits_alone) in zip(together, alone, strict=True):
        assert torch.equal(tokens, tokens_alone)
        torch.testing.assert_close(logits, logits_alone, rtol=1e-4, atol=1e-4)
    means = {}
    for peer, (iterations, steps, _) in after.items():
        done_iterations, done_steps = iterations - before[peer][0], steps - before[peer][1]
        assert done_steps >= 8 * NEW_TOKENS  # every step of the 8 sessions went through the batcher
        means[peer] = done_steps / done_iterations
    # steps that arrive together run together; on this tiny model a step computes in about a
    # millisecond, so most still arrive alone (``stamen bench concurrency`` measures real batches)
    assert min(means.values()) > 1.0 and sum(means.values()) / len(means) > 1.1, means


def test_a_peer_over_its_share_is_told_busy_while_others_generate(batch_swarm):
    """The plain model's peer holds its 4 sessions; a fifth gets the typed busy error (with a retry
    hint), while the tuned model's sessions on the same servers generate their usual tokens."""
    _, _, plain, tuned = batch_swarm
    ids = _prompt(6, 42)
    expected = tuned.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    sessions = [InferenceSession(plain.swarm, 64) for _ in range(4)]
    try:
        for s in sessions:
            s.open()
        with pytest.raises(ServerBusyError) as refused:
            with InferenceSession(plain.swarm, 64):
                pass
        assert refused.value.retry_after and refused.value.retry_after > 0
        assert "holds 4 sessions" in str(refused.value)
        results = run_together([lambda: tuned.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=None)
                                 for _ in range(2)])
        for out in results:
            assert torch.equal(out, expected)
    finally:
        for s in sessions:
            s.close()
    with InferenceSession(plain.swarm, 64):  # its sessions closed: the share is free again
        pass


def test_a_long_prefill_does_not_stall_decoding(batch_swarm):
    """4 sessions decode while a 1500-token prompt arrives: the prompt runs in chunks of at most 64
    rows between their steps, so no decoding step waits for the whole prompt (a token's wait is
    bounded by one chunk per server; docs/architecture.md, batched decoding)."""
    swarm, _, plain, tuned = batch_swarm
    long_ids = _prompt(1500, 7)
    start = time.perf_counter()
    plain.generate(long_ids, max_new_tokens=1, eos_token_id=None)
    prefill_alone = time.perf_counter() - start
    stamps: list[list[float]] = [[] for _ in range(4)]
    window: list[float] = []
    go = threading.Event()

    class Clock:
        def __init__(self, i):
            self.i = i

        def put(self, value):
            stamps[self.i].append(time.perf_counter())

        def end(self):
            pass

    def decode(i):
        model = tuned if i % 2 else plain
        return model.generate(_prompt(4, 100 + i), max_new_tokens=60, eos_token_id=None, streamer=Clock(i))

    def prefill():
        go.wait(30)
        window.append(time.perf_counter())
        plain.generate(long_ids, max_new_tokens=1, eos_token_id=None)
        window.append(time.perf_counter())

    def start_prefill_after_a_few_tokens():
        deadline = time.monotonic() + 120  # a failed decode ends the test through its error
        while min(len(s) for s in stamps) < 6 and time.monotonic() < deadline:
            time.sleep(0.005)
        go.set()

    before = _batch_stats(swarm, plain)
    threading.Thread(target=start_prefill_after_a_few_tokens, daemon=True).start()
    run_together([lambda i=i: decode(i) for i in range(4)] + [prefill])
    after = _batch_stats(swarm, plain)
    chunks = sum(after[p][2] - before[p][2] for p in after)
    assert chunks >= 2 * (1500 // 64) - 4  # both servers fed the prompt in chunks
    lo, hi = window
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:], strict=False) if lo <= a and b <= hi]
    assert gaps, "no decoding step ran during the prefill"
    assert max(gaps) < 0.5 * max(prefill_alone, hi - lo), (max(gaps), prefill_alone, hi - lo)


def test_server_killed_under_batched_sessions(batch_swarm):
    """4 sessions run batched through V[2:4) (which announces a high throughput, so routes take it);
    V is SIGKILLed mid-generation: every session replays into B and finishes with its own tokens."""
    swarm, path, plain, tuned = batch_swarm
    jobs = [(plain, _prompt(n, 200 + i)) for i, n in enumerate((4, 7))] + \
           [(tuned, _prompt(n, 300 + i)) for i, n in enumerate((3, 11))]
    expected = [m.generate(ids, max_new_tokens=20, eos_token_id=None) for m, ids in jobs]
    victim = swarm.add_server(path, Span(2, 4), *SERVER_ARGS, "--throughput", "100000")
    try:
        swarm.wait_for("llama-batch", 4, lambda records: sum(r.state == ServerState.ONLINE and r.span == Span(2, 4)
                                                             for r in records.values()) == 2, "V online")
        counted: list[int] = [0] * len(jobs)

        class Counter:
            def __init__(self, i):
                self.i = i

            def put(self, value):
                counted[self.i] += 1

            def end(self):
                pass

        def killer():
            deadline = time.monotonic() + 120  # a failed generation ends the test through its error
            while min(counted) < 8 and time.monotonic() < deadline:
                time.sleep(0.005)
            swarm.signal_group(victim, signal.SIGKILL)

        threading.Thread(target=killer, daemon=True).start()
        results = run_together([lambda i=i, m=m, ids=ids: m.generate(ids, max_new_tokens=20, eos_token_id=None,
                                                                         streamer=Counter(i))
                                 for i, (m, ids) in enumerate(jobs)])
        assert victim.proc.wait(timeout=10) is not None
        for out, want in zip(results, expected, strict=True):
            assert torch.equal(out, want)
    finally:
        swarm.stop_server(victim, signal.SIGKILL)
