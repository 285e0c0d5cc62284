"""``stamen bench swarm-train --quick`` runs end to end on the tiny model (real averaging peers, each its
own process, on 127.0.0.1) and writes JSON and Markdown with the expected keys and positive numbers.
Ratios are not checked: benchmarks are not tests."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from transformers import AutoConfig

from stamen.bench.swarm_train import KINDS, sent_bytes, stage_shapes
from stamen.testing.models import PRESETS
from stamen.types import Span


def test_bytes_of_an_allreduce_and_the_stage_shapes():
    assert sent_bytes([1000], 2) == 4000  # half its vector out, the reduced half back: S values of 4 bytes
    assert sent_bytes([900, 100], 3) == pytest.approx(2 * 1000 * 2 / 3 * 4)
    shapes = dict(stage_shapes(AutoConfig.for_model("llama", **PRESETS["246m"]), Span(0, 8)))
    assert shapes["blocks.0.self_attn.qkv_proj.weight"] == (1536, 1024)  # fused, as a --train server holds them
    assert sum(math.prod(s) for s in shapes.values()) == 90_193_920


def _check_averaging(a: dict) -> None:
    assert a["group_size"] == 2 and a["values"] > 0 and a["cells"]
    for cell in a["cells"]:
        assert set(cell["kinds"]) == set(KINDS)
        for kind, k in cell["kinds"].items():
            assert k["allreduce_s"] > 0 and k["step_s"] >= k["allreduce_s"]
            assert k["sent_mb_counted"] > 0 and len(k["raw"]) == a["rounds"]
            assert k["sent_mb_counted"] == pytest.approx(k["sent_mb_computed"], rel=0.05)  # 2 peers: equal shares
            assert k["allreduces_per_round"] == (2 if kind == "powersgd" else 1)
        assert cell["kinds"]["acp"]["values_per_round"] < cell["kinds"]["plain"]["values_per_round"]
        assert {"powersgd_over_acp_allreduce_s", "plain_over_acp_bytes_counted"} <= set(cell["ratios"])


@pytest.mark.timeout(120)
def test_bench_swarm_train_quick_averaging(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "stamen", "bench", "swarm-train", "--quick", "--loopback",
                           "--no-throughput-part", "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "swarm_train.json").read_text())
    assert json.loads(proc.stdout) == report
    assert report["num_blocks"] == 6 and "throughput" not in report
    _check_averaging(report["averaging"])
    assert [c["namespaces"] for c in report["averaging"]["cells"]] == [False]
    markdown = (out / "swarm_train.md").read_text()
    assert "### Averaging one stage's gradients" in markdown and "| unlimited (127.0.0.1) | acp |" in markdown
