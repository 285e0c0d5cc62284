"""``stamen bench inference`` / ``forward`` / ``suite``: the swarm side by side with local runs and offloading.

One process runs every contender (``stamen.bench.contenders``) on the same model and machine,
interleaved run by run, on one :class:`~stamen.bench.harness.Harness`: decoding at every prefix
(``decode``), forward tokens/s (``forward``), the analytic bound of offloading and a per-token
breakdown of a swarm decode step (``breakdown``). ``run_suite`` adds training (``stamen.bench.train``,
on its own swarm) and writes everything as one JSON and one Markdown file (``report``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from stamen.bench.breakdown import measured_stream_rate, offload_bound, run_breakdown
from stamen.bench.decode import run_decode
from stamen.bench.forward import run_forward
from stamen.bench.harness import BenchSettings, Harness
from stamen.bench.report import emit, markdown
from stamen.bench.timing import machine_info, say_to
from stamen.bench.train import run_train_bench


def run_inference_bench(settings: BenchSettings, json_only: bool = False, forward: bool = False,
                        breakdown: bool = True) -> dict:
    say = say_to(json_only)
    with Harness(settings, say) as h:
        report = {**h.header(), "decode": run_decode(h)}
        if forward:
            report["forward"] = run_forward(h)
        if breakdown:
            report["breakdown"] = run_breakdown(h)
        report["offload_bound"] = offload_bound(h, measured_stream_rate(h, report["decode"]))
    report["machine"] = machine_info()
    emit(report, json_only)
    return report


def run_forward_bench(settings: BenchSettings, json_only: bool = False) -> dict:
    say = say_to(json_only)
    with Harness(settings, say) as h:
        report = {**h.header(), "forward": run_forward(h)}
    report["machine"] = machine_info()
    emit(report, json_only)
    return report


def run_suite(settings: BenchSettings, out_dir: Path, train: bool = False, train_runs: int = 3,
              json_only: bool = False) -> dict:
    """Inference (prefixes, offload, bound, breakdown) and forward on one swarm; training (optional)
    with ``stamen.bench.train`` on its own swarm of the same model. Writes suite.json and suite.md."""
    say = say_to(json_only)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with Harness(settings, say) as h:
        report = {**h.header(), "decode": run_decode(h)}
        report["forward"] = run_forward(h)
        report["breakdown"] = run_breakdown(h)
        report["offload_bound"] = offload_bound(h, measured_stream_rate(h, report["decode"]))
        if train:
            say("training (stamen.bench.train) ...")
            quick = settings.runs == 1
            report["train"] = run_train_bench(
                model=h.model, num_servers=settings.servers, batch=2 if quick else 8, seq_len=16 if quick else 128,
                runs=1 if quick else train_runs, rank=8, pre_seq_len=4 if quick else 16, sub_batch_tokens=512,
                json_only=True, skip_memory=True, stateless=False)
    report["machine"] = machine_info()
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    (out_dir / "suite.json").write_text(json.dumps(report, indent=2))
    (out_dir / "suite.md").write_text(markdown(report) + "\n")
    emit(report, json_only)
    say(f"wrote {out_dir / 'suite.json'} and {out_dir / 'suite.md'} in {report['wall_seconds']} s")
    return report
