"""``stamen bench audit``: what inference audits cost and how fast they catch a liar.

A random Llama split over 3 loopback servers (the :class:`Harness`), plus a second server for every
span (so that every hop can be audited: audits use spare servers only) and a lying server of the
middle span (``stamen/testing/liar.py``: its outputs perturbed by 1 % relative noise) that routes
prefer when it is allowed (a higher announced throughput).

Side by side in one run, interleaved: ms per generated token (the whole ``generate`` call: prompt,
decoding, and the final audit before it returns) with ``verify="off"`` and with audits at the default
rate, the liar left out of every route; then, with the liar allowed, how many decoding steps each
generation took to catch it (``InferenceSession.detections``: steps from the liar joining the route to
its conviction), and whether the tokens equal an honest run's.
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
        audits = []
        for run in range(settings.runs):
            for verify in (("off", "audit") if run % 2 == 0 else ("audit", "off")):
                out, elapsed, session = generate(verify, False)
                times[verify].append(elapsed * 1000 / settings.new_tokens)
                if verify == "audit":
                    audits.append(len(session.audits))
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
        "| verify | ms/token | audits per generation |",
        "|---|---|---|",
        f"| off | {ms['off']:.2f} | 0 |",
        f"| audit | {ms['audit']:.2f} | {report['audits_per_generation']} |",
        "",
        f"Overhead: {report['overhead'] * 100:+.1f} %. Liar caught after {d['median']} decoding steps (median), "
        f"{d['worst']} (worst) over {d['runs_with_liar']} generations that used it ({d['missed']} missed); tokens "
        f"equal an honest run's: {'yes' if report['tokens_equal_with_liar'] else 'NO'}.",
    ])
