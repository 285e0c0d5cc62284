"""A training peer moves from an over-served stage to the bottleneck stage, mid-step, and loads its new stage's state.

Real processes on 127.0.0.1. A 4-block tiny Llama, every server ``--train`` (SGD, target batch 4) with
its throughput pinned at 10 steps/s per block. A holds [0:2) and B [2:4) (``--blocks``: they never
move); C starts without ``--blocks`` (``--num-blocks 2``, a rebalancing check every second, so the
mover is known) and takes the leftmost of the equally weak windows, [0:2), beside A. There C stays:
moving would leave [0:2) as weak as [2:4) is now. Two trainers of 2 sequences each (one microbatch
per stage and step) train; T1 never uses A and T2 never uses C, so T1's [0:2) microbatches count on
C. Two steps put both stages past epoch 0, away from the checkpoint. In the third, T1 goes first: C
counts its microbatch and the step waits for T2. Then E joins [0:2) (``--blocks``): [0:2) serves 30
steps/s, [2:4) 10, and C moving to [2:4) raises the bottleneck to 20, so it moves while holding T1's
gradient. It must leave between steps (its samples step with [0:2), T1 reruns nothing), then announce
[2:4) at the stage's epoch holding B's state bitwise (the trained state, not the checkpoint's), and
stay bitwise equal to B after one more step.
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from stamen.client import loop
from stamen.dht.records import ServerState
from stamen.models import BlockConfig, load_config, load_span, open_checkpoint
from stamen.rpc.stage import fetch_stage_state
from stamen.testing.models import TRAINED_SPREAD, save_random_llama
from stamen.testing.swarm import LocalSwarm
from stamen.types import Span

pytestmark = pytest.mark.swarm

NAME, BLOCKS = "llama-train-move", 4
LEFT, RIGHT = Span(0, 2), Span(2, 4)
TARGET, LOCAL, LR, SEQ_LEN = 4, 2, 0.1, 16
TRAIN_ARGS = ("--torch-threads", "1", "--train", "--optimizer", "sgd", "--lr", str(LR),
              "--target-batch-size", str(TARGET), "--throughput", "10")


def _online(records, span: Span) -> dict[str, object]:
    """The training peers announced online, settled (not moving), on ``span``."""
    return {p: r for p, r in records.items() if r.state == ServerState.ONLINE and r.span == span
            and r.moving_to is None and r.stage is not None}


def _announced(records, span: Span) -> set[str]:
    """The peers that announce ``span``'s stage (the ones trainers draw for it)."""
    return {p for p, r in records.items() if r.span == span and r.stage is not None}


def _peer_of(records, server) -> str:
    log = server.log_path.read_text()
    return next(p for p in records if p[-6:] in log)


def _state(trainer, peer: str, span: Span) -> tuple[int, dict[str, torch.Tensor]]:
    """(epoch, tensors) of a stage peer: parameters, optimizer and averager state."""
    epoch, tensors, _ = loop.run(fetch_stage_state(trainer.swarm.p2p, trainer.swarm.peer(peer), span,
                                                   optimizer=True, timeout=30))
    return epoch, tensors


def _params(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), f"{what}: {name} differs"


def _counts_on(trainer, span: Span, peer: str) -> threading.Event:
    """Set once ``peer`` counted one of ``trainer``'s microbatches for ``span``."""
    counted, original = threading.Event(), trainer._record

    def record(span_, peer_, mb, hidden, grad, received):
        original(span_, peer_, mb, hidden, grad, received)
        if span_ == span and peer_ == peer:
            counted.set()

    trainer._record = record
    return counted


