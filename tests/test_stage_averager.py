"""StageAverager (stamen/train/averaging.py): stage peers in separate OS processes, each with its own
hivemind DHT and averager on 127.0.0.1, accumulate microbatch gradients and step together; their
parameters stay bitwise equal and match one local process running the same weighted-mean steps."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch

from stamen.errors import InvalidRequestError, StageEpochError
from stamen.testing.workers import Worker, on_all, start_workers, stop_workers
from stamen.train.averaging import StageAverager  # imported before the peers fork: they start at once

SHAPES = [(16, 12), (12,), (6, 4)]
LR = 0.1
MATCHMAKING = 0.5
ROUND_TIMEOUT = 60

# --- what runs in a peer's process (module-level: sent to the forked workers by reference) ---


def _optimizer(name: str) -> Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]:
    if name == "adamw":
        return partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1)
    return partial(torch.optim.SGD, lr=LR)


def initial_params(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in SHAPES]


def _open(env: dict, prefix: str, target: int, averaging: str = "plain", optimizer: str = "sgd",
          seed: int = 0) -> str:
    """A fresh StageAverager over fresh parameters (the same on every peer for the same seed)."""
    _close(env)
    params = [torch.nn.Parameter(t) for t in initial_params(seed)]
    env.setdefault("closers", []).append(lambda: _close(env))
    env["stage"] = StageAverager(
        params, dht=env["dht"], prefix=prefix, target_batch_size=target, optimizer=_optimizer(optimizer),
        averaging=averaging, rank=2, matchmaking_time=MATCHMAKING, averaging_timeout=10.0, progress_period=1.0,
        label=prefix[-6:])
    return env["stage"]._peer


class _LosesItsReplies:
    """A network fault, armed in one peer's process before its averager forks: the first time this
    peer reduces a partition, it reduces it in full (so its own share of the round completes) but the
    averaged parts never reach the other senders, whose rounds fail after their parts went out."""

    armed = True

    @staticmethod
    def runner(base: type) -> type:
        class Runner(base):
            async def _accumulate_parts_streaming(self, stream, sender_index):
                replies = super()._accumulate_parts_streaming(stream, sender_index)
                try:
                    async for reply in replies:
                        if not _LosesItsReplies.armed:
                            yield reply
                    _LosesItsReplies.armed = False  # all parts reduced; their replies were lost
                finally:
                    await replies.aclose()
        return Runner


def _lose_replies(env: dict, lose: bool) -> None:
    """Arm (or disarm) the fault for averagers this peer opens from now on."""
    from stamen.train import averaging

    env.setdefault("runner", averaging.ExactAllReduceRunner)
    averaging.ExactAllReduceRunner = _LosesItsReplies.runner(env["runner"]) if lose else env["runner"]


def _doubts(env: dict) -> list[int]:
    with env["stage"]._lock:
        return [d.samples for d in env["stage"]._doubts]


def _close(env: dict) -> None:
    stage = env.pop("stage", None)
    if stage is not None:
        stage.shutdown()


def _call(env: dict, method: str, *args) -> Any:
    return getattr(env["stage"], method)(*args)


def _attr(env: dict, name: str) -> Any:
    return getattr(env["stage"], name)


def _params(env: dict) -> list[torch.Tensor]:
    return [p.detach().clone() for p in env["stage"].params]


def _accumulated(env: dict) -> tuple[int, int, list[torch.Tensor]]:
    stage = env["stage"]
    with stage._lock:
        return stage.epoch, stage._samples, [g.clone() for g in stage._grads]


@pytest.fixture(scope="module")
def peers():
    """Three worker processes (each its own DHT, joined), shared by the tests; each test opens its own
    StageAverager on them under a fresh prefix and closes it."""
    started = start_workers(3)
    yield started
    stop_workers(started)


def _all(peers: list[Worker], fn: Callable, *args) -> list[Any]:
    return on_all(peers, fn, *args, timeout=ROUND_TIMEOUT)


def _open_all(peers: list[Worker], target: int, averaging: str = "plain", optimizer: str = "sgd") -> None:
    prefix = f"test.stage.{uuid.uuid4().hex[:8]}.{averaging}"
    _all(peers, _open, prefix, target, averaging, optimizer)


def _round(peers: list[Worker]) -> list[bool]:
    """One round on all of ``peers`` together (each publishes its progress first, so that each sees
    the others at its epoch)."""
    _all(peers, _call, "_publish")
    return _all(peers, _call, "round")


def _grads(g: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(shape, generator=g) for shape in SHAPES]


def _sgd_reference(params: list[torch.Tensor], microbatches: list[tuple[int, list[torch.Tensor | None]]]):
    """One local SGD step on the weighted mean of the microbatches' gradients."""
    total = sum(samples for samples, _ in microbatches)
    out = []
    for i, p in enumerate(params):
        mean = sum((grads[i] if grads[i] is not None else torch.zeros_like(p)) * samples
                   for samples, grads in microbatches) / total
        out.append(p - LR * mean)
    return out


