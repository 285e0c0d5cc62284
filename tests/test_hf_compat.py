"""The distributed model as transformers users expect of a causal LM: embeddings accessors, ``device``,
``can_generate()``, and ``transformers.pipeline("text-generation")`` generating through the swarm."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from stamen import AutoDistributedModelForCausalLM
from stamen.client.model import DistributedModelBase, DistributedModelForCausalLM

pytestmark = pytest.mark.swarm

NAME = "llama-gqa"


@pytest.fixture(scope="module")
def model(swarm, model_dirs):
    dmodel = AutoDistributedModelForCausalLM.from_pretrained(model_dirs[NAME], initial_peers=swarm.initial_peers,
                                                             request_timeout=30)
    yield dmodel
    dmodel.shutdown()


@pytest.fixture(scope="module")
def local(model_dirs):
    path = model_dirs[NAME]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_embeddings_are_the_checkpoint_modules(model, local):
    ref, _ = local
    embeddings = model.get_input_embeddings()
    assert embeddings is model.embed_tokens and isinstance(embeddings, torch.nn.Embedding)
    assert torch.equal(embeddings.weight, ref.get_input_embeddings().weight)
    head = model.get_output_embeddings()
    assert head is model.lm_head and isinstance(head, torch.nn.Linear)
    assert torch.equal(head.weight, ref.get_output_embeddings().weight)
    ids = torch.tensor([[5, 7, 11]])
    assert torch.equal(embeddings(ids), ref.get_input_embeddings()(ids))


def test_set_embeddings_replaces_the_modules(model_dirs, swarm):
    dmodel = AutoDistributedModelForCausalLM.from_pretrained(model_dirs[NAME], initial_peers=swarm.initial_peers,
                                                             wait_for_servers=False)
    try:
        new_in = torch.nn.Embedding(*dmodel.embed_tokens.weight.shape)
        new_out = torch.nn.Linear(dmodel.lm_head.in_features, dmodel.lm_head.out_features, bias=False)
        dmodel.set_input_embeddings(new_in)
        dmodel.set_output_embeddings(new_out)
        assert dmodel.get_input_embeddings() is new_in and dmodel.get_output_embeddings() is new_out
    finally:
        dmodel.shutdown()


def test_device_dtype_config_and_can_generate(model, local):
    ref, _ = local
    assert model.device == torch.device("cpu") == ref.device
    assert model.dtype == torch.float32 == ref.dtype
    assert model.can_generate() is True and DistributedModelForCausalLM.can_generate() is True
    assert DistributedModelBase.can_generate() is False
    assert model.config.model_type == "llama" and model.config.vocab_size == ref.config.vocab_size
    assert model.generation_config.eos_token_id == ref.generation_config.eos_token_id
    assert model.main_input_name == ref.main_input_name == "input_ids"


def test_text_generation_pipeline_generates_through_the_swarm(model, local, model_dirs):
    ref, tokenizer = local
    prompt = "The swarm of peers"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    expected = ref.generate(ids, max_new_tokens=10, do_sample=False)  # transformers' own greedy
    ours = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(ours, expected)

    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    assert pipe.model is model and pipe.device == torch.device("cpu")
    tokens = pipe(prompt, max_new_tokens=10, do_sample=False, return_tensors=True)
    assert tokens == [{"generated_token_ids": expected[0].tolist()}]

    local_pipe = pipeline("text-generation", model=ref, tokenizer=tokenizer)
    text = pipe(prompt, max_new_tokens=10, do_sample=False)
    assert text == local_pipe(prompt, max_new_tokens=10, do_sample=False)
    assert text[0]["generated_text"] == tokenizer.decode(expected[0], skip_special_tokens=True)
    new_text = pipe([prompt, "Hello"], max_new_tokens=6, do_sample=False, return_full_text=False)
    assert new_text == local_pipe([prompt, "Hello"], max_new_tokens=6, do_sample=False, return_full_text=False)
