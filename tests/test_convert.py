"""``stamen convert``: the converted SmolLM2 directory is the GGUF model, bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from stamen.models.convert import SMOLLM2_FILE, is_converted, smollm2_gguf


def test_converted_directory_equals_the_gguf_model(smol_dir, smol_local):
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf()
    assert gguf.name == SMOLLM2_FILE and is_converted(type(gguf)(smol_dir), gguf)
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    converted, tok = smol_local
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert tok.chat_template and "<|im_start|>" in tok.decode(ids[0])
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, converted(ids).logits)


def test_convert_cli_rejects_what_is_not_gguf(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"not a gguf file")
    result = subprocess.run([sys.executable, "-m", "stamen", "convert", str(bad), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "400"})  # no wrapped error box
    assert result.returncode == 2
    assert "is not a .gguf file" in result.stderr
    assert not (tmp_path / "out").exists()
