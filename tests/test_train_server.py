"""Training servers (``stamen server --train``, ``server/stage.py``) on real processes: microbatches
on kept graphs, a lone stage's step, the stage's state, typed refusals, a joining peer, inference.

One module swarm: a frozen server and a training server over the same two blocks of a tiny Llama
(target batch 4 samples, SGD). Every test reads the stage's epoch and parameters first and leaves
the stage with nothing accumulated (its microbatches add up to whole target batches), so each
passes alone and in any order."""

from __future__ import annotations

import time
import uuid

import pytest
import torch

from stamen import AutoDistributedModelForCausalLM
from stamen.client import loop
from stamen.dht.records import ServerState, fetch_servers
from stamen.errors import InvalidRequestError, NotTrainingError, StageEpochError
from stamen.models import BlockConfig, load_config, load_span, open_checkpoint
from stamen.rpc.calls import call_forward
from stamen.rpc.inputs import SpanInputs
from stamen.rpc.stage import fetch_stage_state
from stamen.rpc.train import TrainStream
from stamen.testing.models import TRAINED_SPREAD, save_random_llama
from stamen.testing.swarm import LocalSwarm
from stamen.types import Span
from stamen.wire.messages import Microbatch

pytestmark = pytest.mark.swarm

NAME, SPAN, HIDDEN = "llama-stage", Span(0, 2), 64
TARGET, LR = 4, 0.01
TRAIN_ARGS = ("--train", "--target-batch-size", str(TARGET), "--lr", str(LR), "--optimizer", "sgd",
              "--torch-threads", "1", "--throughput", "10")
RTOL = 1e-5
"""Parameters after a step against a local step (float32, the same math in another summation order)."""


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Activations and input gradients: one float32 span computed with other thread counts."""
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    path = str(save_random_llama(tmp_path_factory.mktemp("stage") / NAME, dict(
        hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, **TRAINED_SPREAD)))
    with LocalSwarm(log_dir=tmp_path_factory.mktemp("stage-logs")) as swarm:
        swarm.start_bootstrap()
        frozen = swarm.add_server(path, SPAN, "--torch-threads", "1", "--throughput", "1")
        trainer = swarm.add_server(path, SPAN, *TRAIN_ARGS)
        peers = swarm.wait_for(NAME, 2, lambda rs: _two_online(rs), "both servers online")
        client = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                 request_timeout=30)
        swarm.path, swarm.frozen, swarm.trainer, swarm.peers, swarm.client = path, frozen, trainer, peers, client
        yield swarm
        client.shutdown()


def _two_online(records) -> dict[str, str] | None:
    online = {p: r for p, r in records.items() if r.state == ServerState.ONLINE}
    train = [p for p, r in online.items() if r.stage is not None]
    frozen = [p for p, r in online.items() if r.stage is None]
    return dict(train=train[0], frozen=frozen[0]) if len(train) == 1 and len(frozen) == 1 else None


def _peer(stage, name: str):
    return stage.client.swarm.peer(stage.peers[name] if name in stage.peers else name)


def _state(stage, who: str = "train", optimizer: bool = False) -> tuple[int, dict[str, torch.Tensor]]:
    epoch, tensors, _ = loop.run(fetch_stage_state(stage.client.swarm.p2p, _peer(stage, who), SPAN,
                                                   optimizer=optimizer, timeout=30))
    return epoch, tensors


def _microbatch(stage, who: str, hidden: torch.Tensor, grad: torch.Tensor | None, mb: Microbatch | None,
                recompute: bool = False):
    """One rpc_train call: (outputs, input gradient, BackwardDone)."""
    async def call():
        stream, out = await TrainStream.open(stage.client.swarm.p2p, _peer(stage, who), SPAN, SpanInputs(hidden),
                                             timeout=30, microbatch=mb, recompute=recompute)
        try:
            grads = await stream.backward(grad if grad is not None else torch.ones_like(out))
        finally:
            stream.close()
        return out, grads.inputs, stream.done

    return loop.run(call())


def _mb(samples: int, epoch: int | None, id: str | None = None) -> Microbatch:
    return Microbatch(id=id or uuid.uuid4().hex, samples=samples, epoch=epoch)


def _local_span(path: str, params: dict[str, torch.Tensor] | None = None):
    model = load_span(open_checkpoint(path), BlockConfig.from_hf(load_config(path)), SPAN, torch.float32,
                      progress=False)
    if params is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[f"param.{name}"])
    return model


def _input_grad(model, hidden: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    h = hidden.clone().requires_grad_()
    (g,) = torch.autograd.grad(model(h), h, grad)
    return g


def _sgd_step(path: str, params: dict[str, torch.Tensor], batches) -> dict[str, torch.Tensor]:
    """One local SGD step on the mean over microbatches (weighted by samples) of their losses (the
    loss whose gradient at a microbatch's outputs is its grad_outputs)."""
    model = _local_span(path, params).requires_grad_(True)
    total = sum(samples for _, _, samples in batches)
    loss = sum(samples / total * (model(h) * g).sum() for h, g, samples in batches)
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in model.named_parameters()])
    return {f"param.{n}": params[f"param.{n}"] - LR * g for n, g in zip(names, grads, strict=True)}


