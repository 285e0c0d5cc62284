"""Stamen: run and fine-tune large language models over a swarm of peers."""

from stamen.version import __version__

__all__ = [
    "AutoDistributedModelForCausalLM",
    "AutoDistributedModelForSequenceClassification",
    "DistributedModelForCausalLM",
    "DistributedModelForSequenceClassification",
    "__version__",
]


def __getattr__(name: str):
    # imported lazily: `import stamen` stays cheap for the CLI and the server
    if name in ("AutoDistributedModelForCausalLM", "DistributedModelForCausalLM"):
        from stamen.client import model

        return getattr(model, name)
    if name in ("AutoDistributedModelForSequenceClassification", "DistributedModelForSequenceClassification"):
        from stamen.client import classification

        return getattr(classification, name)
    raise AttributeError(name)
