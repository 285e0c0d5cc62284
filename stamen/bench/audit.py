"""``stamen bench audit``: what inference audits cost and how fast they catch a liar.

A random Llama split over 3 loopback servers (the :class:`Harness`), plus a second server for every
span (so that every hop can be audited: audits use spare servers only) and a lying server of the
middle span (``stamen/testing/liar.py``: its outputs perturbed by 1 % relative noise) that routes
prefer when it is allowed (a higher announced throughput).

Side by side in one run, interleaved: ms per generated token (the whole ``generate`` call: prompt,
decoding, and the final audit before it returns) with ``verify="off"`` and with audits at the default
rate, the liar left out of every route, and the positions sent to auditors per generation (each hop's
audit session gets only the positions since its last audit: about the generation's length per hop);
then, with the liar allowed, how many decoding steps each generation took to catch it
(``InferenceSession.detections``: steps from the liar joining the route to its conviction), and
whether the tokens equal an honest run's.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

from stamen.bench.harness import BenchSettings, Harness
from stamen.bench.timing import machine_info, say_to
from stamen.dht.records import ServerState
from stamen.types import default_dht_prefix


@dataclass
class AuditBenchSettings:
    model: str | None = None
    """A model directory; None: a random Llama of ``preset``."""
    preset: str = "small"
    prompt: int = 16
    new_tokens: int = 128
    runs: int = 5
    """Generations per mode for the overhead (interleaved; medians)."""
    detection_runs: int = 10
    """Generations with the liar in the route."""
    audit_every: int = 32


def run_audit_bench(settings: AuditBenchSettings, json_only: bool) -> dict:
    say = say_to(json_only)
    bench = BenchSettings(model=settings.model, preset=settings.preset, servers=3, prefixes=[settings.prompt],
                          offload=False, cpu_offload=False)
    with Harness(bench, say) as h:
        name = default_dht_prefix(h.model)
        say("adding a second server for every span and a lying server (1 % noise) for " + str(h.spans[1]))
        before = set(h.swarm.wait_for(name, h.num_blocks, lambda r: r, "records"))
        spares = [h.swarm.add_server(h.model, span) for span in h.spans]
        liar = h.swarm.add_server(h.model, h.spans[1], "--throughput", "100000", "--public-name", "liar", lie="noise")
        records = h.swarm.wait_for(
            name, h.num_blocks,
            lambda r: r if sum(x.state == ServerState.ONLINE for x in r.values()) == len(before) + 4 else None,
            "spares and the liar online", servers=[*spares, liar], timeout=300)
        liar_id = next(p for p, r in records.items() if r.public_name == "liar")
        model, swarm = h.dmodel, h.dmodel.swarm
        swarm.config.audit_every = settings.audit_every
        swarm.servers(refresh=True)
        prompt = h.prompt(settings.prompt)

        def generate(verify: str, allow_liar: bool):
            swarm.forget_verdicts()
            swarm.config.verify = verify
            swarm.config.blocked_servers = [] if allow_liar else [liar_id]
            with model.inference_session(max_length=settings.prompt + settings.new_tokens) as session:
                start = time.perf_counter()
                out = model.generate(prompt, max_new_tokens=settings.new_tokens, do_sample=False, eos_token_id=None)
                elapsed = time.perf_counter() - start
            return out, elapsed, session

        expected, _, _ = generate("off", False)  # warm-up, and the honest tokens
        times: dict[str, list[float]] = {"off": [], "audit": []}
        audits, sent = [], []
        for run in range(settings.runs):
            for verify in (("off", "audit") if run % 2 == 0 else ("audit", "off")):
                out, elapsed, session = generate(verify, False)
                times[verify].append(elapsed * 1000 / settings.new_tokens)
                if verify == "audit":
                    audits.append(len(session.audits))
                    sent.append(sum(a.sent for a in session.audits))
            say(f"run {run + 1}/{settings.runs}: off {times['off'][-1]:.2f} ms/token, "
                f"audit {times['audit'][-1]:.2f} ms/token")
        latencies, equal, used = [], True, 0
        for run in range(settings.detection_runs):
            out, _, session = generate("audit", True)
            equal &= bool((out == expected).all())
            steps = [s for peer, s in session.detections if peer == liar_id]
            if steps or liar_id in [hop.peer_id for hop in session.route]:
                used += 1
                latencies.append(steps[0] if steps else None)
                say(f"detection run {run + 1}/{settings.detection_runs}: "
                    + (f"caught after {steps[0]} decoding steps" if steps else "NOT caught"))
            else:
                say(f"detection run {run + 1}/{settings.detection_runs}: the route did not use the liar")
        header = h.header()
    off, audit = statistics.median(times["off"]), statistics.median(times["audit"])
    caught = [x for x in latencies if x is not None]
    report = {
        **header, "bench": "audit", "settings": vars(settings), "machine": machine_info(),
        "ms_per_token": {"off": off, "audit": audit}, "overhead": audit / off - 1,
        "audits_per_generation": statistics.median(audits) if audits else 0,
        "positions_sent_per_generation": statistics.median(sent) if sent else 0,
        "detection_steps": {"median": statistics.median(caught) if caught else None,
                            "worst": max(caught) if caught else None, "runs_with_liar": used,
                            "missed": sum(x is None for x in latencies)},
        "tokens_equal_with_liar": equal, "raw": {"ms_per_token": times, "detection_steps": latencies},
    }
    if json_only:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(_markdown(report))
    return report


def _markdown(report: dict) -> str:
    s, d = report["settings"], report["detection_steps"]
    ms = report["ms_per_token"]
    return "\n".join([
        f"Inference audits, {report['model']} ({report['num_blocks']} blocks), 3 loopback servers + a spare for every "
        f"span + a lying one (1 % noise); {s['prompt']}-token prompt, {s['new_tokens']} new tokens, audit every "
        f"{s['audit_every']} steps; medians of {s['runs']} interleaved generations per mode",
        "",
        "| verify | ms/token | audits per generation | positions sent to auditors per generation |",
        "|---|---|---|---|",
        f"| off | {ms['off']:.2f} | 0 | 0 |",
        f"| audit | {ms['audit']:.2f} | {report['audits_per_generation']} | "
        f"{report['positions_sent_per_generation']} |",
        "",
        f"Overhead: {report['overhead'] * 100:+.1f} %. Liar caught after {d['median']} decoding steps (median), "
        f"{d['worst']} (worst) over {d['runs_with_liar']} generations that used it ({d['missed']} missed); tokens "
        f"equal an honest run's: {'yes' if report['tokens_equal_with_liar'] else 'NO'}.",
    ])


# --- CenteredClip's cost per averaging round against the mean (``stamen bench audit --clip``) ---


def _open_averagers(env: dict, prefix: str, elements: int, peers: int, tau: float) -> None:
    """Two averagers over the same ``elements`` values on this worker: one reducing with the mean,
    one with CenteredClip (separate groups)."""
    import torch
    from hivemind.averaging import DecentralizedAverager

    from stamen.train.averaging import ExactAveraging

    class _Averager(ExactAveraging, DecentralizedAverager):
        pass

    env["averagers"] = {
        aggregation: _Averager([torch.zeros(elements)], dht=env["dht"], prefix=f"{prefix}_{aggregation}",
                               aggregation=aggregation, tau=tau, target_group_size=peers, min_matchmaking_time=1.0,
                               request_timeout=0.5, bandwidth=1000.0, start=True)
        for aggregation in ("mean", "centered_clip")}
    env.setdefault("closers", []).append(lambda: [a.shutdown() for a in env.pop("averagers", {}).values()])


def _clip_round(env: dict, aggregation: str, rank: int, byzantine: bool, seed: int) -> float:
    """Fill this peer's vector (honest: a shared direction plus noise; Byzantine: ×-100) and time one
    all-reduce: matchmaking included, as a stage's round has it."""
    import torch

    averager = env["averagers"][aggregation]
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(averager.total_size, generator=g)
    g.manual_seed(seed * 1000 + rank + 1)
    with averager.get_tensors() as (t,):
        t.copy_(base + 0.1 * torch.randn(t.shape, generator=g))
        if byzantine:
            t.mul_(-100)
    start = time.perf_counter()
    averager.step(timeout=60)
    return time.perf_counter() - start


