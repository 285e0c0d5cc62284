"""End-to-end inference through a real swarm on 127.0.0.1, compared with local transformers."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessorList

from stamen import AutoDistributedModelForCausalLM
from stamen.client import model as client_model
from stamen.testing.scores import ScoreRecorder

pytestmark = pytest.mark.swarm

MODELS = ["llama-gqa", "llama3-rope", "qwen2-bias"]


@pytest.fixture(scope="module")
def clients(swarm, model_dirs):
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = AutoDistributedModelForCausalLM.from_pretrained(
                model_dirs[name], initial_peers=swarm.initial_peers, request_timeout=30
            )
        return made[name]

    yield get
    for model in made.values():
        model.shutdown()


@pytest.fixture(scope="module")
def local_models(model_dirs):
    return {name: AutoModelForCausalLM.from_pretrained(path).eval() for name, path in model_dirs.items()}


def _prompt(vocab: int, batch: int = 1, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """Our generate: the tokens and every step's logits (as the logits processors get them)."""
    scores = ScoreRecorder()
    out = model.generate(ids, logits_processor=LogitsProcessorList([scores]), **settings)
    return out, scores.stacked


def _hf_generate(ref, ids, **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' generate: the tokens and every step's raw logits."""
    result = ref.generate(ids, output_logits=True, return_dict_in_generate=True, **settings)
    return result.sequences, torch.stack(result.logits, 1)


LOGITS_ATOL = 1e-4


def _assert_logits_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= LOGITS_ATOL


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_transformers(name, clients, local_models):
    model, ref = clients(name), local_models[name]
    ids = _prompt(ref.config.vocab_size, batch=2, length=17)
    with torch.no_grad():
        expected = ref(ids).logits
    got = model(ids).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generate_matches_transformers(name, clients, local_models):
    model, ref = clients(name), local_models[name]
    ids = _prompt(ref.config.vocab_size, seed=1)
    expected, expected_logits = _hf_generate(ref, ids, max_new_tokens=20, do_sample=False, eos_token_id=None,
                                             pad_token_id=0)
    got, logits = _generate(model, ids, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert got.shape == (1, ids.shape[1] + 20)
    assert torch.equal(got, expected)
    _assert_logits_close(logits, expected_logits)
    assert len(set(got[0, ids.shape[1]:].tolist())) >= 5  # not one token repeated: the tokens say something


def test_two_generate_calls_in_one_session_equal_one_call(clients):
    model = clients("llama-gqa")
    ids = _prompt(model.block_config.vocab_size, seed=2)
    once, once_logits = _generate(model, ids, max_new_tokens=16, eos_token_id=None)
    with model.inference_session(max_length=ids.shape[1] + 16) as session:
        first, first_logits = _generate(model, ids, max_new_tokens=7, eos_token_id=None)
        sent_after_first = session.position
        second, second_logits = _generate(model, first, max_new_tokens=9, eos_token_id=None)
        # the second call sent only the one token the servers had not seen
        assert session.position == sent_after_first + 9
    assert torch.equal(second, once)
    _assert_logits_close(torch.cat([first_logits, second_logits], 1), once_logits)


def test_session_rolls_back_when_the_prefix_changes(clients):
    model = clients("llama-gqa")
    ids = _prompt(model.block_config.vocab_size, seed=3)
    other = ids.clone()
    other[0, -3:] = (other[0, -3:] + 1) % model.block_config.vocab_size
    expected, expected_logits = _generate(model, other, max_new_tokens=5, eos_token_id=None)
    with model.inference_session(max_length=64):
        model.generate(ids, max_new_tokens=5, eos_token_id=None)
        got, logits = _generate(model, other, max_new_tokens=5, eos_token_id=None)
    assert torch.equal(got, expected)
    _assert_logits_close(logits, expected_logits)


def test_batched_generate_with_left_padding_matches_transformers(clients, local_models):
    model, ref = clients("llama-gqa"), local_models["llama-gqa"]
    ids = _prompt(ref.config.vocab_size, batch=2, length=10, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    expected, expected_logits = _hf_generate(ref, ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                             eos_token_id=None, pad_token_id=0)
    got, logits = _generate(model, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
    assert torch.equal(got, expected)
    _assert_logits_close(logits, expected_logits)


def test_sampling_matches_transformers_with_the_same_seed(clients, local_models):
    from transformers.generation import RepetitionPenaltyLogitsProcessor

    model, ref = clients("llama-gqa"), local_models["llama-gqa"]
    ids = _prompt(ref.config.vocab_size, seed=5)
    settings = dict(max_new_tokens=12, do_sample=True, temperature=0.7, top_k=20, top_p=0.9,
                    repetition_penalty=1.3, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(123)
    expected, expected_logits = _hf_generate(ref, ids, **settings)
    torch.manual_seed(123)
    got, penalized = _generate(model, ids, **settings)  # our processors see the logits after the penalty
    assert torch.equal(got, expected)
    penalty = RepetitionPenaltyLogitsProcessor(1.3)
    expected_penalized = torch.stack([penalty(expected[:, : ids.shape[1] + t], expected_logits[:, t].clone())
                                      for t in range(12)], 1)
    _assert_logits_close(penalized, expected_penalized)
    torch.manual_seed(124)  # and the seed matters: another one draws other tokens
    assert not torch.equal(model.generate(ids, **settings), expected)


def test_eos_stops_generation(clients):
    model = clients("llama-gqa")
    ids = _prompt(model.block_config.vocab_size, seed=6)
    free = model.generate(ids, max_new_tokens=6, eos_token_id=None)
    stop_token = int(free[0, ids.shape[1] + 2])
    got = model.generate(ids, max_new_tokens=6, eos_token_id=stop_token)
    first_stop = (free[0, ids.shape[1]:] == stop_token).nonzero()[0].item()
    assert got.shape[1] == ids.shape[1] + first_stop + 1
    assert int(got[0, -1]) == stop_token


def test_push_on_and_off_give_identical_tokens(swarm, model_dirs, clients):
    from stamen.client import loop
    from stamen.rpc.calls import call_info

    pushed_model = clients("llama-gqa")
    assert pushed_model.swarm.config.use_push
    plain_model = AutoDistributedModelForCausalLM.from_pretrained(
        model_dirs["llama-gqa"], initial_peers=swarm.initial_peers, use_push=False)
    try:
        def pushed_steps() -> int:
            servers = pushed_model.swarm.servers(refresh=True)
            infos = [loop.run(call_info(pushed_model.swarm.p2p, pushed_model.swarm.peer(s.peer_id), 10))
                     for s in servers]
            return sum(i.pushed_steps for i in infos)

        ids = _prompt(pushed_model.block_config.vocab_size, seed=7)
        before = pushed_steps()
        without_push, plain_logits = _generate(plain_model, ids, max_new_tokens=20, eos_token_id=None)
        assert pushed_steps() == before  # no server received a pushed input
        with_push, pushed_logits = _generate(pushed_model, ids, max_new_tokens=20, eos_token_id=None)
        assert pushed_steps() > before  # later servers computed from pushed inputs
        assert torch.equal(with_push, without_push)
        torch.testing.assert_close(pushed_logits, plain_logits, rtol=0, atol=0)  # the same inputs, bit for bit
    finally:
        plain_model.shutdown()


def test_chained_steps_hold_outputs_that_equal_the_hop_by_hop_inputs(swarm, model_dirs, clients):
    """Decoding steps down the push chain wait for the last hop only: the other servers hold their
    outputs (the next hops' inputs, which a replay needs) until asked. Fetched, they equal what a
    client without push sends each hop, and the tokens are the same."""
    from stamen.client.session import _Held

    pushed_model = clients("llama-gqa")
    plain_model = AutoDistributedModelForCausalLM.from_pretrained(
        model_dirs["llama-gqa"], initial_peers=swarm.initial_peers, use_push=False)
    ids = _prompt(pushed_model.block_config.vocab_size, seed=11)
    try:
        histories, outputs = {}, {}
        for name, model in (("chained", pushed_model), ("plain", plain_model)):
            with model.inference_session(max_length=ids.shape[1] + 24) as session:
                outputs[name] = model.generate(ids, max_new_tokens=24, eos_token_id=None)
                assert len(session.route) >= 2
                if name == "chained":
                    assert session.chained_steps >= 1
                    assert any(isinstance(e, _Held) for live in session._hops[1:] for e in live.history)
                    session.settle()
                else:
                    assert session.chained_steps == 0
                histories[name] = {(h.hop.blocks.start, h.hop.blocks.end): list(h.history) for h in session._hops}
        assert torch.equal(outputs["chained"], outputs["plain"])
        common = histories["chained"].keys() & histories["plain"].keys()
        assert len(common) >= 2  # the same hops (several servers of a span would route apart)
        for blocks in common:
            got, want = histories["chained"][blocks], histories["plain"][blocks]
            assert len(got) == len(want) == 24  # the prompt's step and 23 decoding steps
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    finally:
        plain_model.shutdown()


def test_servers_announce_pings_to_the_next_servers_and_routes_use_them(swarm, clients):
    import time as _time

    from stamen.dht.records import fetch_servers

    model = clients("llama-gqa")
    deadline = _time.monotonic() + 60
    while True:  # servers measure their pings at every announcement (each ttl/3)
        records = fetch_servers(swarm.client_dht(), "llama-gqa", 6)
        first = [r for r in records.values() if r.start == 0 and r.end == 2]
        if first and first[0].next_pings:
            break
        assert _time.monotonic() < deadline, "no server announced pings to the servers after it"
        _time.sleep(1)
    followers = {p for p, r in records.items() if r.start <= 2 < r.end}
    assert set(first[0].next_pings) <= followers and all(0 < v < 1 for v in first[0].next_pings.values())
    from stamen.client import loop

    rtts = loop.run(model.swarm.client_rtts(model.swarm.servers(refresh=True)))
    assert rtts and all(0 < v < 1 for v in rtts.values())


def test_beam_search_matches_transformers(clients, local_models):
    model, ref = clients("llama-gqa"), local_models["llama-gqa"]
    ids = _prompt(ref.config.vocab_size, batch=2, length=6, seed=8)
    settings = dict(max_new_tokens=10, num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=0,
                    length_penalty=1.0, early_stopping=False)
    expected, expected_logits = _hf_generate(ref, ids, **settings)
    got, scores = _generate(model, ids, **settings)  # the processors see log-probabilities here
    assert torch.equal(got, expected)
    _assert_logits_close(scores, torch.log_softmax(expected_logits, -1))


def test_bfloat16_servers_are_close_next_to_what_the_blocks_change(clients, local_models):
    """Servers started with ``--dtype bfloat16``: stateless forwards and session steps (prompt, then
    one token at a time, activations on the wire in bfloat16) stay within a few percent of what the
    blocks change (transformers' float32 blocks' output minus their input), and generation runs."""
    model, ref = clients("llama-bf16"), local_models["llama-bf16"]
    assert {model.swarm.dtype_of(s.peer_id) for s in model.swarm.servers(refresh=True)} == {"bfloat16"}
    ids = _prompt(ref.config.vocab_size, batch=2, length=14, seed=9)
    seen = {}
    handle = ref.model.norm.register_forward_pre_hook(lambda _module, args: seen.setdefault("out", args[0]))
    try:
        with torch.no_grad():
            ref(ids)
            h = ref.model.embed_tokens(ids)
    finally:
        handle.remove()
    expected = seen["out"]
    change = (expected - h).norm()

    def share(out: torch.Tensor) -> float:
        return float((out.float() - expected).norm() / change)

    with torch.no_grad():
        assert share(model.run_blocks(h)) <= 0.06
        with model.inference_session(max_length=14, batch_size=2) as session:
            steps = [session.step(h[:, :8])] + [session.step(h[:, t:t + 1]) for t in range(8, 14)]
        assert share(torch.cat(steps, 1)) <= 0.06
    assert share(h) == pytest.approx(1.0)  # a swarm that did nothing would be off by all of it
    out = model.generate(ids[:1], max_new_tokens=8, eos_token_id=None)
    assert out.shape == (1, 22) and torch.equal(out[:, :14], ids[:1])


def test_a_transposed_decoding_head_gives_the_same_tokens_and_follows_the_weight(clients, local_models, monkeypatch):
    """The decoding head's transposed copy (on for large CPU heads, forced on here): the same greedy
    tokens as transformers, logits equal to the plain head's, rebuilt when the weight or the thread
    count changes."""
    monkeypatch.setattr(client_model, "TRANSPOSED_HEAD_MIN_BYTES", 0)
    model, ref = clients("llama-gqa"), local_models["llama-gqa"]
    ids = _prompt(ref.config.vocab_size, seed=3)
    expected, expected_logits = _hf_generate(ref, ids, max_new_tokens=12, do_sample=False, eos_token_id=None,
                                             pad_token_id=0)
    got, logits = _generate(model, ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(got, expected)
    _assert_logits_close(logits, expected_logits)
    assert model._transposed_head is not None
    hidden = torch.randn(3, model.block_config.hidden_size)
    original, threads_before = model.lm_head.weight.detach().clone(), torch.get_num_threads()
    try:
        with torch.no_grad():
            assert torch.allclose(model.decode_logits(hidden), model.lm_head(hidden), atol=1e-5)
            model.lm_head.weight.mul_(2)
            assert torch.allclose(model.decode_logits(hidden), model.lm_head(hidden), atol=1e-5)
            for threads in (1, 3):  # one column chunk per torch thread, rebuilt when the count changes
                torch.set_num_threads(threads)
                assert torch.allclose(model.decode_logits(hidden), model.lm_head(hidden), atol=1e-5)
                assert model._transposed_head[1].shape[0] == threads
    finally:
        torch.set_num_threads(threads_before)
        with torch.no_grad():
            model.lm_head.weight.copy_(original)


def test_banned_servers_that_still_answer_are_taken_back_when_nothing_else_covers_their_blocks(
        swarm, model_dirs, local_models):
    """A ban steers routes around a server that failed a call; when every server of some blocks is
    banned but still answers a ping, forwards and generation go through them at once (not after
    the route grace: set far above what a loaded machine needs, so the bound below is no race)."""
    ref = local_models["llama-gqa"]
    model = AutoDistributedModelForCausalLM.from_pretrained(model_dirs["llama-gqa"], initial_peers=swarm.initial_peers,
                                                            request_timeout=30, route_grace=240)
    try:
        ids = _prompt(ref.config.vocab_size, seed=4)
        with torch.no_grad():
            expected_logits = ref(ids).logits
        expected, expected_generate_logits = _hf_generate(ref, ids, max_new_tokens=6, do_sample=False,
                                                          eos_token_id=None, pad_token_id=0)
        for call in ("forward", "generate"):
            for server in model.swarm.servers(refresh=True):
                model.swarm.ban(server.peer_id, "test")
            assert model.swarm.servers() == []
            start = time.monotonic()
            if call == "forward":
                assert (model(ids).logits - expected_logits).abs().max().item() <= 1e-4
            else:
                got, logits = _generate(model, ids, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                        pad_token_id=0)
                assert torch.equal(got, expected)
                _assert_logits_close(logits, expected_generate_logits)
            assert time.monotonic() - start < model.swarm.config.route_grace / 4
            assert len(model.swarm.servers()) == 3  # all three taken back
    finally:
        model.shutdown()
