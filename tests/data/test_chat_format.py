"""Chat models everywhere: string records (HH-RLHF transcripts included) rendered with the model's chat template."""

from __future__ import annotations

import pytest

from tether.data import ChatFormat, chat_tokenizer, load_feedback, load_preferences, load_prompts, load_sft
from tether.data import transcript_messages as turns

# ChatML, as SmolLM2 / Qwen write it (no default system prompt, to keep the expected strings short)
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
def triple(rec) -> tuple[str, str, str]:
    return rec.prompt, rec.chosen, rec.rejected


HH = "\n\nHuman: Is the sky blue?\n\nAssistant: Mostly.\n\nHuman: Why?\n\nAssistant:"


@pytest.fixture(scope="module")
def chatml(tiny_folder, tmp_path_factory):
    """The tiny tokenizer with ChatML's special tokens and template; its EOS stays <|endoftext|>."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chatml") / "model"
    shutil.copytree(tiny_folder, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    return folder


def test_an_hh_transcript_becomes_its_turns():
    assert turns(HH) == [{"role": "user", "content": "Is the sky blue?"}, {"role": "assistant", "content": "Mostly."},
                         {"role": "user", "content": "Why?"}]
    assert turns("Be kind." + HH)[0] == {"role": "system", "content": "Be kind."}
    assert turns("Human: hi\n\nAssistant: hello") == [{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": "hello"}]
    assert turns("What is 2 + 2?") is None and turns("\n\nAssistant: hi") is None


def test_hh_pairs_render_as_chat_turns_ending_at_the_end_of_turn(chatml):
    from tether.models import load_tokenizer

    tok = load_tokenizer(chatml)
    [pair] = load_preferences([{"chosen": HH + " Rayleigh scattering.", "rejected": HH + " It just is."}], tokenizer=tok)
    assert pair.prompt == ("<|im_start|>user\nIs the sky blue?<|im_end|>\n<|im_start|>assistant\nMostly.<|im_end|>\n"
                           "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n")
    assert (pair.chosen, pair.rejected) == ("Rayleigh scattering.<|im_end|>\n", "It just is.<|im_end|>\n")
    # the same pair with an explicit prompt, as KTO feedback, and as SFT and prompt records
    [explicit] = load_preferences([{"prompt": HH, "chosen": " Rayleigh scattering.", "rejected": " It just is."}],
                                  tokenizer=tok)
    assert triple(explicit) == triple(pair)
    good, bad = load_feedback([{"chosen": HH + " Rayleigh scattering.", "rejected": HH + " It just is."}], tokenizer=tok)
    assert (good.prompt, good.completion, good.label, bad.completion) == (pair.prompt, pair.chosen, True, pair.rejected)
    [sft] = load_sft([{"prompt": HH, "completion": " Rayleigh scattering."}], tokenizer=tok)
    assert (sft.prompt, sft.completion) == (pair.prompt, pair.chosen)
    [prompt] = load_prompts([{"prompt": HH}], tokenizer=tok)
    assert prompt.prompt == pair.prompt


def test_a_plain_prompt_is_one_user_message_and_a_rendered_one_is_left_alone(chatml):
    from tether.models import load_tokenizer

    tok = load_tokenizer(chatml)
    [rec] = load_prompts([{"prompt": "What is 2 + 2?"}], tokenizer=tok)
    assert rec.prompt == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    [again] = load_prompts([{"prompt": rec.prompt}], tokenizer=tok)
    assert again.prompt == rec.prompt  # rendering twice would nest the template
    [sft] = load_sft([{"prompt": rec.prompt, "completion": "4.<|im_end|>\n"}], tokenizer=tok)
    assert (sft.prompt, sft.completion) == (rec.prompt, "4.<|im_end|>\n")
    [text] = load_sft([{"text": "Raw pretraining text."}], tokenizer=tok)
    assert (text.prompt, text.completion) == ("", "Raw pretraining text.")  # {"text"} rows are never templated


def test_the_template_end_of_turn_becomes_the_eos_so_sampling_stops_there(chatml):
    from tether.data.collate import encode_sft
    from tether.models import load_tokenizer
    from tether.models.hf import end_of_turn

    tok = load_tokenizer(chatml)
    assert end_of_turn(tok) == "<|im_end|>" == tok.eos_token  # the saved tokenizer's EOS was <|endoftext|>
    [rec] = load_sft([{"prompt": "Hi", "completion": "Hello."}], tokenizer=tok)
    [row], _ = encode_sft([rec], tok, 128)
    labelled = [t for t, label in zip(row.input_ids, row.labels) if label != -100]
    assert tok.decode(labelled) == "Hello.<|im_end|>"  # one end of turn, no second EOS, no trailing newline


def test_a_template_in_hh_style_and_no_template_leave_records_as_written(tiny_folder):
    from tether.models import load_tokenizer

    tok = load_tokenizer(tiny_folder)  # tether's tiny models: their template writes HH transcripts
    assert ChatFormat(tok).tokenizer is None
    row = {"chosen": HH + " Rayleigh scattering.", "rejected": HH + " It just is."}
    assert triple(load_preferences([row], tokenizer=tok)[0]) == triple(load_preferences([row])[0]) == \
        (HH, " Rayleigh scattering.", " It just is.")
    assert load_prompts([{"prompt": "Q?"}], tokenizer=tok)[0].prompt == "Q?"


def test_no_chat_template_passes_no_tokenizer_to_the_loaders(chatml):
    from tether.models import load_tokenizer
    from tether.trainers.dpo import DPOConfig

    tok = load_tokenizer(chatml)
    assert chat_tokenizer(tok, DPOConfig()) is tok
    assert chat_tokenizer(tok, DPOConfig(chat_template=False)) is None
    row = {"prompt": HH, "chosen": " Rayleigh scattering.", "rejected": " It just is."}
    assert triple(load_preferences([row], tokenizer=chat_tokenizer(tok, DPOConfig(chat_template=False)))[0]) == \
        (HH, " Rayleigh scattering.", " It just is.")


def test_gsm8k_and_xstest_questions_are_asked_in_the_models_format(chatml, tmp_path):
    import json

    from tether.instruments.capability import last_number_match, read_gsm8k
    from tether.models import load_tokenizer

    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps({"question": "What is 3 + 4?", "answer": "3 + 4 = 7\n#### 7"}) + "\n")
    [row] = read_gsm8k(path, tokenizer=load_tokenizer(chatml))
    assert row["prompt"] == "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
    assert read_gsm8k(path)[0]["prompt"] == "\n\nHuman: What is 3 + 4?\n\nAssistant:"
    # an instruct model seldom writes "#### N": its last number is read instead
    assert last_number_match("3 plus 4 makes 7.", row["answer"]) and last_number_match("#### 7", row["answer"])
    assert not last_number_match("7 or maybe 8", row["answer"]) and not last_number_match("no idea", row["answer"])


def test_an_empty_reply_stays_empty_for_the_reward_model_after_the_template(chatml, tmp_path):
    """HH-RLHF has replies that are a lone space; rendered, one is "<|im_end|>\\n", still nothing to score."""
    import json

    from click.testing import CliRunner

    from tether.cli import main

    data = tmp_path / "pairs.jsonl"
    rows = [{"chosen": HH + " Rayleigh scattering.", "rejected": HH + " It just is."},
            {"chosen": HH + " ", "rejected": HH + " No idea."}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(main, ["rm", "--model", str(chatml), "--data", str(data), "--out", str(tmp_path / "rm"),
                                       "--steps", "1", "--batch-size", "1"])
    assert result.exit_code != 0 and "pairs.jsonl:2" in result.output and "empty response" in result.output
    assert not (tmp_path / "rm").exists()
