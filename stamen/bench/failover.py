"""``stamen bench failover``: how long generation stalls when the server in use dies (SIGKILL) or
hangs (SIGSTOP) mid-generation, with 1 and with 4 concurrent clients.

A random Llama split over 3 loopback servers (the :class:`Harness`), plus a second server for the
middle span. Every trial runs the clients' generations (each its own inference session, all in
this process, as `stamen api` runs requests), signals the middle server of the first client's
route at a fixed token, and measures per client that used it: the stall (the longest gap between
tokens less the median gap), the part of it spent replacing the server (routing, opening,
replaying: ``InferenceSession.recovery_s``), the rest being the time to notice the failure, and
whether the tokens equal a failure-free run.
The client's request timeout stays at the harness's 600 s: a hang is found by the client's hang
detection (``ClientConfig.hang_timeout``), not by a timeout. After each trial the signalled server
is killed and a fresh one takes its place.
"""

from __future__ import annotations

import json
import signal
import statistics
import threading
from dataclasses import dataclass, field

import torch

from stamen.bench.harness import BenchSettings, Harness
from stamen.bench.timing import TokenClock, machine_info, say_to
from stamen.client.session import InferenceSession
from stamen.dht.records import ServerState
from stamen.testing.swarm import ServerProcess
from stamen.types import Span, default_dht_prefix

SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


@dataclass
class FailoverSettings:
    model: str | None = None
    """A model directory; None: a random Llama of ``preset``."""
    preset: str = "small"
    prompt: int = 16
    new_tokens: int = 32
    fault_at: int = 10
    """The generated token after which the server is signalled."""
    runs: int = 3
    """Trials per (signal, client count); medians over every client of every trial."""
    clients: list[int] = field(default_factory=lambda: [1, 4])
    signals: list[str] = field(default_factory=lambda: ["kill", "stop"])


@dataclass
class _Client:
    clock: TokenClock
    session: InferenceSession | None = None
    out: torch.Tensor | None = None
    error: BaseException | None = None


def _peer_of(server: ServerProcess, peers) -> str | None:
    """The peer id among ``peers`` of the server (from the line where it logs its own addresses as it
    starts: other lines may name other servers, e.g. the next one's when a push stream ends)."""
    own = [line for line in server.log_path.read_text(errors="replace").splitlines() if "joining; visible at" in line]
    return next((p for p in peers if any(f"/p2p/{p}" in line for line in own)), None)


def _start_server(h: Harness, span: Span, name: str) -> ServerProcess:
    """A fresh server of ``span``, once the DHT shows it online and the client's view has it."""
    server = h.swarm.add_server(h.model, span)

    def online(records):
        peer = _peer_of(server, records)
        return peer if peer is not None and records[peer].state == ServerState.ONLINE else None

    h.swarm.wait_for(name, h.num_blocks, online, "the new server online", servers=[server])
    h.dmodel.swarm.servers(refresh=True)
    return server


def _trial(h: Harness, settings: FailoverSettings, sig: int, clients: int, prompt: torch.Tensor,
           expected: torch.Tensor, span: Span) -> tuple[list[dict], ServerProcess]:
    """One trial; returns every client's measures and the server signalled (the one serving
    ``span`` in the first client's route)."""
    max_length = prompt.shape[1] + settings.new_tokens
    states = [_Client(TokenClock()) for _ in range(clients)]
    victims: list[ServerProcess] = []

    def signal_victim() -> None:
        if len(states[0].clock.times) == settings.fault_at + 1 and not victims:  # times[0]: the prompt
            peer = next(hop.peer_id for hop in states[0].session.route if hop.blocks == span)
            victims.append(next(s for s in h.swarm.servers if s.proc.poll() is None and _peer_of(s, [peer])))
            h.swarm.signal_group(victims[0], sig)

    states[0].clock.on_put = signal_victim

    def run(state: _Client) -> None:
        try:
            with InferenceSession(h.dmodel.swarm, max_length) as session:
                state.session = session
                state.out = h.dmodel.generate(prompt, max_new_tokens=settings.new_tokens, do_sample=False,
                                              eos_token_id=None, streamer=state.clock, session=session)
        except BaseException as e:  # reported in the results
            state.error = e

    threads = [threading.Thread(target=run, args=(s,)) for s in states]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = []
    for i, state in enumerate(states):
        if state.error is not None or state.session is None:
            results.append({"client": i, "error": repr(state.error)})
            continue
        gaps = state.clock.gaps_ms()
        stall = (max(gaps) - statistics.median(gaps)) / 1000
        replace = sum(state.session.recovery_s)
        results.append({
            "client": i, "recoveries": state.session.recoveries, "used_victim": state.session.recoveries > 0,
            "stall_s": stall, "replace_s": replace, "detect_s": stall - replace,
            "median_gap_ms": statistics.median(gaps), "tokens_equal": bool(torch.equal(state.out, expected)),
        })
    if not victims:
        raise RuntimeError("the fault was never injected")
    return results, victims[0]