def _wait_epoch(stage, epoch: int, who: str = "train", timeout: float = 60.0) -> dict[str, torch.Tensor]:
    deadline = time.monotonic() + timeout
    while True:
        now, params = _state(stage, who)
        if now >= epoch:
            assert now == epoch, f"the stage stepped past epoch {epoch} to {now}"
            return params
        assert time.monotonic() < deadline, f"the stage stayed at epoch {now}, expected {epoch}"
        time.sleep(0.2)


def _batch(seed: int, batch: int = 2, length: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, HIDDEN, generator=gen), torch.randn(batch, length, HIDDEN, generator=gen) / 10


def _assert_params(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = RTOL) -> None:
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=1e-6, msg=name)


def test_microbatch_counts_once_per_id_and_lone_stage_steps_as_local_sgd(stage):
    """Two microbatches of 2 samples and a repeat of the first: the repeat is not counted, and the
    stage steps once it holds its target of 4, exactly as one local SGD step on the two."""
    epoch, before = _state(stage)
    (h1, g1), (h2, g2) = _batch(1), _batch(2)
    first = _mb(2, epoch)
    _, _, done = _microbatch(stage, "train", h1, g1, first)
    assert done.accumulated and done.stage_epoch == epoch
    _, _, again = _microbatch(stage, "train", h1, g1, first)
    assert not again.accumulated  # a duplicate id: the stage already holds it
    _, _, done2 = _microbatch(stage, "train", h2, g2, _mb(2, epoch))
    assert done2.accumulated
    after = _wait_epoch(stage, epoch + 1)
    _assert_params(after, _sgd_step(stage.path, before, [(h1, g1, 2), (h2, g2, 2)]))


def test_recomputed_microbatches_give_the_same_outputs_gradients_and_step(stage):
    """Activation recomputation (the server keeps only the inputs and runs the forward again with
    autograd when the gradient arrives): the same outputs and input gradients as a kept graph, and
    the weight gradients make the same step."""
    epoch, before = _state(stage)
    local = _local_span(stage.path, before)
    (h1, g1), (h2, g2) = _batch(11), _batch(12)
    out, grad_in, done = _microbatch(stage, "train", h1, g1, _mb(2, epoch), recompute=True)
    assert done.accumulated
    with torch.no_grad():
        _close(out, local(h1))
    _close(grad_in, _input_grad(local, h1, g1))
    _, _, done2 = _microbatch(stage, "train", h2, g2, _mb(2, epoch), recompute=True)
    assert done2.accumulated
    _assert_params(_wait_epoch(stage, epoch + 1), _sgd_step(stage.path, before, [(h1, g1, 2), (h2, g2, 2)]))


