"""Claims of the README and the architecture doc that no other test exercised, each with real processes:
prompts split into several steps of over 2 MiB, lost pushes (latency only; the hop-by-hop fallback),
a server that lost an adapter (re-upload and retry), a kept training graph that timed out, a moved
server draining its old sessions (``--move-grace``), and the API's seeded sampling equal to
transformers' with the same seed and processors.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import OrderedDict

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessorList

from stamen import AutoDistributedModelForCausalLM
from stamen.client import loop
from stamen.client.session import InferenceSession
from stamen.dht.records import ServerState
from stamen.rpc.calls import call_info
from stamen.testing.models import TRAINED_SPREAD, save_random_llama
from stamen.testing.scores import ScoreRecorder
from stamen.testing.swarm import LocalSwarm
from stamen.types import Span, default_dht_prefix

pytestmark = pytest.mark.swarm


def _generate(model, ids, **settings) -> tuple[torch.Tensor, torch.Tensor]:
    scores = ScoreRecorder()
    out = model.generate(ids, logits_processor=LogitsProcessorList([scores]), eos_token_id=None, **settings)
    return out, scores.stacked


def _hf_generate(ref, ids, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    result = ref.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
    return result.sequences, torch.stack(result.logits, 1)


def _info(model, peer_id: str):
    return loop.run(call_info(model.swarm.p2p, model.swarm.peer(peer_id), 10))


# --- a prompt of over 2 MiB goes in several steps ---


def test_a_long_prompt_goes_in_several_steps_of_at_most_2_mib(tmp_path):
    """A 2100-token prompt of a 512-wide model is 4.3 MB of hidden states: the session sends it in
    three steps (1024 + 1024 + 52 tokens, the first two 2 MiB each), and the tokens and logits that
    follow equal transformers'."""
    path = str(save_random_llama(tmp_path / "wide", dict(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        max_position_embeddings=4096, **TRAINED_SPREAD), with_tokenizer=False))
    ids = torch.randint(3, 512, (1, 2100), generator=torch.Generator().manual_seed(0))
    expected, expected_logits = _hf_generate(AutoModelForCausalLM.from_pretrained(path).eval(), ids, 3)
    with LocalSwarm(log_dir=tmp_path / "logs") as swarm:
        swarm.start_bootstrap()
        swarm.add_server(path, Span(0, 2), "--torch-threads", "1")
        swarm.wait_online(default_dht_prefix(path), 2)
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                request_timeout=60)
        try:
            with model.inference_session(max_length=2103) as session:
                got, logits = _generate(model, ids, max_new_tokens=3)
                prompt_steps = [s for s in session._steps if s.position < 2100]
                assert [s.position for s in prompt_steps] == [0, 1024, 2048]
                assert session.position == 2102
                first_hop = session.hop_counters()[0]
                assert first_hop.bytes_sent > 2100 * 512 * 4  # the whole prompt, uncompressed
        finally:
            model.shutdown()
    assert torch.equal(got, expected)
    # float32 sums over 2100 positions in another order: ~2e-5 of the logits' range (a lost or
    # repeated chunk moves them by whole units)
    assert (logits - expected_logits).abs().max() <= 1e-4 * expected_logits.abs().max()


# --- lost pushes cost latency only; late chains fall back to hop-by-hop steps ---


@pytest.fixture()
def gqa(swarm, model_dirs):
    model = AutoDistributedModelForCausalLM.from_pretrained(model_dirs["llama-gqa"], initial_peers=swarm.initial_peers,
                                                            request_timeout=30)
    yield model
    model.shutdown()


def _run_session(model, ids, new_tokens: int):
    with model.inference_session(max_length=ids.shape[1] + new_tokens) as session:
        out, logits = _generate(model, ids, max_new_tokens=new_tokens)
        session.settle()
        histories = {h.hop.blocks: list(h.history) for h in session._hops}
        return out, logits, histories, session


def _pushed_steps(model) -> int:
    return sum(_info(model, s.peer_id).pushed_steps for s in model.swarm.servers(refresh=True))


