"""The critical path of swarm decoding steps, from the marks of ``stamen/trace.py``.

Pure: takes the merged events of the client and servers and the route's spans; returns, per part
of a step (client hand-offs, each network leg, each server's wait, compute and send, the client's
head), the median milliseconds over the decoding steps found complete on the push path.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from stamen.types import Span

Event = tuple[int, str, str, int]  # (ns, role, event, step)


def _find(events: Sequence[Event], start: int, role: str, name: str) -> int | None:
    for i in range(start, len(events)):
        if events[i][1] == role and events[i][2] == name:
            return i
    return None


def step_parts(events: Sequence[Event], spans: Sequence[Span]) -> list[dict[str, float]]:
    """One dict (part -> ms) per decoding step whose every mark was found in order: the client's
    step (``c.step`` to ``c.logits``) through the first server, the pushes, and the last server's reply."""
    starts = [i for i, e in enumerate(events) if e[1] == "client" and e[2] == "c.step"]
    steps = []
    for n, first in enumerate(starts[1:], start=1):  # the first step is the prompt
        end = starts[n + 1] if n + 1 < len(starts) else len(events)
        window = events[first:end]
        marks = _path(window, spans)
        if marks is None:
            continue
        steps.append({name: (window[b][0] - window[a][0]) / 1e6 for name, a, b in marks})
    return steps


def _path(w: Sequence[Event], spans: Sequence[Span]) -> list[tuple[str, int, int]] | None:
    parts: list[tuple[str, int, int]] = []
    sent = _find(w, 0, "client", f"c.out{spans[0].start}")
    if sent is None:
        return None
    parts.append(("client: hand-off to its loop, encode, send", 0, sent))
    for k, span in enumerate(spans):
        role, last = f"server{span.start}", k == len(spans) - 1
        recv = _find(w, sent, role, "s.recv" if k == 0 else "s.recv_push")
        c0 = None if recv is None else _find(w, recv, role, "s.c0")
        c1 = None if c0 is None else _find(w, c0, role, "s.c1")
        out = None if c1 is None else _find(w, c1, role, "s.reply_out" if last else "s.push_out")
        if out is None:
            return None
        source = "client" if k == 0 else f"server {spans[k - 1]}"
        parts += [(f"network: {source} -> server {span}", sent, recv),
                  (f"server {span}: receive -> compute", recv, c0),
                  (f"server {span}: compute ({span.length} blocks)", c0, c1),
                  (f"server {span}: encode, {'reply' if last else 'push'}", c1, out)]
        sent = out
    got = _find(w, sent, "client", f"c.recv{spans[-1].start}")
    main = None if got is None else _find(w, got, "client", "c.main")
    head = None if main is None else _find(w, main, "client", "c.logits")
    if head is None:
        return None
    parts += [(f"network: server {spans[-1]} -> client", sent, got),
              ("client: decode, hand-off back", got, main),
              ("client: final norm, LM head, argmax", main, head)]
    return parts


def critical_path(events: Sequence[Event], spans: Sequence[Span]) -> dict:
    """Medians per part over the complete steps, with totals for network legs, servers' compute and
    everything else (hand-offs, decoding, encoding)."""
    steps = step_parts(events, spans)
    if not steps:
        return {"steps": 0}
    parts = {name: statistics.median(s[name] for s in steps) for name in steps[0]}
    totals = {"step": statistics.median(sum(s.values()) for s in steps)}
    totals["network legs"] = sum(v for k, v in parts.items() if k.startswith("network:"))
    totals["servers' compute"] = sum(v for k, v in parts.items() if ": compute (" in k)
    totals["client head"] = parts["client: final norm, LM head, argmax"]
    totals["hand-offs, encoding, decoding"] = sum(parts.values()) - totals["network legs"] \
        - totals["servers' compute"] - totals["client head"]
    return {"steps": len(steps), "parts_ms": {k: round(v, 3) for k, v in parts.items()},
            "totals_ms": {k: round(v, 3) for k, v in totals.items()}}