def test_training_server_gives_the_input_gradients_of_a_frozen_one(stage):
    """A microbatch's outputs and input gradient are those of the span at the stage's weights (the
    frozen server's, as long as the stage has not stepped); its weight gradient makes the step."""
    epoch, before = _state(stage)
    hidden, grad = _batch(3)
    out, grad_in, done = _microbatch(stage, "train", hidden, grad, _mb(TARGET, epoch))
    assert done.accumulated
    reference = _local_span(stage.path, before)
    _close(out, reference(hidden).detach())
    _close(grad_in, _input_grad(reference, hidden, grad))
    frozen_out, frozen_grad, _ = _microbatch(stage, "frozen", hidden, grad, None)
    checkpoint = _local_span(stage.path)
    _close(frozen_grad, _input_grad(checkpoint, hidden, grad))
    if all(torch.equal(p, before[f"param.{n}"]) for n, p in checkpoint.named_parameters()):  # not stepped yet
        _close(out, frozen_out)
        _close(grad_in, frozen_grad)
    _assert_params(_wait_epoch(stage, epoch + 1), _sgd_step(stage.path, before, [(hidden, grad, TARGET)]))


def test_stage_state_holds_the_weights_the_server_computes_with(stage):
    epoch, params = _state(stage)
    local = _local_span(stage.path)
    assert set(params) == {f"param.{n}" for n, _ in local.named_parameters()}
    for name, p in local.named_parameters():
        assert params[f"param.{name}"].dtype == torch.float32 and params[f"param.{name}"].shape == p.shape
    hidden, _ = _batch(4)
    out = loop.run(call_forward(stage.client.swarm.p2p, _peer(stage, "train"), SPAN, SpanInputs(hidden), timeout=30))
    _close(out, _local_span(stage.path, params)(hidden).detach())
    full_epoch, full = _state(stage, optimizer=True)
    assert full_epoch == epoch
    for name, tensor in params.items():
        assert torch.equal(full[name], tensor)


def test_frozen_server_refuses_training_and_a_stage_refuses_another_epoch(stage):
    hidden, grad = _batch(5)
    with pytest.raises(NotTrainingError):
        _state(stage, "frozen")
    with pytest.raises(NotTrainingError):
        _microbatch(stage, "frozen", hidden, grad, _mb(1, None))
    epoch, _ = _state(stage)
    with pytest.raises(StageEpochError):
        _microbatch(stage, "train", hidden, grad, _mb(1, epoch + 5))


def test_bad_grad_outputs_are_refused_and_nothing_is_applied(stage):
    epoch, before = _state(stage)
    hidden, grad = _batch(6)
    for bad in (torch.full_like(grad, float("nan")), grad[:, :2]):
        with pytest.raises(InvalidRequestError):
            _microbatch(stage, "train", hidden, bad, _mb(2, epoch))
    now, params = _state(stage)
    assert now == epoch and all(torch.equal(params[k], before[k]) for k in before)
    # the stage still serves, and counted nothing of the refused ones: a whole target batch steps it
    # as a local step on that batch alone
    _microbatch(stage, "train", hidden, grad, _mb(TARGET, epoch))
    _assert_params(_wait_epoch(stage, epoch + 1), _sgd_step(stage.path, before, [(hidden, grad, TARGET)]))


def test_joining_peer_loads_the_stage_state_bitwise_before_going_online(stage):
    epoch, _ = _state(stage)
    if epoch == 0:  # a stage that stepped: its weights differ from the checkpoint's
        hidden, grad = _batch(7)
        _microbatch(stage, "train", hidden, grad, _mb(TARGET, 0))
        epoch = 1
        _wait_epoch(stage, epoch)
    joiner = stage.add_server(stage.path, SPAN, *TRAIN_ARGS)
    try:
        def joined(records):
            new = [p for p, r in records.items() if p not in stage.peers.values() and r.state == ServerState.ONLINE
                   and r.stage is not None]
            return new[0] if new else None

        peer = stage.wait_for(NAME, 2, joined, "the joining training server online", servers=[joiner])
        assert fetch_servers(stage.client_dht(), NAME, 2)[peer].stage.epoch == epoch
        joined_epoch, joined_params = _state(stage, peer)
        now, params = _state(stage)
        assert joined_epoch == now == epoch
        for name, tensor in params.items():
            assert torch.equal(joined_params[name], tensor), name
        assert "loaded the stage's state at epoch" in joiner.log_path.read_text()
    finally:
        stage.stop_server(joiner)


