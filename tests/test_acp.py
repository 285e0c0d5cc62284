"""ACP-SGD (stamen/train/acp.py): the factorisation, error feedback, and one all-reduce per round
between real hivemind averagers on 127.0.0.1."""

from __future__ import annotations

import torch

from stamen.train.acp import (
    P_ROUND,
    Q_ROUND,
    ACPSGDGradientAverager,
    begin_round,
    compress,
    compressible,
    decompress,
    end_round,
)


def _factors(n: int, k: int, r: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, generator=g), torch.randn(k, r, generator=g)


def test_full_rank_rounds_are_exact_and_low_rank_ones_project():
    square = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    p, q = _factors(8, 8, 8)
    for phase in (P_ROUND, Q_ROUND):  # rank 8 of an 8 × 8 matrix: nothing is lost
        torch.testing.assert_close(decompress(compress(square, p, q, phase), p, q, phase), square, rtol=1e-4,
                                   atol=1e-4)
    m = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    p, q = _factors(12, 8, 2)
    assert compress(m, p, q, P_ROUND).shape == (12, 2) and compress(m, p, q, Q_ROUND).shape == (8, 2)
    approx = decompress(compress(m, p, q, P_ROUND), p, q, P_ROUND)
    assert torch.linalg.matrix_rank(approx) == 2
    # a projection onto the span of q's columns: applying it twice changes nothing, the rest is orthogonal
    torch.testing.assert_close(decompress(compress(approx, p, q, P_ROUND), p, q, P_ROUND), approx, rtol=1e-4, atol=1e-5)
    assert abs(float(((m - approx) * approx).sum())) < 1e-3


def _simulated_rounds(grads_per_round: list[list[torch.Tensor]], rank: int):
    """Peers whose all-reduce is an exact mean, running begin_round / end_round."""
    peers = len(grads_per_round[0])
    n, k = grads_per_round[0][0].shape
    p0, q0 = _factors(n, k, rank)
    state = [([torch.zeros(n, k)], [p0.clone()], [q0.clone()]) for _ in range(peers)]
    applied = []
    for t, grads in enumerate(grads_per_round):
        phase = t % 2
        sent = [begin_round(ms, ps, qs, [g], phase)[0] for (ms, ps, qs), g in zip(state, grads, strict=True)]
        mean = torch.stack(sent).mean(0)
        outs = []
        for ms, ps, qs in state:
            out = torch.empty(n, k)
            end_round(ms, ps, qs, [out], [mean.clone()], phase)
            outs.append(out)
        for out in outs[1:]:
            torch.testing.assert_close(out, outs[0], rtol=0, atol=0)  # every peer applies the same update
        applied.append(outs[0])
    return applied, state


def test_error_feedback_keeps_what_the_approximation_missed():
    """Over rounds, what was applied plus the mean of the peers' error feedback equals the mean of
    all gradients: nothing is lost, nothing counted twice; and the error stays bounded."""
    g = torch.Generator().manual_seed(2)
    rounds = [[torch.randn(16, 10, generator=g) for _ in range(3)] for _ in range(8)]
    applied, state = _simulated_rounds(rounds, rank=2)
    total_grads = sum(torch.stack(r).mean(0) for r in rounds)
    total_errors = torch.stack([ms[0] for ms, _, _ in state]).mean(0)
    torch.testing.assert_close(sum(applied) + total_errors, total_grads, rtol=1e-4, atol=1e-4)
    assert total_errors.norm() < total_grads.norm() * 2
    # the power iteration runs across rounds: a constant rank-1 gradient's subspace is found, so
    # after a few rounds each round applies it closely (the first, from random factors, does not)
    u = torch.randn(16, 1, generator=g) @ torch.randn(1, 10, generator=g)
    applied, _ = _simulated_rounds([[u, u] for _ in range(8)], rank=1)
    errors = [float((a - u).norm() / u.norm()) for a in applied]
    assert errors[0] > 0.5 and max(errors[4:]) < errors[0] / 4, errors


def test_which_tensors_are_factorised():
    assert not compressible(torch.Size([64]), 4, 0.5)
    assert compressible(torch.Size([64, 32]), 4, 0.5)
    assert not compressible(torch.Size([8, 6]), 4, 0.5)  # factors as large as half the matrix
    assert compressible(torch.Size([8, 4, 4]), 2, 0.5)  # flattened to 2-D


def test_two_averagers_run_one_allreduce_per_round_and_agree():
    """Two real hivemind averagers on loopback: each round sends one all-reduce, both peers get the
    same averaged gradients, and they equal the simulated rounds' (exact mean all-reduce)."""
    from hivemind import DHT

    torch.manual_seed(0)
    dht1 = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dht2 = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=dht1.get_visible_maddrs())
    shapes = [(24, 16), (16,)]
    params = [[torch.nn.Parameter(torch.zeros(s)) for s in shapes] for _ in range(2)]
    averagers = [ACPSGDGradientAverager(ps, 2, dht=dht, prefix="acp-test", target_group_size=2, start=True,
                                        min_matchmaking_time=1.0, request_timeout=5.0)
                 for ps, dht in zip(params, (dht1, dht2), strict=True)]
    try:
        g = torch.Generator().manual_seed(3)
        rounds = [[[torch.randn(s, generator=g) for s in shapes] for _ in range(2)] for _ in range(3)]
        expected, _ = _simulated_rounds([[grads[0] for grads in r] for r in rounds], rank=2)
        for t, grads in enumerate(rounds):
            for averager, ps, gs in zip(averagers, params, grads, strict=True):
                for p, grad in zip(ps, gs, strict=True):
                    p.grad = grad.clone()
                averager.accumulate_grads_(batch_size=1)
            controls = [a.step(wait=False, timeout=30) for a in averagers]
            for control in controls:
                control.result(60)
            results = []
            for averager in averagers:
                with averager.use_averaged_gradients() as averaged:
                    results.append([a.clone() for a in averaged])
            # hivemind's all-reduce hands each peer its delta to the mean: equal up to float rounding
            torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(results[0][0], expected[t], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(results[0][1], (grads[0][1] + grads[1][1]) / 2, rtol=1e-5, atol=1e-6)
            assert [a.allreduces for a in averagers] == [t + 1, t + 1]
            assert [a.phase for a in averagers] == [(t + 1) % 2] * 2
        # what one round sends: a 24×2 or 16×2 factor and the 16 plain values, against 24×16 + 16
        assert averagers[0].compressed_elements() < (24 * 16 + 16) / 4
    finally:
        for averager in averagers:
            averager.shutdown()
        dht2.shutdown()
        dht1.shutdown()