def test_lost_pushes_cost_latency_only_and_fall_back_to_hop_by_hop(gqa, swarm, model_dirs, monkeypatch):
    """Pushes that never arrive (the next server does not know the session they name, so it drops
    them, as when a push is lost): a chained step whose push is lost waits 1.5× the usual chain
    time, then goes hop by hop with the client's copies, and the chain resumes; when every push is
    lost, after 3 late chains the session goes hop by hop. Tokens, logits and every hop's inputs
    equal those of a client that never pushes."""
    plain = AutoDistributedModelForCausalLM.from_pretrained(model_dirs["llama-gqa"],
                                                            initial_peers=swarm.initial_peers, use_push=False)
    ids = torch.randint(3, gqa.block_config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(21))
    try:
        expected, expected_logits, expected_histories, _ = _run_session(plain, ids, 20)
    finally:
        plain.shutdown()

    lose = {"all": False, "now": False, "chains": 0}
    push_chain, chain_step = InferenceSession._push_chain, InferenceSession._chain_step

    def lossy_push_chain(self, after):
        targets = push_chain(self, after)
        if not (lose["all"] or lose["now"]):
            return targets
        return [t.model_copy(update=dict(session_id=uuid.uuid4().hex)) for t in targets]

    async def counted_chain_step(self, hidden, inputs):
        lose["chains"] += 1
        lose["now"] = lose["chains"] == 3  # the third chained step's push is lost
        try:
            return await chain_step(self, hidden, inputs)
        finally:
            lose["now"] = False

    monkeypatch.setattr(InferenceSession, "_push_chain", lossy_push_chain)
    monkeypatch.setattr(InferenceSession, "_chain_step", counted_chain_step)
    for every_push_lost in (False, True):
        lose.update(all=every_push_lost, chains=0)
        before = _pushed_steps(gqa)
        out, logits, histories, session = _run_session(gqa, ids, 20)
        assert torch.equal(out, expected)
        torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)
        assert histories.keys() == expected_histories.keys()
        for blocks, history in histories.items():
            assert len(history) == 20
            for a, b in zip(history, expected_histories[blocks], strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        if every_push_lost:  # three late chains, then hop by hop (the client's copies, at once)
            assert lose["chains"] == 3 and session.chained_steps == 0 and session._hop_by_hop > 0
            assert _pushed_steps(gqa) == before  # no server computed from a push
        else:  # the lost one went hop by hop, and the chain resumed after it
            assert lose["chains"] > 3 and session.chained_steps == lose["chains"] - 1


# --- a server that lost an adapter gets it again ---


def test_a_server_that_lost_an_adapter_gets_it_again_and_the_call_is_retried(swarm, model_dirs):
    """The client remembers which adapter versions each server holds and names them by hash; a
    server that no longer holds one (evicted, restarted; here: the client believes it was uploaded
    before, and it never was) answers ``unknown_adapter``, and the client uploads it and retries,
    with logits equal to transformers + peft and no server banned."""
    from stamen.client.tuning import LoraSettings
    from stamen.testing.finetune import local_logits, local_model

    model = AutoDistributedModelForCausalLM.from_pretrained(
        model_dirs["llama-gqa"], initial_peers=swarm.initial_peers, request_timeout=30,
        lora=LoraSettings(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    try:
        torch.manual_seed(31)
        with torch.no_grad():
            for t in model.lora.tensors():
                t.normal_(0, 0.1)
        ids = torch.randint(3, model.block_config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(32))
        with torch.no_grad():
            expected = local_logits(local_model(model_dirs["llama-gqa"], model.lora), ids)
        hashes = [model.lora.block_hash(i) for i in range(len(model.lora.layers))]
        uploader = model.remote.uploader
        for server in model.swarm.servers(refresh=True):  # "uploaded before"
            uploader._known[server.peer_id] = OrderedDict((h, None) for h in hashes)
        with torch.no_grad():
            got = model(ids).logits
        assert uploader.uploads >= 6  # every block's adapter, uploaded after the servers said they lack it
        assert (got - expected).abs().max().item() <= 1e-4
        assert not model.swarm._banned_until
    finally:
        model.shutdown()


# --- a kept training graph that timed out ---


def test_a_kept_training_graph_that_timed_out_falls_back_to_a_stateless_backward(swarm, model_dirs):
    """qwen2-bias servers drop a kept ``rpc_train`` graph after ``--session-timeout 4`` s without the
    backward: the client's backward then asks the same servers for stateless backwards (they
    recompute) and the gradients equal those of a backward that came in time; no server is banned."""
    model = AutoDistributedModelForCausalLM.from_pretrained(model_dirs["qwen2-bias"],
                                                            initial_peers=swarm.initial_peers, request_timeout=30)
    try:
        peers = [s.peer_id for s in model.swarm.servers(refresh=True)]
        ids = torch.randint(3, model.block_config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(41))
        grad = torch.randn(2, 7, model.block_config.hidden_size, generator=torch.Generator().manual_seed(42))

        def counters():
            infos = [_info(model, p) for p in peers]
            return (sum(i.kept_backwards for i in infos), sum(i.recomputed_backwards for i in infos),
                    sum(i.train_graphs_held for i in infos))

        grads = []
        for wait in (False, True):
            embeds = model.embed_tokens(ids).detach().requires_grad_()
            kept, recomputed, _ = counters()
            out = model.run_blocks(embeds)
            assert counters()[2] == 2  # both hops' graphs held
            if wait:
                deadline = time.monotonic() + 30
                while counters()[2]:  # the servers drop them after their session timeout
                    assert time.monotonic() < deadline, "the servers kept their training graphs"
                    time.sleep(0.5)
            out.backward(grad)
            grads.append(embeds.grad)
            after = counters()
            assert (after[0] - kept, after[1] - recomputed) == ((0, 2) if wait else (2, 0))
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
        assert not model.swarm._banned_until
    finally:
        model.shutdown()


# --- a moved server closes its old sessions after --move-grace ---


def _log_has(server, pattern: str):
    return lambda _records: re.search(pattern, server.log_path.read_text())


def test_a_moved_server_closes_old_sessions_after_move_grace_and_the_client_replays(tmp_path):
    """A[0:2) and B[2:4) hold fixed spans; C (2 blocks, placing itself) starts at [0:2) beside A. A
    client's session runs C[0:2) -> B[2:4) (A blocked at first). B leaves; C moves into [2:4) and,
    after ``--move-grace 1``, closes the session it still held on [0:2). The session's next step
    replaces both hops (A[0:2) -> C[2:4)) by replay, and tokens and logits equal transformers'."""
    name = "llama-drain"
    path = str(save_random_llama(tmp_path / name, dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        **TRAINED_SPREAD)))
    ids = torch.randint(3, 300, (1, 8), generator=torch.Generator().manual_seed(51))
    expected, expected_logits = _hf_generate(AutoModelForCausalLM.from_pretrained(path).eval(), ids, 12)
    common = ("--torch-threads", "1", "--throughput", "10")
    with LocalSwarm(log_dir=tmp_path / "logs") as swarm:
        swarm.start_bootstrap()
        a = swarm.add_server(path, Span(0, 2), *common)
        b = swarm.add_server(path, Span(2, 4), *common)
        swarm.wait_online(name, 4)
        c = swarm.add_auto_server(path, *common, "--num-blocks", "2", "--balance-period", "1", "--move-jitter", "0.1",
                                  "--move-grace", "1")
        records = swarm.wait_for(name, 4, lambda r: len([x for x in r.values() if x.span == Span(0, 2) and
                                                         x.state == ServerState.ONLINE]) == 2 and r,
                                 "C online at [0:2) beside A")
        # a server logs its own address when it starts
        peer_a, peer_c = (re.search(r"visible at \S*/p2p/(\w+)", s.log_path.read_text()).group(1) for s in (a, c))
        assert {peer_a, peer_c} <= set(records)
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                blocked_servers=[peer_a], request_timeout=20)
        try:
            with model.inference_session(max_length=8 + 12) as session:
                assert [(h.peer_id, h.blocks) for h in session.route][0] == (peer_c, Span(0, 2))
                first, first_logits = _generate(model, ids, max_new_tokens=4)
                model.swarm.config.blocked_servers = []
                assert swarm.stop_server(b) == 0  # it announces that it leaves
                swarm.wait_for(name, 4, _log_has(c, r"dropped the old blocks \[0:2\) \(closed 1 sessions after 1 s\)"),
                               "C closed the session on its old blocks after the grace", timeout=60, servers=[a, c])
                out, later_logits = _generate(model, first, max_new_tokens=8)
                assert session.recoveries >= 2
                assert [(h.peer_id, h.blocks) for h in session.route] == [(peer_a, Span(0, 2)), (peer_c, Span(2, 4))]
        finally:
            model.shutdown()
    assert torch.equal(out, expected)
    assert (torch.cat([first_logits, later_logits], 1) - expected_logits).abs().max().item() <= 1e-4


# --- the API's seeded sampling equals transformers' ---


def _local_sample(smol_local, prompt: list[int], max_new_tokens: int, temperature: float, top_p: float,
                  seed: int) -> str:
    """What the API promises for a seed: transformers' logits, its temperature and top-p warpers,
    and ``torch.multinomial`` drawing from a generator seeded with the request's seed."""
    from transformers.generation import TemperatureLogitsWarper, TopPLogitsWarper

    model, tok = smol_local
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    generator = torch.Generator().manual_seed(seed)
    ids, past, new = torch.tensor([prompt]), None, []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
            past = out.past_key_values
            scores = warpers(ids, out.logits[:, -1].float())
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=generator)
            ids = torch.cat([ids, token], dim=1)
            if int(token) == tok.eos_token_id:
                break
            new.append(int(token))
    return tok.decode(new, skip_special_tokens=True).rstrip("\ufffd")


def test_api_seeded_sampling_equals_transformers_with_the_same_seed_and_processors(smol_swarm, smol_local):
    """An API that ignored temperature, top_p or seed would still agree with itself; here each
    request's text equals transformers' sampling with the same seed, temperature and top-p, and
    other settings give other text."""
    import openai

    client = openai.OpenAI(base_url=smol_swarm.api_url, api_key="unused", max_retries=0, timeout=120)
    _, tok = smol_local
    messages = [{"role": "user", "content": "Tell me a short story about a fox."}]
    prompt = list(tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])
    texts = {}
    for temperature, top_p, seed in ((0.9, 0.8, 7), (0.9, 0.8, 8), (1.4, 1.0, 7)):
        reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=12,
                                               temperature=temperature, top_p=top_p, seed=seed)
        texts[(temperature, top_p, seed)] = reply.choices[0].message.content
        assert reply.choices[0].message.content == _local_sample(smol_local, prompt, 12, temperature, top_p, seed)
    assert len(set(texts.values())) == 3  # seed and temperature change the text
