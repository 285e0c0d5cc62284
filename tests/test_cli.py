"""The CLI as a user runs it: dht, server lifecycle (withdraw on SIGTERM), generate streaming; and
options derived from the config objects (names, defaults and help from ``ServerConfig``, ``ClientConfig``)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from stamen.dht.records import ServerState, fetch_servers
from stamen.types import Span


@pytest.mark.swarm
def test_generate_command_streams_the_greedy_text(swarm, model_dirs):
    path = model_dirs["llama-gqa"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path)
    ids = tokenizer("The swarm", return_tensors="pt")["input_ids"]
    expected_ids = ref.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = tokenizer.decode(expected_ids[0, ids.shape[1]:], skip_special_tokens=True)
    proc = subprocess.run(
        [sys.executable, "-m", "stamen", "generate", path, "--initial-peers", *swarm.initial_peers,
         "--prompt", "The swarm", "--max-new-tokens", "12", "--no-eos"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected.strip()
    assert "route:" in proc.stderr and "ms/token" in proc.stderr
    # nothing but the route and the summary: no interpreter-exit noise a newcomer reads as a failure
    assert len(proc.stderr.strip().splitlines()) == 2, proc.stderr


@pytest.mark.swarm
def test_server_withdraws_on_sigterm(swarm, model_dirs):
    path = model_dirs["llama-gqa"]
    extra = swarm.add_server(path, Span(1, 3), "--torch-threads", "1")
    swarm.wait_online("llama-gqa", 6, [extra])
    peers_before = fetch_servers(swarm.client_dht(), "llama-gqa", 6)
    assert any(r.span == Span(1, 3) and r.state == ServerState.ONLINE for r in peers_before.values())
    assert swarm.stop_server(extra, signal.SIGTERM) == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        records = fetch_servers(swarm.client_dht(), "llama-gqa", 6)
        if all(not (r.span == Span(1, 3) and r.state == ServerState.ONLINE) for r in records.values()):
            break
        time.sleep(0.3)
    else:
        pytest.fail("the server still looks online after SIGTERM")
    assert "leaving" in extra.log_path.read_text()


@pytest.mark.swarm
def test_server_refuses_bad_blocks_option(model_dirs):
    proc = subprocess.run([sys.executable, "-m", "stamen", "server", model_dirs["llama-gqa"], "--blocks", "4:2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "START:END" in proc.stderr or "start < end" in proc.stderr


@pytest.mark.swarm
def test_client_waits_then_fails_with_missing_blocks(swarm, tmp_path):
    from stamen import AutoDistributedModelForCausalLM
    from stamen.errors import SwarmNotReadyError
    from stamen.testing.models import save_random_llama

    path = save_random_llama(tmp_path / "orphan", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                       num_attention_heads=2, num_key_value_heads=1))
    start = time.monotonic()
    with pytest.raises(SwarmNotReadyError, match="0-2") as info:
        AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, connect_timeout=2)
    assert info.value.missing_blocks == [0, 1, 2]
    assert time.monotonic() - start < 30


@pytest.mark.swarm
def test_blocked_servers_are_never_used(swarm, model_dirs):
    from stamen import AutoDistributedModelForCausalLM
    from stamen.errors import SwarmNotReadyError

    path = model_dirs["llama-gqa"]
    records = fetch_servers(swarm.client_dht(), "llama-gqa", 6)
    first = [p for p, r in records.items() if r.span == Span(0, 2) and r.state == ServerState.ONLINE]
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                            wait_for_servers=False, blocked_servers=first)
    try:
        with pytest.raises(SwarmNotReadyError, match="0-1"):
            model.swarm.route()
        allowed = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                  allowed_servers=list(records))
        try:
            assert {h.peer_id for h in allowed.swarm.route()} <= set(records)
        finally:
            allowed.shutdown()
    finally:
        model.shutdown()


@pytest.mark.swarm
def test_health_command_reports_servers_and_coverage(swarm, model_dirs):
    import json

    proc = subprocess.run(
        [sys.executable, "-m", "stamen", "health", model_dirs["qwen2-bias"], "--initial-peers", *swarm.initial_peers,
         "--json"], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["num_blocks"] == 4 and report["uncovered_blocks"] == []
    online = [s for s in report["servers"] if s["state"] == "online"]
    assert sorted((s["start"], s["end"]) for s in online) == [(0, 3), (3, 4)]
    assert report["block_servers"] == [1, 1, 1, 1] and report["bottleneck_throughput"] > 0
    text = subprocess.run(
        [sys.executable, "-m", "stamen", "health", model_dirs["qwen2-bias"], "--initial-peers", *swarm.initial_peers],
        capture_output=True, text=True, timeout=120,
    ).stdout
    assert "uncovered blocks: none" in text and "[0:3)" in text


# --- options derived from config objects (no swarm) ---

def _click_command(name: str):
    import typer.main

    from stamen.cli.main import app

    return typer.main.get_command(app).commands[name]


def _params(name: str) -> dict:
    return {p.name: p for p in _click_command(name).params}


def _flatten_fields(config) -> dict:
    """Field name -> (default, docstring) of a config, nested configs flattened into their fields."""
    from pydantic import BaseModel

    from stamen.cli.options import field_help

    out = {}
    for name, info in config.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            default = info.get_default(call_default_factory=True)
            for sub, (_, doc) in _flatten_fields(info.annotation).items():
                out[sub] = (getattr(default, sub), doc)
            continue
        default = ... if info.is_required() else info.get_default(call_default_factory=True)
        out[name] = (default, field_help(config, name))
    return out


def test_every_server_config_field_is_an_option_with_its_default_and_docstring():
    from stamen.server.config import ServerConfig

    params = _params("server")
    fields = _flatten_fields(ServerConfig)
    assert set(params) == set(fields)
    for name, (default, doc) in fields.items():
        param = params[name]
        assert param.help == doc, name
        if default is ...:
            assert param.required, name
        else:
            assert param.default == default, name
    # descriptions come from the attribute docstrings themselves
    assert ServerConfig.model_fields["max_cache_tokens"].description.startswith("KV cache budget, in tokens")
    assert params["model"].param_type_name == "argument"
    assert params["rebalance"].opts == ["--rebalance"] and params["rebalance"].secondary_opts == ["--no-rebalance"]
    assert params["max_cache_tokens"].opts == ["--max-cache-tokens"]
    assert params["initial_peers"].multiple and params["announce_maddrs"].multiple


def test_server_options_keep_their_names():
    names = {o for p in _click_command("server").params for o in p.opts + p.secondary_opts}
    for old in ["--initial-peers", "--blocks", "--num-blocks", "--max-memory", "--rebalance", "--no-rebalance",
                "--balance-period", "--balance-quality", "--move-jitter", "--move-grace", "--throughput-cache",
                "--dtype", "--compression", "--quant", "--device", "--max-cache-tokens", "--host", "--port",
                "--announce-maddrs", "--identity", "--dht-prefix", "--throughput", "--max-step-tokens",
                "--session-timeout", "--record-ttl", "--max-train-graphs", "--torch-threads", "--decode-threads",
                "--public-name"]:
        assert old in names, old


def _server_config(monkeypatch, *args: str):
    """The ServerConfig that ``stamen server ARGS`` would run with (the server itself is not started)."""
    from typer.testing import CliRunner

    from stamen.cli.main import app
    from stamen.server import server as server_module

    seen = []
    monkeypatch.setattr(server_module, "Server", lambda config: seen.append(config) or _NoRun())
    monkeypatch.setattr("stamen.cli.main.setup_logging", lambda *a: None)
    result = CliRunner().invoke(app, ["server", *args], env={"COLUMNS": "200"})
    return result, (seen[0] if seen else None)


class _NoRun:
    def run(self) -> None:
        pass


def test_server_options_build_the_config(monkeypatch):
    from stamen.server.config import ServerConfig
    from stamen.server.placement import PlacementSettings

    result, config = _server_config(monkeypatch, "some/model")
    assert result.exit_code == 0, result.output
    assert config == ServerConfig(model="some/model")
    result, config = _server_config(
        monkeypatch, "m", "--initial-peers", "/ip4/1.2.3.4/tcp/1/p2p/A", "--initial-peers", "/ip4/1.2.3.4/tcp/2/p2p/B",
        "--blocks", "2:5", "--max-memory", "6GiB", "--no-rebalance", "--balance-quality", "0.5", "--quant", "nf4",
        "--compression", "blockwise8", "--torch-threads", "2", "--port", "31337")
    assert result.exit_code == 0, result.output
    assert config.initial_peers == ["/ip4/1.2.3.4/tcp/1/p2p/A", "/ip4/1.2.3.4/tcp/2/p2p/B"]
    assert config.blocks == Span(2, 5) and config.max_memory == 6 << 30 and config.rebalance is False
    assert config.placement == PlacementSettings(balance_quality=0.5) and config.quant == "nf4"
    assert config.compression == "blockwise8" and config.torch_threads == 2 and config.port == 31337


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "Invalid value for '--port': Input should be less than 65536"),
    (["--dtype", "int4"], "Invalid value for '--dtype': dtype must be one of"),
    (["--blocks", "4:2"], "Invalid value for '--blocks': invalid span [4, 2): need 0 <= start < end"),
    (["--blocks", "4"], "Invalid value for '--blocks': expected blocks as START:END, got '4'"),
    (["--max-memory", "lots"], "Invalid value for '--max-memory': expected a size like 512MiB or 8GB"),
    (["--blocks", "0:2", "--num-blocks", "2"], "give at most one of blocks (--blocks A:B) or num_blocks"),
    (["--balance-quality", "2"], "Invalid value for '--balance-quality': Input should be less than or equal to 1"),
])
def test_bad_server_option_is_one_line_error(monkeypatch, args, message):
    result, config = _server_config(monkeypatch, "m", *args)
    assert result.exit_code == 2 and config is None
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if message in line]
    assert len(lines) == 1, result.output


def test_validation_errors_read_as_one_line_per_problem():
    from pydantic import ValidationError

    from stamen.cli.options import derive_options, explain
    from stamen.server.config import ServerConfig

    options = derive_options(ServerConfig)
    with pytest.raises(ValidationError) as info:
        ServerConfig(model="m", port=-1, placement=dict(balance_quality=0))
    assert explain(info.value, options) == [("--port", "Input should be greater than or equal to 0"),
                                            ("--balance-quality", "Input should be greater than 0")]


def test_server_help_runs():
    proc = subprocess.run([sys.executable, "-m", "stamen", "server", "--help"], capture_output=True, text=True,
                          timeout=60, env={**__import__("os").environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "--max-cache-tokens" in proc.stdout and "KV cache budget, in tokens" in proc.stdout
    assert "--no-rebalance" in proc.stdout and "--balance-quality" in proc.stdout


@pytest.mark.parametrize("command", ["generate", "api", "chat", "health"])
def test_client_commands_take_client_config_options(command):
    from stamen.cli.options import field_help
    from stamen.client.config import ClientConfig

    params = _params(command)
    derived = {n for n in params if n in ClientConfig.model_fields}
    expected = {"initial_peers", "dht_prefix"}
    if command in ("generate", "api"):  # inference: every client setting but the training ones
        expected = set(ClientConfig.model_fields) - {"sub_batch_tokens", "train_streams", "train_compression"}
    assert derived == expected
    for name in derived:
        assert params[name].help == field_help(ClientConfig, name), name
        info = ClientConfig.model_fields[name]
        if info.is_required():
            assert params[name].required
        else:
            assert params[name].default == info.get_default(call_default_factory=True), name


def test_generate_passes_client_options_to_the_model(monkeypatch):
    from typer.testing import CliRunner

    from stamen.cli.main import app
    from stamen.client import model as model_module

    calls = []

    class Stop(Exception):
        pass

    def from_pretrained(model, initial_peers, **kwargs):
        calls.append((model, initial_peers, kwargs))
        raise Stop

    monkeypatch.setattr(model_module.AutoDistributedModelForCausalLM, "from_pretrained", staticmethod(from_pretrained))
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: None)
    result = CliRunner().invoke(app, ["generate", "m", "--initial-peers", "/ip4/1.2.3.4/tcp/1/p2p/A",
                                      "--request-timeout", "7", "--no-use-push", "--blocked-servers", "X",
                                      "--compression", "blockwise8"])
    assert isinstance(result.exception, Stop), result.output
    [(model, peers, kwargs)] = calls
    assert model == "m" and peers == ["/ip4/1.2.3.4/tcp/1/p2p/A"]
    assert kwargs["request_timeout"] == 7 and kwargs["use_push"] is False and kwargs["blocked_servers"] == ["X"]
    assert kwargs["compression"] == "blockwise8" and kwargs["allowed_servers"] is None and kwargs["dht_prefix"] is None
    result = CliRunner().invoke(app, ["generate", "m", "--initial-peers", "p", "--max-retries", "-1"])
    assert result.exit_code == 2 and "Invalid value for '--max-retries'" in result.output


def test_simulate_options_come_from_sim_config():
    from stamen.cli.options import field_help
    from stamen.sim.simulate import SimConfig

    params = _params("simulate")
    renamed = {"num_servers": "servers", "num_blocks": "blocks", "churn_per_hour": "churn",
               "min_memory_blocks": "min_memory", "max_memory_blocks": "max_memory"}
    for name, (default, doc) in _flatten_fields(SimConfig).items():
        param = params[renamed.get(name, name)]
        assert param.default == default and param.help == doc, name
    assert params["rebalance"].secondary_opts == ["--no-rebalance"]
    assert field_help(SimConfig, "num_servers") == "Servers present at once (churn replaces them one for one)."


def test_the_command_line_starts_without_torch():
    """`stamen --help` and every option error answer at once, and `main()` sets GOMP_SPINCOUNT
    before torch loads (libgomp reads it once, when torch's library loads)."""
    import subprocess
    import sys

    code = "import sys, stamen.cli.main; print(sorted(m for m in ('torch', 'hivemind') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
