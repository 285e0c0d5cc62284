"""The analytic model of ``stamen bench network``: how many milliseconds the network alone adds to a
decode step, a time to first token and a forward (round trips, bandwidth, libp2p's stream window),
and a cell's prediction from the base cell's measurement."""

from __future__ import annotations

import math

STREAM_WINDOW = 256 * 1024
"""Bytes one libp2p stream may have in flight: hivemind 1.1.12's daemon does not grow a stream's
window, so a message longer than it waits a round trip per further window, while separate streams
each get their own (docs/benchmarks.md, stream windows)."""
MESSAGE_OVERHEAD = 300
"""Bytes of metadata and framing assumed per message besides the tensor (a typed JSON message,
protobuf and libp2p framing) by the analytic model."""


def sub_batches(batch: int, length: int, sub_batch_tokens: int = 512) -> int:
    """How many sub-batches the client splits a forward into (``ClientConfig.sub_batch_tokens``)."""
    per = max(1, sub_batch_tokens // max(1, length))
    return math.ceil(batch / per)


def network_ms(servers: int, rtt_ms: float, bits_per_s: float, hidden_size: int, prefix: int,
               forward_batches: list[int], forward_length: int, bytes_per_value: int = 4) -> dict[str, float]:
    """Milliseconds the network alone adds to each measurement. One message of N bytes on one
    libp2p stream takes RTT/2 + N/bandwidth + (⌈N/W⌉ − 1) × RTT one way: a stream may have at most
    ``STREAM_WINDOW`` (W) bytes in flight, so each further window waits a round trip for the
    window update (yamux flow control in hivemind's libp2p daemon; measured, see the docs).

    - decode, push on: the step crosses ``servers + 1`` links one way (client → s1 → … → sN →
      client); push off: the client calls each server in turn (2 × servers crossings);
    - time to first token: opening the sessions (one round trip, all servers at once) + the same
      paths with a ``prefix``-token message;
    - forward of B × T tokens through ``servers`` stateless hops called in turn by the client, per
      sub-batch chain (sub-batches share the links' bandwidth and run at once, each on its streams).
    """
    def one_way(nbytes: float, stream_bytes: float | None = None) -> float:
        wire = 0.0 if math.isinf(bits_per_s) else 1000 * 8 * (nbytes + MESSAGE_OVERHEAD) / bits_per_s
        windows = math.ceil(((stream_bytes if stream_bytes is not None else nbytes) + MESSAGE_OVERHEAD) / STREAM_WINDOW)
        return rtt_ms / 2 + wire + max(0, windows - 1) * rtt_ms

    token, prompt = hidden_size * bytes_per_value, prefix * hidden_size * bytes_per_value
    out = {
        "push_ms_per_token": (servers + 1) * one_way(token),
        "push_off_ms_per_token": 2 * servers * one_way(token),
        "push_ttft_ms": rtt_ms + (servers + 1) * one_way(prompt),
        "push_off_ttft_ms": rtt_ms + 2 * servers * one_way(prompt),
    }
    for batch in forward_batches:
        n = sub_batches(batch, forward_length)
        total = batch * forward_length * hidden_size * bytes_per_value
        out[f"forward_b{batch}_ms"] = 2 * servers * one_way(total, total / n)
    return out


def predict(base: dict[str, float], base_network: dict[str, float], network: dict[str, float],
            forward_length: int) -> dict[str, float]:
    """The analytic model: a cell's time = the base cell's measured time (highest bandwidth, lowest
    round trip) − the network time ``network_ms`` gives the base cell (what is left: compute and
    local overheads, C) + the network time it gives this cell (N). A forward split into n > 1
    sub-batches gets a range: from C + N (nothing overlaps) to max(C, N + C/n) (the sub-batch
    chains overlap one another's network waits with compute). Tokens/s keys are converted."""
    out: dict[str, float | list[float]] = {}
    for key, value in base.items():
        if key.endswith("_tokens_per_s"):
            batch = int(key[len("forward_b"):-len("_tokens_per_s")])
            tokens = batch * forward_length
            net = f"forward_b{batch}_ms"
            compute = 1000 * tokens / value - base_network[net]
            n = sub_batches(batch, forward_length)
            serial = compute + network[net]
            overlapped = max(compute, network[net] + compute / n)
            out[key] = 1000 * tokens / serial if n == 1 else [1000 * tokens / serial, 1000 * tokens / overlapped]
        elif key in network:
            out[key] = value - base_network[key] + network[key]
    return out
