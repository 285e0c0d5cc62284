"""Fine-tuning through a real swarm: gradients equal transformers + peft, optimizer steps equal local ones,
a server killed during backward costs a retry, bad gradients get typed errors, generation applies the
trained parameters, sequence classification.

Dedicated swarm (its own bootstrap peer): a 4-block float32 Llama on A[0:2), B[2:4) and C[1:4).
Random routes mix A -> B, A -> C and sub-batches run on different servers at once. Training forwards
go over ``rpc_train`` (servers keep each hop's graph for the backward of the same call) unless a test
turns ``train_streams`` off. The kill test starts a server of its own, V[2:4), blocks B and C while
running forward (so V serves), then kills V when backward starts; the test with a server that keeps
no graphs adds D[0:4) and stops it. A, B and C stay up: every test passes alone and in any order.
"""

from __future__ import annotations

import signal
import time

import pytest
import torch

from stamen import AutoDistributedModelForCausalLM, AutoDistributedModelForSequenceClassification
from stamen.client import loop
from stamen.client.tuning import LoraSettings
from stamen.dht.records import fetch_servers
from stamen.errors import InvalidRequestError, UnknownAdapterError, WrongBlocksError
from stamen.rpc.calls import call_backward, call_info
from stamen.rpc.inputs import SpanInputs
from stamen.rpc.train import TrainStream
from stamen.testing.finetune import causal_lm_loss, local_logits, local_model, peft_lora_params
from stamen.testing.models import save_random_llama
from stamen.testing.swarm import LocalSwarm
from stamen.types import Span
from stamen.wire.messages import AdapterRef

pytestmark = pytest.mark.swarm

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def tune(tmp_path_factory):
    path = str(save_random_llama(tmp_path_factory.mktemp("tune") / "llama-tune", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        pad_token_id=0)))
    with LocalSwarm(log_dir=tmp_path_factory.mktemp("tune-logs")) as swarm:
        swarm.start_bootstrap()
        servers = {name: swarm.add_server(path, span, "--torch-threads", "1")
                   for name, span in (("A", Span(0, 2)), ("B", Span(2, 4)), ("C", Span(1, 4)))}
        swarm.wait_online("llama-tune", 4)
        records = fetch_servers(swarm.client_dht(), "llama-tune", 4)
        by_span = {(r.start, r.end): peer for peer, r in records.items()}
        peers = {name: by_span[(s.span.start, s.span.end)] for name, s in servers.items()}
        model = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers, tuning_mode="deep_ptune", pre_seq_len=3,
            lora=LoraSettings(r=4, lora_alpha=8, target_modules=ALL_TARGETS), sub_batch_tokens=20,
            request_timeout=20)
        yield swarm, path, servers, peers, model
        model.shutdown()