def run_failover_bench(settings: FailoverSettings, json_only: bool) -> dict:
    say = say_to(json_only)
    bench = BenchSettings(model=settings.model, preset=settings.preset, servers=3, prefixes=[settings.prompt],
                          offload=False, cpu_offload=False)
    cells: dict[str, list[dict]] = {}
    with Harness(bench, say) as h:
        name = default_dht_prefix(h.model)
        middle = h.spans[1]
        say(f"adding a second server for {middle}: the replacement")
        _start_server(h, middle, name)
        prompt = h.prompt(settings.prompt)
        expected = h.dmodel.generate(prompt, max_new_tokens=settings.new_tokens, do_sample=False, eos_token_id=None)
        for sig_name in settings.signals:
            for clients in settings.clients:
                key = f"{sig_name}/{clients}"
                cells[key] = []
                for run in range(settings.runs):
                    results, victim = _trial(h, settings, SIGNALS[sig_name], clients, prompt, expected, middle)
                    h.swarm.signal_group(victim, signal.SIGKILL)  # a stopped server is reaped too
                    victim.proc.wait()
                    cells[key].extend({**r, "run": run, "victim": victim.log_path.name} for r in results)
                    used = [r for r in results if r.get("used_victim")]
                    say(f"{sig_name}, {clients} client(s), run {run + 1}/{settings.runs}: stalls "
                        + ", ".join(f"{r['stall_s']:.2f} s" for r in used)
                        + f" ({len(used)}/{clients} clients used the failed server)")
                    _start_server(h, middle, name)  # two servers for the middle span again
        header = h.header()
    report = {**header, "bench": "failover", "settings": vars(settings), "machine": machine_info(),
              "cells": {key: _summary(rows) for key, rows in cells.items()}, "raw": cells}
    if json_only:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(_markdown(report))
    return report


def _summary(rows: list[dict]) -> dict:
    used = [r for r in rows if r.get("used_victim")]

    def med(key: str) -> float | None:
        return statistics.median(r[key] for r in used) if used else None

    return {"clients_measured": len(used), "errors": sum("error" in r for r in rows),
            "stall_s": med("stall_s"), "detect_s": med("detect_s"), "replace_s": med("replace_s"),
            "max_stall_s": max((r["stall_s"] for r in used), default=None),
            "tokens_equal": all(r.get("tokens_equal", False) for r in rows)}


def _markdown(report: dict) -> str:
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    lines = [f"Failover stall, {report['model']} ({report['num_blocks']} blocks), 3 loopback servers + a second "
             "middle one, "
             f"{report['settings']['new_tokens']} tokens, fault after token {report['settings']['fault_at']}; "
             "medians over every client that used the failed server",
             "",
             "| fault | clients | stall (s) | detect (s) | replace + replay (s) | worst stall (s) | tokens equal "
             "| errors |",
             "|---|---|---|---|---|---|---|---|"]
    for key, c in report["cells"].items():
        sig, clients = key.split("/")
        fault = "SIGKILL (died)" if sig == "kill" else "SIGSTOP (hung)"
        lines.append(f"| {fault} | {clients} | {f(c['stall_s'])} | {f(c['detect_s'])} | {f(c['replace_s'])} | "
                     f"{f(c['max_stall_s'])} | {'yes' if c['tokens_equal'] else 'NO'} | {c['errors']} |")
    return "\n".join(lines)
