"""tether's decoding loop gives generate's tokens from the same seed: left padding, EOS stops, warpers, greedy,
eager attention, LoRA; and models it cannot drive go to generate."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from tether.decoding import decode, decoder_of
from tether.models import load_model, load_tokenizer
from tether.rollout import sample

SETTINGS = [dict(greedy=False), dict(greedy=False, temperature=0.7, top_k=20, top_p=0.9), dict(greedy=True)]
PROMPTS = ["1 + 2 =", "12 + 30 = 42 ; 7 + 8 =", "3", "40 + 2 = 42 ; 5 + 5 = 10 ; 9 +"]  # left padding, 4 widths


def _generate(model, enc, new, eos, pad, greedy=False, temperature=1.0, top_k=0, top_p=1.0):
    model.generation_config = GenerationConfig()  # tether's settings only, as rollout.sample has it
    sampling = {} if greedy else dict(temperature=temperature, top_k=top_k, top_p=top_p)
    return model.generate(**enc, max_new_tokens=new, do_sample=not greedy, pad_token_id=pad, eos_token_id=eos,
                          **sampling)


def _both(model, tok, prompts, new, eos, settings, seed=3):
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    expected = _generate(model, enc, new, eos, tok.pad_token_id, **settings)
    torch.manual_seed(seed)
    got = decode(decoder_of(model), enc["input_ids"], enc["attention_mask"], max_new_tokens=new, eos_token_id=eos,
                 pad_token_id=tok.pad_token_id, **settings)
    return expected, got


@pytest.mark.parametrize("settings", SETTINGS, ids=["sampled", "warped", "greedy"])
def test_the_decoding_loop_gives_generates_tokens(tiny_folder, settings):
    model, tok = load_model(tiny_folder).eval(), load_tokenizer(tiny_folder)
    expected, got = _both(model, tok, PROMPTS, 24, None, settings)  # no stop: every row 24 new tokens
    assert torch.equal(got, expected)
    eos = int(got[:, -24:].flatten().bincount().argmax())  # a token sampled often, made the EOS:
    expected, got = _both(model, tok, PROMPTS, 24, eos, settings)  # rows end at their own steps
    assert torch.equal(got, expected)
    width = tok(PROMPTS, return_tensors="pt", padding=True)["input_ids"].shape[1]
    assert (got[:, width:] == eos).any()


@pytest.mark.parametrize("settings", SETTINGS[:2], ids=["sampled", "warped"])
def test_repeated_prompts_prefill_once_and_ended_rows_leave_the_batch(tiny_folder, settings):
    """A batch of repeated prompts (GRPO's groups) whose rows end at different steps: each distinct prompt is
    prefilled once, rows that ended stop being computed, and the tokens are still generate's."""
    model, tok = load_model(tiny_folder).eval(), load_tokenizer(tiny_folder)
    prompts = [p for p in PROMPTS for _ in range(4)][::-1]  # 16 rows, 4 distinct prompts
    _, plain = _both(model, tok, prompts, 24, None, settings)
    eos = int(plain[:, -24:].flatten().bincount().argmax())
    rows: list[int] = []  # rows each pass computes
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    expected, got = _both(model, tok, prompts, 24, eos, settings)
    hook.remove()
    assert torch.equal(got, expected)
    generate_passes, ours = rows[: len(rows) // 2], rows[len(rows) // 2 :]  # _both runs generate, then decode
    assert generate_passes == [16] * len(generate_passes)  # generate: every row at every step
    assert ours[0] == 4  # the prefill: one row a distinct prompt
    width = tok(prompts, return_tensors="pt", padding=True)["input_ids"].shape[1]
    ended_at = [(row[width:] == eos).nonzero()[0].item() if (row[width:] == eos).any() else 24 for row in got]
    assert min(ended_at) < max(ended_at) - 1 and ours[-1] < 16  # rows ended at different steps and left
    # each step computes the rows not yet ended, plus ended ones until they are a quarter
    for step, computed in enumerate(ours[1:], start=1):
        alive = sum(e >= step for e in ended_at)
        assert alive <= computed and (computed - alive) * 4 < computed


def test_eager_attention_and_lora_give_generates_tokens(tiny_folder):
    from peft import LoraConfig, get_peft_model

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_folder, attn_implementation="eager").float().eval()
    tok = load_tokenizer(tiny_folder)
    assert model.config._attn_implementation == "eager"
    expected, got = _both(model, tok, PROMPTS, 16, None, {"greedy": False})
    assert torch.equal(got, expected)
    lora = get_peft_model(load_model(tiny_folder).eval(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"],
                                                                      init_lora_weights=False))
    expected, got = _both(lora, tok, PROMPTS, 16, None, {"greedy": False})
    plain, _ = _both(load_model(tiny_folder).eval(), tok, PROMPTS, 16, None, {"greedy": False})
    assert torch.equal(got, expected) and not torch.equal(got, plain)  # the adapters count, in both


def test_sample_decodes_as_generate_and_falls_back_where_unsupported(tiny_folder, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    model, tok = load_model(tiny_folder), load_tokenizer(tiny_folder)
    prompts = PROMPTS * 3
    ours = sample(model, tok, prompts, max_new_tokens=12, batch_size=5, seed=1, index_offset=0)
    monkeypatch.setenv("TETHER_DECODE", "generate")
    assert sample(model, tok, prompts, max_new_tokens=12, batch_size=5, seed=1, index_offset=0) == ours
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2))
    assert decoder_of(gpt2) is None and decoder_of(model) is model
    monkeypatch.delenv("TETHER_DECODE")
    pairs = sample(gpt2, tok, PROMPTS, max_new_tokens=4, batch_size=4, seed=1)  # generate's path
    assert [len(r) for _, r in pairs] and all(len(r) <= 4 for _, r in pairs)


@pytest.mark.slow
def test_smollm2_decodes_as_generate(smollm2_folder):
    """The real vocabulary and grouped-query attention: chat prompts, sampled until the end of turn."""
    model, tok = load_model(smollm2_folder).eval(), load_tokenizer(smollm2_folder)
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
               for c in ("Say hi.", "Name a colour in one word.", "What is 2 + 2? Answer with the number only.")]
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    expected, got = _both(model, tok, prompts, 24, tok.eos_token_id, {"greedy": False})
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_other_members_of_the_family_decode_as_generate(tiny_folder, family):
    """Qwen2 (attention biases) and Qwen3 (query/key norms), grouped-query attention, random small weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = load_tokenizer(tiny_folder)
    config = AutoConfig.for_model(family, vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert decoder_of(model) is model
    expected, got = _both(model, tok, PROMPTS, 16, None, {"greedy": False})
    assert torch.equal(got, expected)
