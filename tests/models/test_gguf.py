"""`tether model import-gguf`: a real chat model offline, as a plain Hugging Face folder."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import error_line, invoke


@pytest.mark.slow
def test_smollm2_imports_as_a_plain_folder_with_the_same_logits_and_its_chat_template(smollm2_folder):
    from transformers import AutoModelForCausalLM

    from tether.models import load_model, load_tokenizer
    from tether.models.gguf import smollm2_gguf

    tokenizer, model = load_tokenizer(smollm2_folder), load_model(smollm2_folder).eval()
    assert (smollm2_folder / "model.safetensors").exists() and model.config.vocab_size == 49152
    assert not hasattr(model.config, "quantization_config")  # plain fp32 weights: any tool loads them
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"  # pad = EOS, as most hub chat models
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 2?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n<|im_start|>assistant\n")
    generation = json.loads((smollm2_folder / "generation_config.json").read_text())
    assert set(generation) - {"transformers_version", "_from_model_config"} == \
        {"bos_token_id", "eos_token_id", "pad_token_id"}  # no sampling settings to bias a KL estimate
    gguf = smollm2_gguf()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tokenizer(chat, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, direct(ids).logits, atol=1e-5)


def test_a_missing_file_or_a_used_folder_is_one_line(tmp_path):
    result = invoke("model", "import-gguf", tmp_path / "nope.gguf", "--out", tmp_path / "m")
    assert result.exit_code == 1 and error_line(result.output).startswith(f"Error: {tmp_path / 'nope.gguf'}: no such")
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    result = invoke("model", "import-gguf", tmp_path / "x.gguf", "--out", used)
    assert result.exit_code == 1 and "is not an empty folder" in error_line(result.output)
    assert (used / "notes.txt").read_text() == "mine"