def test_generation_runs_on_a_training_server(stage):
    """Greedy tokens through the training server (the frozen one blocked) are those of its current weights."""
    from transformers import AutoModelForCausalLM

    model = stage.client
    model.swarm.config.blocked_servers = [stage.peers["frozen"]]
    try:
        ids = torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(8))
        _, params = _state(stage)
        out = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    finally:
        model.swarm.config.blocked_servers = []
    hf = AutoModelForCausalLM.from_pretrained(stage.path).eval()
    span = _local_span(stage.path, params)
    expected = ids
    with torch.no_grad():
        for _ in range(4):
            logits = hf.lm_head(hf.model.norm(span(hf.model.embed_tokens(expected))))
            expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


def test_health_shows_the_stage_with_its_peer_and_epoch(stage):
    from stamen.client.health import format_stages, read_health

    epoch, _ = _state(stage)
    deadline = time.monotonic() + 30
    while True:  # the record follows a step within a second
        report = read_health(stage.client.swarm.dht, NAME, 2)  # on the client's DHT and libp2p replica
        if report.stages and report.stages[0].epoch == epoch or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    (row,) = report.stages
    assert (row.start, row.end, row.averaging, row.optimizer, row.target_batch_size) == (0, 2, "plain", "sgd", TARGET)
    assert [p.peer_id for p in row.peers if p.live] == [stage.peers["train"]] and row.epoch == epoch
    assert f"[0:2) plain sgd: epoch {epoch}" in format_stages(report.stages)


def test_weight_updates_wait_for_kept_graphs_and_hold_new_ones_back():
    """``GraphGate``: an update waits until held graphs are released, new graphs wait for the update,
    and a graph held past the update's timeout is dropped."""
    import asyncio

    from stamen.server.backend import GraphGate

    async def main():
        gate, order = GraphGate(), []
        held = await gate.enter(1.0)

        async def update(timeout: float):
            async with gate.closed(timeout):
                order.append("update")

        task = asyncio.create_task(update(5.0))
        await asyncio.sleep(0.05)
        entering = asyncio.create_task(gate.enter(5.0))
        await asyncio.sleep(0.05)
        assert order == [] and not entering.done()
        order.append("released")
        gate.release(held)
        await task
        gate.release(await entering)
        assert order == ["released", "update"] and not gate.held
        stuck = await gate.enter(1.0)
        await update(0.1)
        assert stuck.dropped and not gate.held

    loop.run(main(), timeout=30)


def test_bfloat16_compute_trains_float32_weights(tmp_path):
    """``--compute-dtype bfloat16``: a microbatch graph runs under autocast; outputs and weight
    gradients stay float32 and near the float32 ones."""
    from stamen.server.backend import SpanBackend

    path = str(save_random_llama(tmp_path / "bf16", dict(
        hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, **TRAINED_SPREAD)))
    hidden, grad = _batch(9)

    async def run(autocast):
        backend = SpanBackend(_local_span(path).requires_grad_(True), torch.float32, torch.device("cpu"), 1024, 1024)
        backend.train_autocast = autocast
        async with backend.train_graph(SPAN, SpanInputs(hidden), True, 30, weights=True) as graph:
            out = graph.output()
            grads = await backend.train_backward(graph, grad)
        backend.shutdown()
        return out, grads.inputs, graph.weight_grads

    out16, in16, w16 = loop.run(run(torch.bfloat16), timeout=60)
    out32, in32, w32 = loop.run(run(None), timeout=60)
    assert out16.dtype == in16.dtype == torch.float32 and all(g.dtype == torch.float32 for g in w16)
    torch.testing.assert_close(out16, out32, rtol=0.05, atol=0.05 * float(out32.abs().max()))
    for a, b in zip(w16, w32, strict=True):
        assert float((a - b).norm() / b.norm()) < 0.05


def test_train_option_needs_float32_master_weights():
    from pydantic import ValidationError

    from stamen.server.config import ServerConfig

    config = ServerConfig(model="owner/model", train=True, training=dict(optimizer="adamw", compute_dtype="bfloat16"))
    assert config.training.optimizer == "adamw" and config.training.target_batch_size == 32
    for bad in (dict(dtype="bfloat16"), dict(quant="int8"), dict(standby=True), dict(max_train_graphs=0)):
        with pytest.raises(ValidationError, match="--train"):
            ServerConfig(model="owner/model", train=True, **bad)
