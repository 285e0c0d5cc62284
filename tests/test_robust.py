"""CenteredClip (stamen/train/robust.py): the aggregate itself, and real hivemind averagers on
127.0.0.1 that keep to the honest peers' mean when one of four sends sign-flipped ×100 gradients."""

from __future__ import annotations

import pytest
import torch

from stamen.train.averaging import RobustAverager
from stamen.train.robust import centered_clip


def _honest(n: int, dim: int, seed: int, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(dim, generator=g)
    return mean, mean + noise * torch.randn(n, dim, generator=g)


def test_without_outliers_it_is_the_weighted_mean():
    _, vectors = _honest(5, 32, 0)
    weights = torch.tensor([1.0, 2.0, 1.0, 3.0, 1.0])
    center, factors = centered_clip(vectors, weights, tau=10.0)
    torch.testing.assert_close(center, (weights[:, None] * vectors).sum(0) / weights.sum(), rtol=1e-5, atol=1e-5)
    assert bool((factors == 1).all())


@pytest.mark.parametrize("honest,byzantine", [(3, 1), (3, 2)])
def test_sign_flipped_outliers_move_it_by_at_most_tau(honest, byzantine):
    mean, vectors = _honest(honest, 64, 1, noise=0.05)
    bad = -100 * vectors[:byzantine]
    all_vectors = torch.cat([vectors, bad])
    tau = 1.5  # above the honest spread plus the outliers' pull: honest vectors are never clipped
    center, factors = centered_clip(all_vectors, tau=tau)
    plain = all_vectors.mean(0)
    assert (plain - vectors.mean(0)).norm() > 50 * tau  # the mean is wrecked
    # each outlier pulls by at most tau per unit of weight: the bias is at most tau·b/(n-b)
    assert (center - vectors.mean(0)).norm() <= tau * byzantine / honest + 1e-3
    assert bool((factors[honest:] < 0.05).all()) and bool((factors[:honest] == 1).all())


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        centered_clip(torch.empty(0, 3))
    with pytest.raises(ValueError):
        centered_clip(torch.ones(2, 3), tau=0)


def test_averagers_keep_to_the_honest_mean_and_report_the_byzantine_peer():
    from hivemind import DHT
    from hivemind.averaging import DecentralizedAverager

    class RobustTensorAverager(RobustAverager, DecentralizedAverager):
        pass

    peers, dim, tau, rounds = 4, 1024, 3.0, 3
    dhts = [DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])]
    dhts += [DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=dhts[0].get_visible_maddrs())
             for _ in range(peers - 1)]
    tensors = [torch.zeros(dim) for _ in range(peers)]
    # equal bandwidths and 1 KiB parts: every peer reduces a quarter of the vector each round, so each
    # sees every sender (hivemind reduces a vector smaller than one part, 512 KiB by default, on one peer)
    averagers = [RobustTensorAverager([t], dht=dht, prefix="robust-test", target_group_size=peers, start=True,
                                      min_matchmaking_time=2.0, request_timeout=1.0, tau=tau, bandwidth=1000.0,
                                      part_size_bytes=1024)
                 for t, dht in zip(tensors, dhts, strict=True)]
    try:
        for r in range(rounds):
            mean, honest = _honest(peers - 1, dim, 10 + r)
            values = [*honest, -100 * honest[0]]  # the last peer is Byzantine
            for averager, value in zip(averagers, values, strict=True):
                with averager.get_tensors() as (t,):
                    t.copy_(value)
            controls = [a.step(wait=False, timeout=30) for a in averagers]
            for control in controls:
                control.result(60)
            for averager in averagers[:-1]:
                with averager.get_tensors() as (t,):
                    # in each of the four partitions the outlier's pull is at most tau/3
                    assert (t - honest.mean(0)).norm() <= 2 * tau / 3 + 0.05
                    assert (t - torch.stack(values).mean(0)).norm() > 100  # where the plain mean would be
        byzantine = str(averagers[-1].peer_id)
        for averager in averagers[:-1]:
            assert averager.suspects(rounds=rounds) == [byzantine], averager.clip_history
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()