def _assert_bitwise_equal(all_params: list[list[torch.Tensor]]) -> None:
    for params in all_params[1:]:
        for a, b in zip(all_params[0], params, strict=True):
            assert torch.equal(a, b)


# --- tests ---


@pytest.mark.parametrize("n", [2, 3])
def test_plain_sgd_peers_stay_bitwise_equal_and_match_local_steps(peers, n):
    group = peers[:n]
    target = 6 * n
    _open_all(group, target)
    try:
        g = torch.Generator().manual_seed(n)
        expected = initial_params(0)
        for step in range(3):
            microbatches = []
            for rank, peer in enumerate(group):
                for index, samples in enumerate((2, 4)):  # unequal microbatches: a weighted mean
                    grads: list[torch.Tensor | None] = _grads(g)
                    if step == 1 and rank == 0 and index == 0:
                        grads[1] = None  # counts as zeros
                    assert peer.call(_call, "accumulate", f"t{rank}:{step}:{index}", samples, grads, step)
                    microbatches.append((samples, grads))
            assert _round(group) == [True] * n
            expected = _sgd_reference(expected, microbatches)
        assert _all(group, _attr, "epoch") == [3] * n
        assert all(sent > 0 for sent in _all(group, _attr, "last_round_bytes"))
        params = _all(group, _params)
        _assert_bitwise_equal(params)
        for got, want in zip(params[0], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    finally:
        _all(group, _close)


def test_duplicates_bad_gradients_epochs_and_a_peer_alone(peers):
    """One peer, alone in its stage: each microbatch id counts once, bad input changes nothing, a
    microbatch of another epoch is refused, and with the target batch by itself it applies its own mean."""
    peer = peers[0]
    _open_all([peer], target=5)
    try:
        g = torch.Generator().manual_seed(7)
        a, b = _grads(g), _grads(g)
        assert peer.call(_call, "accumulate", "a", 2, a, 0)
        assert not peer.call(_call, "accumulate", "a", 2, a, 0)  # a rerun of a counted microbatch
        before = peer.call(_accumulated)
        wrong_shape = [a[0], a[1][:-1], a[2]]
        nan = [a[0], a[1].clone().fill_(float("nan")), a[2]]
        for bad in (wrong_shape, nan, a[:2], [a[0], torch.full(SHAPES[1], float("inf")), a[2]]):
            with pytest.raises(InvalidRequestError):
                peer.call(_call, "accumulate", "bad", 3, bad, 0)
        with pytest.raises(InvalidRequestError):
            peer.call(_call, "accumulate", "zero", 0, a, 0)
        with pytest.raises(StageEpochError):
            peer.call(_call, "accumulate", "late", 3, b, 1)
        after = peer.call(_accumulated)
        assert after[:2] == before[:2] == (0, 2)
        for x, y in zip(after[2], before[2], strict=True):
            assert torch.equal(x, y)
        assert _round([peer]) == [False]  # 2 of 5 samples: nothing applied, nothing lost
        assert peer.call(_accumulated)[:2] == (0, 2)
        assert peer.call(_call, "accumulate", "b", 3, b, None)
        assert _round([peer]) == [True]
        expected = _sgd_reference(initial_params(0), [(2, a), (3, b)])
        for got, want in zip(peer.call(_params), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert peer.call(_accumulated)[:2] == (1, 0)
        with pytest.raises(StageEpochError):
            peer.call(_call, "accumulate", "c", 3, b, 0)  # the stage stepped past it
    finally:
        peer.call(_close)


def test_a_group_short_of_the_target_applies_nothing(peers):
    """Two of three peers average while the third (holding a third of the batch) stays out: the group
    holds fewer samples than the target, so both restore their gradients; when all three meet, the
    step counts every microbatch exactly once."""
    _open_all(peers, target=9)
    try:
        g = torch.Generator().manual_seed(11)
        microbatches = []
        for rank, peer in enumerate(peers):
            grads = _grads(g)
            assert peer.call(_call, "accumulate", f"m{rank}", 3, grads, 0)
            microbatches.append((3, grads))
        before = _all(peers, _accumulated)
        _all(peers, _call, "_publish")
        assert _all(peers[:2], _call, "round") == [False, False]
        for peer, (epoch, samples, grads) in zip(peers, before, strict=True):
            now = peer.call(_accumulated)
            assert now[:2] == (epoch, samples) == (0, 3)
            for x, y in zip(now[2], grads, strict=True):
                assert torch.equal(x, y)
        for params in _all(peers, _params):
            for got, want in zip(params, initial_params(0), strict=True):
                assert torch.equal(got, want)
        assert _round(peers) == [True] * 3
        params = _all(peers, _params)
        _assert_bitwise_equal(params)
        for got, want in zip(params[0], _sgd_reference(initial_params(0), microbatches), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    finally:
        _all(peers, _close)


def test_a_joiner_loads_a_bitwise_copy_and_steps_with_the_stage(peers):
    """AdamW: a peer that stepped alone twice hands its state to a new peer of its stage (other
    initial weights); the copy is bitwise, optimizer state included, and the two then step together."""
    first, joiner = peers[:2]
    prefix = f"test.stage.{uuid.uuid4().hex[:8]}.plain"
    first.call(_open, prefix, 4, "plain", "adamw", 0)
    try:
        g = torch.Generator().manual_seed(5)
        for step in range(2):
            assert first.call(_call, "accumulate", f"s{step}", 4, _grads(g), step)
            assert _round([first]) == [True]
        joiner.call(_open, prefix, 4, "plain", "adamw", 1)
        epoch, tensors, meta = first.call(_call, "state")
        assert epoch == 2 and any(k.startswith("optim.") for k in tensors)
        joiner.call(_call, "load_state", epoch, tensors, meta)
        epoch2, tensors2, meta2 = joiner.call(_call, "state")
        assert (epoch2, meta2) == (epoch, meta) and tensors2.keys() == tensors.keys()
        for key, value in tensors.items():
            assert torch.equal(tensors2[key], value), key
        for peer in (first, joiner):
            assert peer.call(_call, "accumulate", f"j{peer.process.pid}", 2, _grads(g), 2)
        assert _round([first, joiner]) == [True, True]
        _assert_bitwise_equal(_all([first, joiner], _params))
        states = _all([first, joiner], _call, "state")
        for key, value in states[0][1].items():
            assert torch.equal(states[1][1][key], value), key
    finally:
        _all([first, joiner], _close)


@pytest.mark.parametrize("averaging", ["acp", "powersgd"])
def test_compressed_averaging_keeps_peers_bitwise_equal(peers, averaging):
    """ACP-SGD and PowerSGD through StageAverager: 3 steps, the peers stay bitwise equal (the
    compressors' shared state too). PowerSGD's steps run from the background loop (``start``)."""
    group = peers[:2]
    _open_all(group, target=4, averaging=averaging)
    try:
        g = torch.Generator().manual_seed(3)
        if averaging == "powersgd":
            _all(group, _call, "start")
        for step in range(3):
            for rank, peer in enumerate(group):
                assert peer.call(_call, "accumulate", f"t{rank}:{step}", 2, _grads(g), step)
            if averaging == "powersgd":
                assert _all(group, _call, "wait_epoch", step + 1, 30.0) == [True, True]
            else:
                assert _round(group) == [True, True]
        params = _all(group, _params)
        _assert_bitwise_equal(params)
        assert not torch.equal(params[0][0], initial_params(0)[0])
        states = _all(group, _call, "state")
        averager_keys = [k for k in states[0][1] if k.startswith("averager.")]
        assert averager_keys
        for key in averager_keys:
            assert torch.equal(states[0][1][key], states[1][1][key]), key
    finally:
        _all(group, _close)


@pytest.mark.parametrize("applied", [True, False])
def test_a_round_that_failed_after_its_parts_went_out_counts_once(peers, applied):
    """One peer loses the replies of the partition it reduces: it applies the round, while its
    partner's round fails after its parts went out. The partner keeps those samples apart (in doubt),
    then loads the stage's state: if the state says the round was applied, the samples are spent and the
    next step counts every microbatch once (both peers bitwise equal to the local reference); if it says
    another attempt was applied instead, they go back to the accumulators."""
    faulty, partner = peers[:2]
    prefix = f"test.stage.{uuid.uuid4().hex[:8]}.plain"
    faulty.call(_lose_replies, True)
    try:
        faulty.call(_open, prefix, 4)
    finally:
        faulty.call(_lose_replies, False)  # the forked averager keeps it; later averagers do not
    partner.call(_open, prefix, 4)
    try:
        g = torch.Generator().manual_seed(13)
        first = [(2, _grads(g)), (2, _grads(g))]
        for rank, (peer, (samples, grads)) in enumerate(zip((faulty, partner), first, strict=True)):
            assert peer.call(_call, "accumulate", f"a{rank}", samples, grads, 0)
        assert _round([faulty, partner]) == [True, False]
        assert partner.call(_doubts) == [2]
        assert partner.call(_attr, "samples") == 2 and partner.call(_attr, "epoch") == 0
        assert not partner.call(_call, "accumulate", "a1", 2, first[1][1], 0)  # still counted once
        epoch, tensors, meta = faulty.call(_call, "state")
        assert epoch == 1 and len(meta["spent"]["0"]) == 2  # both peers' attempt tokens
        bad = dict(meta, spent={"0": "not a list"})
        with pytest.raises(InvalidRequestError):
            partner.call(_call, "load_state", epoch, tensors, bad)
        assert partner.call(_doubts) == [2] and partner.call(_attr, "epoch") == 0
        if not applied:  # the stage applied some other attempt at epoch 0
            meta = dict(meta, spent={"0": ["another attempt"]})
        partner.call(_call, "load_state", epoch, tensors, meta)
        assert partner.call(_doubts) == [] and partner.call(_attr, "epoch") == 1
        if not applied:
            assert partner.call(_accumulated)[:2] == (1, 2)
            return
        assert partner.call(_attr, "samples") == 0
        second = [(2, _grads(g)), (2, _grads(g))]
        for rank, (peer, (samples, grads)) in enumerate(zip((faulty, partner), second, strict=True)):
            assert peer.call(_call, "accumulate", f"b{rank}", samples, grads, 1)
        assert _round([faulty, partner]) == [True, True]
        params = _all([faulty, partner], _params)
        _assert_bitwise_equal(params)
        expected = _sgd_reference(_sgd_reference(initial_params(0), first), second)
        for got, want in zip(params[0], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    finally:
        _all([faulty, partner], _close)