def test_training_peer_moves_mid_step_to_the_bottleneck_stage_with_its_state(tmp_path_factory):
    from stamen.client.swarm_train import SwarmTrainer

    path = str(save_random_llama(tmp_path_factory.mktemp("train-move") / NAME, dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=BLOCKS, num_attention_heads=4,
        num_key_value_heads=2, **TRAINED_SPREAD), seed=5))
    config = BlockConfig.from_hf(load_config(path))
    checkpoint = dict(load_span(open_checkpoint(path), config, RIGHT, torch.float32, progress=False).named_parameters())
    gen = torch.Generator().manual_seed(0)
    batches = [[torch.randint(3, config.vocab_size, (LOCAL, SEQ_LEN), generator=gen) for _ in range(2)]
               for _ in range(4)]
    trainers = []
    with LocalSwarm(log_dir=tmp_path_factory.mktemp("train-move-logs")) as swarm, ThreadPoolExecutor(2) as pool:
        swarm.start_bootstrap()
        a = swarm.add_server(path, LEFT, *TRAIN_ARGS)
        b = swarm.add_server(path, RIGHT, *TRAIN_ARGS)
        records = swarm.wait_for(NAME, BLOCKS, lambda rs: _online(rs, LEFT) and _online(rs, RIGHT) and rs,
                                 "A and B online")
        peer_a = _peer_of(records, a)
        c = swarm.add_auto_server(path, *TRAIN_ARGS, "--num-blocks", "2", "--balance-period", "1",
                                  "--move-jitter", "0.5")

        def trainer(blocked: str) -> SwarmTrainer:
            trainers.append(SwarmTrainer(path, swarm.initial_peers, microbatch=LOCAL, lr=LR, optimizer="sgd",
                                         request_timeout=20, epoch_timeout=120, connect_timeout=120,
                                         blocked_servers=[blocked]))
            return trainers[-1]

        try:
            t1 = trainer(peer_a)  # started while C starts (it waits for C: the only [0:2) peer it may use)
            records = swarm.wait_for(NAME, BLOCKS, lambda rs: len(_online(rs, LEFT)) == 2 and rs, "C online at [0:2)")
            peer_b, peer_c = _peer_of(records, b), _peer_of(records, c)
            assert set(_online(records, LEFT)) == {peer_a, peer_c}
            t2 = trainer(peer_c)

            def step(index: int) -> None:
                list(pool.map(lambda tb: tb[0].train_step(tb[1]), zip(trainers, batches[index], strict=True)))

            for index in range(2):
                step(index)
            epoch, trained = _state(t1, peer_b, RIGHT)
            assert epoch == 2
            assert any(not torch.equal(t, checkpoint[n]) for n, t in _params(trained).items())
            assert "moving to" not in c.log_path.read_text()  # C stayed on [0:2) while [2:4) was no weaker

            counted = _counts_on(t1, LEFT, peer_c)
            first = pool.submit(t1.train_step, batches[2][0])  # waits for T2's half of the step
            assert counted.wait(60), "C did not count T1's microbatch"
            e = swarm.add_server(path, LEFT, *TRAIN_ARGS)  # [0:2) now over-served: C moves to [2:4)
            swarm.wait_for(NAME, BLOCKS, lambda rs: peer_c in rs and peer_c not in _announced(rs, LEFT),
                           "C announced it left the stage of [0:2)", timeout=60)
            assert "moving to [2:4)" in c.log_path.read_text()
            assert not first.done(), first.exception()  # waits for T2: C left [0:2) holding T1's gradient
            second = pool.submit(t2.train_step, batches[2][1])
            first.result(150)
            second.result(150)
            assert t1.stats.reruns == 0  # C's count of T1's microbatch stepped with [0:2)

            records = swarm.wait_for(NAME, BLOCKS, lambda rs: peer_c in _online(rs, RIGHT) and len(
                _online(rs, LEFT)) == 2 and rs, "C moved to [2:4), A and E online at [0:2)", timeout=90,
                servers=[a, b, c, e])
            peer_e = _peer_of(records, e)
            log = c.log_path.read_text()
            assert re.search(r"loaded the stage's state at epoch [23] from a peer", log), log[-3000:]
            assert "left the stage at epoch 3" in log, log[-3000:]  # [0:2) stepped with C's count, then C left
            assert c.proc.poll() is None  # the same process moved

            deadline = time.monotonic() + 20
            while True:  # C may have loaded B's state at epoch 2, before B stepped, and caught up since
                (epoch_b, state_b), (epoch_c, state_c) = _state(t1, peer_b, RIGHT), _state(t1, peer_c, RIGHT)
                if epoch_c == epoch_b or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert epoch_c == epoch_b == 3
            _assert_bitwise_equal(state_c, state_b, "C after the move vs B")  # params, optimizer and averager
            assert any(not torch.equal(t, checkpoint[n]) for n, t in _params(state_c).items())
            moved = swarm.wait_for(NAME, BLOCKS, lambda rs: peer_c in rs and rs[peer_c].stage is not None
                                   and rs[peer_c].stage.epoch == 3 and rs[peer_c], "C announces epoch 3")
            assert moved.span == RIGHT and moved.moving_to is None

            step(3)  # T1's [0:2) microbatch now counts on E, T2's [2:4) one on B
            _, after_b = _state(t1, peer_b, RIGHT)
            epoch_c, after_c = _state(t1, peer_c, RIGHT)
            assert epoch_c == 4 and _state(t1, peer_b, RIGHT)[0] == 4
            _assert_bitwise_equal(_params(after_c), _params(after_b), "C vs B after the next step")
            assert any(not torch.equal(t, _params(state_b)[n]) for n, t in _params(after_b).items())
            (epoch_a, left_a), (epoch_e, left_e) = _state(t1, peer_a, LEFT), _state(t1, peer_e, LEFT)
            assert epoch_a == epoch_e == 4
            _assert_bitwise_equal(_params(left_a), _params(left_e), "A vs E")
        finally:
            for t in trainers:
                t.shutdown()
