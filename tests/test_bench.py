"""``stamen bench suite --quick`` runs end to end on a tiny model (real swarm, real offloading) and
writes JSON and Markdown with the expected keys. Numbers are not checked: benchmarks are not tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from stamen.bench.breakdown import LLAMA2_70B, block_params, offload_bound
from stamen.bench.harness import BenchSettings, Harness


def test_offload_bound_of_a_70b_shape():
    params = block_params(LLAMA2_70B["hidden_size"], LLAMA2_70B["intermediate_size"],
                          LLAMA2_70B["num_attention_heads"], LLAMA2_70B["num_key_value_heads"])
    assert params * 80 == pytest.approx(68.5e9, rel=0.01)  # Llama-2-70B without embeddings and head
    bound = offload_bound()["models"]["Llama-2-70B shape (80 blocks, float16)"]
    assert bound["ms_per_token"]["PCIe 4.0 x16 (~25 GB/s)"] == pytest.approx(5476, rel=0.01)


@pytest.mark.timeout(120)
def test_bench_suite_quick(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "stamen", "bench", "suite", "--quick", "--preset", "tiny",
                           "--out", str(out), "--json"], capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "suite.json").read_text())
    assert json.loads(proc.stdout) == report
    assert report["num_blocks"] == 6 and report["servers"] == 3
    prefixes = report["decode"]["prefixes"]
    assert set(prefixes) == {"16", "64"}
    for p in prefixes.values():
        assert {"local", "swarm", "blocks", "blocks_head", "disk_offload", "cpu_offload"} <= set(p["contenders"])
        for c in p["contenders"].values():
            assert c["ms_per_token"] > 0 and c["steps_per_s"] > 0 and c["time_to_first_token_ms"] > 0
        assert {"swarm_over_local", "swarm_over_blocks", "swarm_over_blocks_with_head",
                "disk_offload_over_swarm"} <= set(p["ratios"])
        assert p["swarm_server_compute_ms_per_token"] > 0
    assert "disk_offload_cold" in prefixes["16"]["contenders"]
    assert set(report["forward"]) == {"1x16", "4x8"}
    for f in report["forward"].values():
        assert f["local"]["tokens_per_s"] > 0 and f["swarm"]["tokens_per_s"] > 0
        assert f["disk_offload"]["tokens_per_s"] > 0
    parts = report["breakdown"]["parts_ms"]
    assert any(k.startswith("attention") for k in parts) and any(k.startswith("MLP") for k in parts)
    assert any(k.startswith("network wait") for k in parts) and any(k.startswith("serialization") for k in parts)
    assert "Llama-2-70B shape (80 blocks, float16)" in report["offload_bound"]["models"]
    markdown = (out / "suite.md").read_text()
    assert "Prefix 16" in markdown and "### Forward" in markdown and "network wait" in markdown


@pytest.mark.timeout(120)
def test_a_failed_run_keeps_the_swarms_logs_and_removes_its_other_files():
    """A benchmark run that fails keeps the servers' logs for diagnosis and removes the rest."""
    settings = BenchSettings.quick(preset="tiny")
    settings.offload = settings.cpu_offload = False
    harness = Harness(settings, say=lambda message: None)
    with pytest.raises(RuntimeError, match="boom"), harness:
        assert harness.workdir.is_dir()
        raise RuntimeError("boom")
    try:
        assert not harness.workdir.exists()
        assert harness.kept_logs is not None
        assert sorted(p.name for p in harness.kept_logs.glob("server*.log")) == [
            "server0-0-2.log", "server1-2-4.log", "server2-4-6.log"]
    finally:
        if harness.kept_logs is not None:
            shutil.rmtree(harness.kept_logs.parent)