def _randomize(model, seed: int) -> None:
    """Nonzero everything (B and deep prompts start at zero), so every gradient is informative."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for t in [*model.lora.tensors(), model.prompts.prompt_embeddings, model.prompts.deep_prompts]:
            t.normal_(0, 0.1)


def _batch(vocab: int, seed: int = 0):
    """4 sequences of 7 tokens, two of them right-padded, labels ignoring the padding."""
    ids = torch.randint(3, vocab, (4, 7), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    mask[3, -4:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _local_copy(model, path):
    """transformers + peft holding the same LoRA, and a copy of the prompts."""
    import copy

    return local_model(path, model.lora), copy.deepcopy(model.prompts)


def _lora_pairs(model, reference):
    """(our LoRA tensor, peft's parameter) for every A and B."""
    ours = dict(zip(model.lora.peft_state_dict(), model.lora.tensors(), strict=True))
    theirs = peft_lora_params(reference)
    assert set(ours) == set(theirs)
    return [(ours[k], theirs[k]) for k in ours]


def _zero_grads(*tensors) -> None:
    for t in tensors:
        t.grad = None


def test_gradients_match_transformers_and_peft(tune):
    """d loss / d (prompt embeddings, deep prompts, LoRA A and B, input embeddings) through the swarm,
    with a padded batch split into 2 parallel sub-batches, equal transformers + peft."""
    _, path, _, _, model = tune
    _randomize(model, 0)
    ids, mask, labels = _batch(model.block_config.vocab_size)
    reference, local_prompts = _local_copy(model, path)

    embeds = model.embed_tokens(ids).detach().requires_grad_()
    _zero_grads(*model.lora.tensors(), *model.prompts.parameters())
    loss = model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    loss.backward()

    local_embeds = embeds.detach().clone().requires_grad_()
    local_loss = causal_lm_loss(local_logits(reference, None, mask, local_prompts, local_embeds), labels)
    local_loss.backward()

    torch.testing.assert_close(loss, local_loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(embeds.grad, local_embeds.grad, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(model.prompts.prompt_embeddings.grad, local_prompts.prompt_embeddings.grad,
                               rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(model.prompts.deep_prompts.grad, local_prompts.deep_prompts.grad,
                               rtol=RTOL, atol=ATOL)
    for ours, theirs in _lora_pairs(model, reference):
        assert ours.grad is not None and ours.grad.abs().sum() > 0
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_three_steps_equal_local_steps_and_adapters_upload_once(tune, optimizer):
    """Three optimizer steps through the swarm give the parameters of three local steps; a block's
    adapter goes to a server once per version of its weights (backward reuses what forward sent)."""
    _, path, _, _, model = tune
    _randomize(model, 1 if optimizer == "sgd" else 11)  # new weights: nothing the servers have seen
    reference, local_prompts = _local_copy(model, path)
    ours = [*model.prompts.parameters(), *model.lora.tensors()]
    theirs = [*local_prompts.parameters(), *(t for _, t in _lora_pairs(model, reference))]
    if optimizer == "sgd":
        opt, local_opt = (torch.optim.SGD(p, lr=0.05, momentum=0.9) for p in (ours, theirs))
    else:
        opt, local_opt = (torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01) for p in (ours, theirs))
    uploader = model.remote.uploader
    for step in range(3):
        ids, mask, labels = _batch(model.block_config.vocab_size, seed=10 + step)
        opt.zero_grad()
        before = uploader.uploads
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        after_forward = uploader.uploads
        out.loss.backward()
        assert after_forward > before  # new weights: uploaded for this step's routes ...
        assert uploader.uploads == after_forward  # ... and backward named them by hash only
        opt.step()

        local_opt.zero_grad()
        causal_lm_loss(local_logits(reference, ids, mask, local_prompts), labels).backward()
        local_opt.step()
    # Adam divides by the gradient's running magnitude, so where a gradient is ~0 float noise moves a
    # weight by up to ~1e-6 of lr-sized steps: compare those within 1e-3 of a step (lr = 1e-2)
    atol = ATOL if optimizer == "sgd" else 1e-5
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=atol)


def _counters(model, peers: dict[str, str]) -> dict[str, tuple[int, int, int]]:
    """Per server: (backwards from kept graphs, recomputed backwards, graphs held now)."""
    infos = {name: loop.run(call_info(model.swarm.p2p, model.swarm.peer(peer), 10)) for name, peer in peers.items()}
    return {name: (i.kept_backwards, i.recomputed_backwards, i.train_graphs_held) for name, i in infos.items()}


def _wait_released(model, peers: dict[str, str], timeout: float = 10.0) -> dict[str, tuple[int, int, int]]:
    deadline = time.monotonic() + timeout
    while True:
        counters = _counters(model, peers)
        if not any(held for _, _, held in counters.values()) or time.monotonic() > deadline:
            return counters
        time.sleep(0.1)


def _all_grads(model) -> list[torch.Tensor]:
    return [t.grad.clone() for t in [*model.prompts.parameters(), *model.lora.tensors()]]


def test_train_streams_keep_graphs_give_stateless_gradients(tune):
    """With train_streams (default) servers serve every backward from the graph kept by the same
    call and recompute nothing; gradients equal those of stateless forward + rpc_backward. Forwards
    without gradients stay stateless (no graph is held)."""
    _, _, _, peers, model = tune
    _randomize(model, 12)
    ids, mask, labels = _batch(model.block_config.vocab_size, seed=13)
    assert model.swarm.config.train_streams
    grads = {}
    for streams in (True, False):
        model.swarm.config.train_streams = streams
        try:
            before = _counters(model, peers)
            _zero_grads(*model.lora.tensors(), *model.prompts.parameters())
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            after = _wait_released(model, peers)
        finally:
            model.swarm.config.train_streams = True
        grads[streams] = _all_grads(model)
        kept = sum(after[n][0] - before[n][0] for n in peers)
        recomputed = sum(after[n][1] - before[n][1] for n in peers)
        # 2 sub-batches × 2 hops each (A -> B or A -> C)
        assert (kept, recomputed) == ((4, 0) if streams else (0, 4))
        assert all(held == 0 for _, _, held in after.values())
    for a, b in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)

    before = _counters(model, peers)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    model(input_ids=ids, attention_mask=mask)  # grads enabled, but the loss is dropped: streams closed
    after = _wait_released(model, peers)
    assert all(after[n][:2] == before[n][:2] for n in peers)
    assert all(held == 0 for _, _, held in after.values())


def test_bad_train_backward_gets_typed_errors_and_the_server_keeps_serving(tune):
    """A wrong second message of rpc_train (shape, dtype, NaN) is a typed error; the graph is dropped,
    the server serves the next call, and a stream closed without backward frees its graph."""
    _, _, _, peers, model = tune
    p2p, peer = model.swarm.p2p, model.swarm.peer(peers["A"])
    x = torch.randn(2, 5, 64)

    def train(grad):
        async def run():
            stream, out = await TrainStream.open(p2p, peer, Span(0, 2), SpanInputs(x), timeout=20)
            assert out.shape == x.shape
            return await stream.backward(grad)
        return loop.run(run())

    with pytest.raises(InvalidRequestError, match="grad_outputs must have the shape"):
        train(torch.randn(2, 4, 64))
    with pytest.raises(InvalidRequestError, match="grad_outputs: dtype int64 not allowed"):
        train(torch.ones(2, 5, 64, dtype=torch.int64))
    with pytest.raises(InvalidRequestError, match="NaN"):
        train(torch.full((2, 5, 64), float("nan")))
    grad = torch.randn(2, 5, 64)
    grads = train(grad)
    expected = loop.run(call_backward(p2p, peer, Span(0, 2), SpanInputs(x), grad, timeout=20))
    torch.testing.assert_close(grads.inputs, expected.inputs, rtol=RTOL, atol=ATOL)
    assert grads.prompts is None and grads.adapters == []

    async def open_and_close():
        stream, _ = await TrainStream.open(p2p, peer, Span(0, 2), SpanInputs(x), timeout=20)
        stream.close()
    loop.run(open_and_close())
    assert _wait_released(model, {"A": peers["A"]})["A"][2] == 0


def test_lora_fa_gradients_skip_a(tune):
    """LoRA-FA: A frozen (no gradient asked or returned), B's gradient equals peft's."""
    _, path, _, _, model = tune
    _randomize(model, 2)
    for layer in model.lora.layers:
        for pair in layer.values():
            pair.lora_A.requires_grad_(False)
    model.lora.settings.fa = True
    try:
        reference, local_prompts = _local_copy(model, path)
        ids, mask, labels = _batch(model.block_config.vocab_size, seed=3)
        _zero_grads(*model.lora.tensors())
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        causal_lm_loss(local_logits(reference, ids, mask, local_prompts), labels).backward()
        for ours, theirs in _lora_pairs(model, reference):
            if theirs.requires_grad:
                torch.testing.assert_close(ours.grad, theirs.grad, rtol=RTOL, atol=ATOL)
            else:
                assert ours.grad is None and theirs.grad is None
    finally:
        model.lora.settings.fa = False
        for t in model.lora.tensors():
            t.requires_grad_(True)


def test_generate_with_trained_prompts_and_adapter(tune):
    """Greedy generation through inference sessions (prompt prefix, deep prompts and LoRA applied by
    the servers) equals greedy decoding with transformers + peft and the same prompts."""
    _, path, _, _, model = tune
    _randomize(model, 4)
    reference, local_prompts = _local_copy(model, path)
    ids = torch.randint(3, model.block_config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(5))
    out = model.generate(ids, max_new_tokens=6, eos_token_id=None)
    expected = ids
    with torch.no_grad():
        for _ in range(6):
            logits = local_logits(reference, expected, None, local_prompts)
            expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


def test_sequence_classification_matches_transformers(tune):
    """A local score head on the last real token: logits, loss and gradients equal transformers'."""
    from transformers import AutoModelForSequenceClassification

    swarm, path, _, _, _ = tune
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        path, initial_peers=swarm.initial_peers, num_labels=3, tuning_mode="ptune", pre_seq_len=2)
    try:
        reference = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).eval()
        reference.requires_grad_(False)
        with torch.no_grad():
            reference.score.weight.copy_(model.score.weight)
        reference.score.weight.requires_grad_(True)
        ids, mask, _ = _batch(model.block_config.vocab_size, seed=6)
        labels = torch.tensor([0, 2, 1, 2])
        out = model(ids, mask, labels=labels)
        out.loss.backward()

        prompts = model.prompts.prompt_embeddings.detach().clone().requires_grad_()
        embeds = torch.cat([prompts.expand(4, -1, -1), reference.model.embed_tokens(ids)], dim=1)
        full_mask = torch.cat([mask.new_ones(4, 2), mask], dim=1)
        hidden = reference.model(inputs_embeds=embeds, attention_mask=full_mask).last_hidden_state[:, 2:]
        last = (torch.arange(7) * (ids != 0)).argmax(-1)
        logits = reference.score(hidden)[torch.arange(4), last]
        loss = torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        torch.testing.assert_close(out.logits, logits, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(model.score.weight.grad, reference.score.weight.grad, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(model.prompts.prompt_embeddings.grad, prompts.grad, rtol=RTOL, atol=ATOL)
    finally:
        model.shutdown()


def test_bad_gradients_get_typed_errors_and_the_server_keeps_serving(tune):
    _, _, _, peers, model = tune
    p2p, peer = model.swarm.p2p, model.swarm.peer(peers["A"])
    x = torch.randn(2, 5, 64)

    def backward(blocks=Span(0, 2), hidden=x, grad=None, mask=None, prompts=None, adapter=None):
        grad = torch.randn_like(hidden) if grad is None else grad
        inputs = SpanInputs(hidden, attention_mask=mask, prompts=prompts, adapter=adapter)
        return loop.run(call_backward(p2p, peer, blocks, inputs, grad, timeout=20))

    with pytest.raises(InvalidRequestError, match="grad_outputs must have the shape"):
        backward(grad=torch.randn(2, 4, 64))
    with pytest.raises(InvalidRequestError, match="grad_outputs: dtype int64 not allowed"):
        backward(grad=torch.ones(2, 5, 64, dtype=torch.int64))
    with pytest.raises(InvalidRequestError, match="NaN"):
        backward(grad=torch.full((2, 5, 64), float("nan")))
    with pytest.raises(InvalidRequestError, match="attention_mask must have shape"):
        backward(mask=torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(InvalidRequestError, match="prompts must have shape"):
        backward(prompts=torch.randn(3, 2, 64))
    with pytest.raises(UnknownAdapterError, match="unknown adapters"):
        backward(adapter=AdapterRef(hashes=["ab" * 20, "cd" * 20]))
    with pytest.raises(WrongBlocksError):
        backward(blocks=Span(0, 3))
    grads = backward(prompts=torch.randn(2, 2, 64))
    assert grads.inputs.shape == x.shape and grads.prompts.shape == (2, 2, 64) and grads.adapters == []


def test_server_killed_during_backward(tune):
    """SIGKILL the server that ran forward over [2:4) as backward starts: the client reroutes those
    blocks to B or C, recomputes them there, and the step's gradients equal the local ones; training
    goes on. The victim is a server of this test's own (V[2:4)): the module's servers stay up."""
    swarm, path, _, peers, _ = tune
    victim = swarm.add_server(path, Span(2, 4), "--torch-threads", "1")
    try:
        swarm.wait_online("llama-tune", 4, servers=[victim])
        victim_peer = swarm.wait_for("llama-tune", 4, lambda records: next(
            (p for p, r in records.items() if (r.start, r.end) == (2, 4) and p not in peers.values()), None),
            "the victim's record", servers=[victim])
        _killed_during_backward(swarm, path, victim, victim_peer, [peers["B"], peers["C"]])
    finally:
        swarm.stop_server(victim)


def _killed_during_backward(swarm, path, victim, victim_peer: str, others: list[str]) -> None:
    model = AutoDistributedModelForCausalLM.from_pretrained(
        path, initial_peers=swarm.initial_peers, tuning_mode="deep_ptune", pre_seq_len=3,
        lora=LoraSettings(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        sub_batch_tokens=20, request_timeout=20, max_retries=3, ban_timeout=600, blocked_servers=others)
    try:
        _randomize(model, 7)
        reference, local_prompts = _local_copy(model, path)
        ids, mask, labels = _batch(model.block_config.vocab_size, seed=8)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)  # A -> V: B and C are blocked
        model.swarm.config.blocked_servers = []  # the replacements are there from now on
        out.logits.register_hook(lambda g: swarm.signal_group(victim, signal.SIGKILL))
        out.loss.backward()
        assert victim.proc.wait(10) is not None
        assert victim_peer in model.swarm._banned_until  # its backward failed and was rerouted

        causal_lm_loss(local_logits(reference, ids, mask, local_prompts), labels).backward()
        torch.testing.assert_close(model.prompts.deep_prompts.grad, local_prompts.deep_prompts.grad,
                                   rtol=RTOL, atol=ATOL)
        for ours, theirs in _lora_pairs(model, reference):
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=RTOL, atol=ATOL)

        opt = torch.optim.SGD([*model.prompts.parameters(), *model.lora.tensors()], lr=0.05)
        opt.step()
        opt.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()  # goes on without B
        assert model.prompts.deep_prompts.grad.abs().sum() > 0
    finally:
        model.shutdown()


def test_server_over_its_graph_budget_falls_back_to_stateless(tune):
    """D[0:4) keeps no training graphs (--max-train-graphs 0): forwards fall back to stateless ones,
    D recomputes in rpc_backward, and the gradients equal transformers + peft."""
    swarm, path, _, _, _ = tune
    server = swarm.add_server(path, Span(0, 4), "--torch-threads", "1", "--max-train-graphs", "0")
    try:
        swarm.wait_online("llama-tune", 4, servers=[server])
        peer = next(p for p, r in fetch_servers(swarm.client_dht(), "llama-tune", 4).items()
                    if (r.start, r.end) == (0, 4))
        model = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers, tuning_mode="deep_ptune", pre_seq_len=3,
            lora=LoraSettings(r=4, lora_alpha=8, target_modules=ALL_TARGETS), sub_batch_tokens=20,
            request_timeout=20, allowed_servers=[peer])
        try:
            _randomize(model, 14)
            reference, local_prompts = _local_copy(model, path)
            ids, mask, labels = _batch(model.block_config.vocab_size, seed=15)
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            causal_lm_loss(local_logits(reference, ids, mask, local_prompts), labels).backward()
            torch.testing.assert_close(model.prompts.deep_prompts.grad, local_prompts.deep_prompts.grad,
                                       rtol=RTOL, atol=ATOL)
            for ours, theirs in _lora_pairs(model, reference):
                torch.testing.assert_close(ours.grad, theirs.grad, rtol=RTOL, atol=ATOL)
            assert _counters(model, {"D": peer})["D"] == (0, 2, 0)  # 2 sub-batches, recomputed
        finally:
            model.shutdown()
    finally:
        swarm.stop_server(server)
