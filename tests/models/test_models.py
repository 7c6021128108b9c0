"""Models: the tiny default, saving in HF format, plain-transformers reload, LoRA."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tether.models import LoraConfig, apply_lora, count_parameters, load_model, load_tokenizer, save_model


def test_saved_model_reloads_with_plain_transformers_and_gives_same_logits(tiny_folder, tmp_path):
    model = load_model(tiny_folder)
    with torch.no_grad():  # perturb so the check is not about the initialisation
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    tokenizer = load_tokenizer(tiny_folder)
    save_model(model, tokenizer, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert not list((tmp_path / "m").glob("*.bin")) and not list((tmp_path / "m").glob("*.pt"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    plain_tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    ids = plain_tok("\n\nHuman: What is 3 plus 4?", return_tensors="pt").input_ids
    assert ids.tolist() == tokenizer("\n\nHuman: What is 3 plus 4?", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)


def test_tokenizer_round_trips_text_and_has_pad_and_chat_template(tiny_folder):
    tok = load_tokenizer(tiny_folder)
    text = "\n\nHuman: What is 11 plus 7?\n\nAssistant: 11 plus 7 is 18. #### 18"
    assert tok.decode(tok(text).input_ids) == text
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "\n\nHuman: Hi\n\nAssistant:"
    assert tok.decode(tok("naïve ☃").input_ids) == "naïve ☃"  # byte-level: nothing is unknown


def test_split_digits_gives_every_digit_its_own_token_and_still_round_trips():
    from tether.models import train_tokenizer

    corpus = [f"What is {a} plus {b}? {a} plus {b} is {a + b}. #### {a + b}" for a in range(40) for b in range(40)]
    text = "What is 13 plus 27? 13 plus 27 is 40. #### 40"
    merged, split = train_tokenizer(corpus, 400), train_tokenizer(corpus, 400, split_digits=True)
    for tok in (merged, split):
        assert tok.decode(tok(text).input_ids) == text
    pieces = [p.lstrip("Ġ") for p in split.convert_ids_to_tokens(split(text).input_ids)]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("132713274040")
    assert any(len(p.lstrip("Ġ")) > 1 and p.lstrip("Ġ").isdigit()
               for p in merged.convert_ids_to_tokens(merged(text).input_ids))  # BPE merged a number


def test_lora_trains_adapters_only_and_saves_merged(tiny_folder, tmp_path):
    model = load_model(tiny_folder)
    full = count_parameters(model, trainable_only=True)
    lora = apply_lora(model, LoraConfig(r=4, alpha=8))
    trainable = count_parameters(lora, trainable_only=True)
    assert 0 < trainable < full / 5
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)  # B starts at zero; make the adapter change the output
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = lora(ids).logits
    save_model(lora, load_tokenizer(tiny_folder), tmp_path / "merged")
    assert (tmp_path / "merged" / "adapter").is_dir()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, expected, atol=1e-5)


def test_a_reward_model_reads_the_final_eos_even_when_pad_is_eos(tiny_folder):
    """Hub tokenizers pad with EOS; the score must still be read at a finished response's EOS (transformers'
    own pooling skips it: a finished and a truncated response scored the same, 0.0532538 both, on SmolLM2)."""
    from tether.data.collate import Encoded, pad
    from tether.models.reward import load_reward_model, raw_scores

    tokenizer = load_tokenizer(tiny_folder)
    eos = tokenizer.eos_token_id
    rm = load_reward_model(tiny_folder, tokenizer).eval()
    rm.config.pad_token_id = eos  # pad = EOS, as load_tokenizer sets for most hub tokenizers
    ids = tokenizer("\n\nHuman: What is 2 plus 2?\n\nAssistant: 2 plus 2 is 4.")["input_ids"]
    finished, truncated, short = ids + [eos], ids, ids[:5]
    batch = pad([Encoded(r, r) for r in (finished, truncated, short)], eos)  # right-padded with EOS
    with torch.no_grad():
        scores = raw_scores(rm, batch["input_ids"], batch["attention_mask"])
        alone = [raw_scores(rm, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)).item()
                 for r in (finished, truncated, short)]
        hf = rm(input_ids=torch.tensor([finished])).logits[0, 0].item()  # transformers' pooling
    assert scores.tolist() == pytest.approx(alone, abs=1e-5)  # padding changes nothing
    assert abs(scores[0] - scores[1]) > 1e-4  # the EOS is read: finished and truncated differ
    assert hf == pytest.approx(alone[1], abs=1e-5)  # what transformers reads instead: the token before the EOS