def run_clip_cost(peers: int = 4, elements: int = 1 << 22, rounds: int = 5, tau: float = 1.0,
                  json_only: bool = False) -> dict:
    """Seconds per all-reduce round with the mean and with CenteredClip, ``peers`` worker processes on
    127.0.0.1 (one Byzantine ×-100), interleaved rounds, medians; CPU time of the reduction is what
    differs (CenteredClip keeps every sender's part and iterates over them)."""
    import uuid

    from stamen.testing.workers import on_all, start_workers, stop_workers

    say = say_to(json_only)
    say(f"CenteredClip vs mean: {peers} peers, {elements:,} float32 values each, {rounds} rounds per aggregation")
    workers = start_workers(peers)
    times: dict[str, list[float]] = {"mean": [], "centered_clip": []}
    try:
        on_all(workers, _open_averagers, f"clipcost{uuid.uuid4().hex[:8]}", elements, peers, tau)
        for r in range(rounds + 1):  # the first round of each warms up and is not counted
            order = ("mean", "centered_clip") if r % 2 == 0 else ("centered_clip", "mean")
            for aggregation in order:
                for rank, worker in enumerate(workers):
                    worker.send(_clip_round, aggregation, rank, rank == peers - 1, r + 1)
                spent = max(worker.recv(120) for worker in workers)
                if r:
                    times[aggregation].append(spent)
                    say(f"round {r}/{rounds} {aggregation}: {spent * 1000:.0f} ms")
    finally:
        stop_workers(workers)
    mean, clip = statistics.median(times["mean"]), statistics.median(times["centered_clip"])
    report = {"bench": "clip_cost", "peers": peers, "elements": elements, "rounds": rounds, "tau": tau,
              "seconds_per_round": {"mean": mean, "centered_clip": clip}, "ratio": clip / mean,
              "raw": times, "machine": machine_info()}
    if json_only:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(f"\nAll-reduce round, {peers} peers on 127.0.0.1 (one Byzantine), {elements:,} float32 values, "
              f"medians of {rounds} interleaved rounds (matchmaking included)\n\n"
              "| aggregation | ms per round |\n|---|---|\n"
              f"| mean | {mean * 1000:.0f} |\n| CenteredClip (τ {tau}) | {clip * 1000:.0f} |\n\n"
              f"CenteredClip / mean: {clip / mean:.2f}×")
    return report
