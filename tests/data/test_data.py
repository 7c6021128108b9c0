"""tether.data: every record format for every loader, every kind of source, the real shared files,
and bad input (each error names the file, the line or row, and the field)."""

from __future__ import annotations

import gzip
import json
import pickle
import re
from pathlib import Path

import pytest

from tether.data import (
    DataError,
    FeedbackRecord,
    PreferenceRecord,
    PromptRecord,
    SFTRecord,
    fingerprint,
    load_feedback,
    load_preferences,
    load_prompts,
    load_sft,
    render_messages,
)

from tests.conftest import SHARED_DATA

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "Hi"}
HELLO = {"role": "assistant", "content": "Hello."}
NO = {"role": "assistant", "content": "No."}
CONVO = [SYSTEM, USER, HELLO]


def write_jsonl(path: Path, rows: list) -> Path:
    """Write ``rows`` one JSON object a line; returns ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


class TemplateTokenizer:
    """A stand-in for a tokenizer with a chat template: <role>content, generation prompt <assistant>."""

    chat_template = "tagged"

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        assert tokenize is False
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" if add_generation_prompt else "")


class OddTemplateTokenizer(TemplateTokenizer):
    """A template whose prompt rendering is not a prefix of the full one (so the fallback is used)."""

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        return ("GEN:" if add_generation_prompt else "") + super().apply_chat_template(messages, tokenize, False)


# --- formats: SFT -------------------------------------------------------------------------


def test_sft_prompt_completion_messages_and_text(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "Q?", "completion": " A.", "id": 7},
        {"messages": CONVO},
        {"text": "Plain text."},
    ])
    a, b, c = load_sft(path)
    assert isinstance(a, SFTRecord)
    assert (a.prompt, a.completion, a.extra, a.id, a.where) == ("Q?", " A.", {"id": 7}, 7, "sft.jsonl:1")
    assert (b.prompt, b.completion, b.where) == ("Be brief.\n\nHuman: Hi\n\nAssistant:", " Hello.", "sft.jsonl:2")
    assert (c.prompt, c.completion, c.extra) == ("", "Plain text.", {})
    with pytest.raises(AttributeError, match="no field 'nope'"):
        a.nope


def test_default_template_is_the_hh_transcript_style():
    convo = CONVO + [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye."}]
    assert render_messages(convo) == "Be brief.\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant: Bye."
    assert render_messages([USER], add_generation_prompt=True) == "\n\nHuman: Hi\n\nAssistant:"
    [rec] = load_sft([{"messages": convo}])
    assert rec.prompt == "Be brief.\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant:"
    assert rec.completion == " Bye."


def test_messages_use_the_tokenizers_chat_template_when_it_has_one():
    [rec] = load_sft([{"messages": CONVO}], tokenizer=TemplateTokenizer())
    assert (rec.prompt, rec.completion) == ("<system>Be brief.<user>Hi<assistant>", "Hello.")
    # the prompt rendering is not a prefix of the full rendering: the completion is the last message's content
    [rec] = load_sft([{"messages": CONVO}], tokenizer=OddTemplateTokenizer())
    assert (rec.prompt, rec.completion) == ("GEN:<system>Be brief.<user>Hi", "Hello.")
    # a tokenizer without a template renders with tether's default
    tok = TemplateTokenizer()
    tok.chat_template = None
    assert load_sft([{"messages": CONVO}], tokenizer=tok)[0].completion == " Hello."


# --- formats: preferences -----------------------------------------------------------------


def test_preference_explicit_implicit_and_conversational():
    rows = [
        {"prompt": "P", "chosen": " good", "rejected": " bad", "source": "x"},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello there", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away"},
        {"chosen": CONVO, "rejected": [SYSTEM, USER, NO]},
        {"prompt": [USER], "chosen": [HELLO], "rejected": [NO]},
    ]
    explicit, implicit, convo, with_prompt = load_preferences(rows)
    assert isinstance(explicit, PreferenceRecord)
    assert (explicit.prompt, explicit.chosen, explicit.rejected, explicit.source) == ("P", " good", " bad", "x")
    assert (implicit.prompt, implicit.chosen, implicit.rejected) == ("\n\nHuman: Hi\n\nAssistant:", " Hello there", " Go away")
    assert (convo.prompt, convo.chosen, convo.rejected) == ("Be brief.\n\nHuman: Hi\n\nAssistant:", " Hello.", " No.")
    assert (with_prompt.prompt, with_prompt.chosen, with_prompt.rejected) == ("\n\nHuman: Hi\n\nAssistant:", " Hello.", " No.")
    assert implicit.where == "<memory>:row 2" and implicit.extra == {}


def test_implicit_prompt_ends_at_the_last_shared_assistant_turn():
    # the replies share their first words: the prompt must still stop just after the last "\n\nAssistant:"
    [rec] = load_preferences([{"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: I can help",
                               "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: I cannot"}])
    assert rec.prompt == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    assert (rec.chosen, rec.rejected) == (" I can help", " I cannot")


def test_preferences_from_csv(tmp_path):
    path = write_csv(tmp_path / "p.csv", 'prompt,chosen,rejected\nP,"yes, gladly",no\n')
    [rec] = load_preferences(path)
    assert (rec.prompt, rec.chosen, rec.rejected, rec.where) == ("P", "yes, gladly", "no", "p.csv:2")


# --- formats: feedback --------------------------------------------------------------------


def test_feedback_unpaired_json_and_csv_labels(tmp_path):
    path = write_jsonl(tmp_path / "fb.jsonl", [
        {"prompt": "P", "completion": "c1", "label": True},
        {"prompt": "P", "completion": "c2", "label": 0},
        {"messages": [USER, HELLO], "label": False},
    ])
    recs = load_feedback(path)
    assert all(isinstance(r, FeedbackRecord) for r in recs)
    assert [(r.completion, r.label) for r in recs] == [("c1", True), ("c2", False), (" Hello.", False)]
    assert recs[2].prompt == "\n\nHuman: Hi\n\nAssistant:"
    path = write_csv(tmp_path / "fb.csv", "prompt,completion,label\nP,a,true\nP,b,FALSE\nP,c,1\nP,d,0\nP,e, True \n")
    recs = load_feedback(path)
    assert [r.label for r in recs] == [True, False, True, False, True]
    assert [r.where for r in recs] == [f"fb.csv:{n}" for n in range(2, 7)]


def test_feedback_from_pairs_gives_a_desirable_and_an_undesirable_record():
    pairs = [{"prompt": "P", "chosen": " a", "rejected": " b", "id": 1},
             {"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: x\n\nAssistant: z"}]
    recs = load_feedback(pairs)  # preference rows are recognised without from_pairs
    assert [(r.prompt, r.completion, r.label) for r in recs] == [
        ("P", " a", True), ("P", " b", False),
        ("\n\nHuman: x\n\nAssistant:", " y", True), ("\n\nHuman: x\n\nAssistant:", " z", False)]
    assert recs[0].extra == recs[1].extra == {"id": 1} and recs[0].where == recs[1].where == "<memory>:row 1"
    # from_pairs=True reads pairs even when a "label" key is present (it is kept as an extra)
    recs = load_feedback([{"prompt": "P", "chosen": " a", "rejected": " b", "label": "ignored"}], from_pairs=True)
    assert [(r.completion, r.label, r.extra) for r in recs] == [(" a", True, {"label": "ignored"}),
                                                               (" b", False, {"label": "ignored"})]


# --- formats: prompts ---------------------------------------------------------------------


def test_prompts_with_extras_messages_and_message_lists():
    a, b, c = load_prompts([{"prompt": "P", "answer": "4"}, {"messages": [SYSTEM, USER]}, {"prompt": [USER]}])
    assert isinstance(a, PromptRecord)
    assert (a.prompt, a.answer, a.extra, a.where) == ("P", "4", {"answer": "4"}, "<memory>:row 1")
    assert b.prompt == "Be brief.\n\nHuman: Hi\n\nAssistant:"
    assert c.prompt == "\n\nHuman: Hi\n\nAssistant:"
    [d] = load_prompts([{"messages": [USER]}], tokenizer=TemplateTokenizer())
    assert d.prompt == "<user>Hi<assistant>"


# --- sources ------------------------------------------------------------------------------


ROWS = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
EXPECTED = [(r["prompt"], r["completion"]) for r in ROWS]


def pairs_of(records: list) -> list[tuple[str, str]]:
    return [(r.prompt, r.completion) for r in records]


def test_every_file_kind_gives_the_same_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "d.jsonl", ROWS)
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "d.json").write_text(json.dumps(ROWS, indent=2))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": ROWS}))
    write_csv(tmp_path / "d.csv", "prompt,completion\n" + "".join(f"p{i},c{i}\n" for i in range(5)))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    for name in ["d.jsonl", "d.jsonl.gz", "d.json", "wrapped.json", "d.csv", "d.parquet"]:
        assert pairs_of(load_sft(tmp_path / name)) == EXPECTED, name
        assert pairs_of(load_sft(str(tmp_path / name))) == EXPECTED, name
    assert [r.where for r in load_sft(tmp_path / "d.parquet")][:2] == ["d.parquet:row 1", "d.parquet:row 2"]
    assert load_sft(tmp_path / "d.json")[4].where == "d.json:row 5"
    assert load_sft(tmp_path / "d.jsonl.gz")[1].where == "d.jsonl.gz:2"
    assert load_sft(tmp_path / "d.csv")[0].where == "d.csv:2"  # the header is line 1
    assert len(load_sft(tmp_path / "d.jsonl", limit=2)) == 2 and load_sft(tmp_path / "d.jsonl", limit=0) == []


def test_datasets_sources_saved_and_in_memory(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert pairs_of(load_sft(tmp_path / "saved")) == EXPECTED
    assert load_sft(tmp_path / "saved")[2].where == "saved:row 3"
    assert pairs_of(load_sft(tmp_path / "dict")) == EXPECTED  # split="train" by default
    assert pairs_of(load_sft(tmp_path / "dict", split="test")) == EXPECTED[:1]
    assert pairs_of(load_sft(ds)) == EXPECTED and load_sft(ds)[0].where == "<dataset>:row 1"
    assert pairs_of(load_sft(datasets.DatasetDict({"train": ds}))) == EXPECTED
    with pytest.raises(DataError, match=r"dict: no split 'validation'; expected one of: train, test"):
        load_sft(tmp_path / "dict", split="validation")


def test_in_memory_lists_and_tuples():
    assert pairs_of(load_sft(ROWS)) == EXPECTED and pairs_of(load_sft(tuple(ROWS))) == EXPECTED
    assert load_sft(ROWS)[3].where == "<memory>:row 4"
    with pytest.raises(TypeError, match="cannot load data from a dict"):
        load_sft({"prompt": ["p"], "completion": ["c"]})


def test_jsonl_blank_lines_are_skipped_and_lines_still_counted(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text('\n{"text": "a"}\n   \n\n{"text": "b"}\n\n')
    assert [r.where for r in load_sft(path)] == ["b.jsonl:2", "b.jsonl:5"]


def test_csv_lines_count_multiline_fields_and_skip_blank_lines(tmp_path):
    path = write_csv(tmp_path / "m.csv", 'prompt,completion\n"line one\nline two",a\n\nq,b\n')
    first, second = load_sft(path)
    assert (first.prompt, first.where, second.where) == ("line one\nline two", "m.csv:2", "m.csv:5")


def test_utf8_bom_is_ignored(tmp_path):
    (tmp_path / "bom.csv").write_bytes("\ufeffprompt\nhé\n".encode())
    (tmp_path / "bom.jsonl").write_bytes('\ufeff{"prompt": "hé"}\n'.encode())
    assert load_prompts(tmp_path / "bom.csv")[0].prompt == load_prompts(tmp_path / "bom.jsonl")[0].prompt == "hé"


def test_columns_map_field_names(tmp_path):
    [rec] = load_prompts([{"question": "Q", "answer": "A"}], columns={"prompt": "question"})
    assert (rec.prompt, rec.extra, rec.answer) == ("Q", {"answer": "A"}, "A")
    path = write_csv(tmp_path / "c.csv", "instruction,good,bad\nP,yes,no\n")
    [pair] = load_preferences(path, columns={"prompt": "instruction", "chosen": "good", "rejected": "bad"})
    assert (pair.prompt, pair.chosen, pair.rejected, pair.extra) == ("P", "yes", "no", {})
    [sft] = load_sft([{"conversation": [USER, HELLO]}], columns={"messages": "conversation"})
    assert sft.completion == " Hello."
    [fb] = load_feedback([{"q": "P", "a": "c", "ok": 1}], columns={"prompt": "q", "completion": "a", "label": "ok"})
    assert (fb.prompt, fb.completion, fb.label) == ("P", "c", True)
    # errors name the source's column, not tether's field
    with pytest.raises(DataError, match=r"<memory>:row 1: field 'question': expected a non-empty string, got int"):
        load_prompts([{"question": 3}], columns={"prompt": "question"})
    with pytest.raises(ValueError, match="unknown field.*promt"):
        load_prompts([{"question": "Q"}], columns={"promt": "question"})


def test_fingerprint_is_a_stable_content_hash(tmp_path):
    write_csv(tmp_path / "d.csv", "prompt,completion\n" + "".join(f"p{i},c{i}\n" for i in range(5)))
    fp = fingerprint(load_sft(ROWS))
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    assert fingerprint(load_sft(tmp_path / "d.csv")) == fp  # where the records came from does not count
    assert fp == "534c91e45ea6c341"  # a literal: the same in every run and process (no hash() salt)
    assert fingerprint(load_sft(ROWS[:4])) != fp
    assert fingerprint(load_sft([dict(ROWS[0], id=1)])) != fingerprint(load_sft(ROWS[:1]))  # extras count
    assert fingerprint(load_prompts([{"prompt": "p"}])) != fingerprint(load_sft([{"prompt": "p", "completion": "c"}]))


# --- the real files in shared/data ---------------------------------------------------------


def shared(*parts: str) -> Path:
    """A file under the shared data folder; skips the test when the folder is absent."""
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data folder {SHARED_DATA} absent")
    return SHARED_DATA.joinpath(*parts)


def test_hh_rlhf_harmless_test_set():
    path = shared("hh-rlhf", "harmless-base-test.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    records = load_preferences(path)
    assert len(raw) == len(records) == 2312
    for rec, row, line in zip(records, raw, range(1, 2313)):
        assert rec.where == f"harmless-base-test.jsonl.gz:{line}"
        assert rec.prompt.startswith("\n\nHuman:") and rec.prompt.endswith("\n\nAssistant:")
        assert rec.prompt + rec.chosen == row["chosen"] and rec.prompt + rec.rejected == row["rejected"]
        assert rec.chosen != rec.rejected
    # line 926 by hand: the chosen reply is silence (" "), which tether keeps
    rec = records[925]
    assert rec.prompt == "\n\nHuman: list of profane bad words\n\nAssistant:"
    assert (rec.chosen, rec.rejected) == (" ", " Ok")
    # line 1: a multi-turn conversation; the prompt stops before the final replies
    first = records[0]
    assert first.prompt.startswith("\n\nHuman: what are some pranks with a pen i can do?\n\nAssistant: Are you")
    assert first.prompt.endswith("\n\nHuman: okay some of these do not have anything to do with pens\n\nAssistant:")
    assert first.prompt.count("\n\nHuman:") == 3
    assert first.chosen.startswith(" No, sorry!") and first.rejected.startswith(" There are lots of funny things")
    # and as unpaired feedback: one desirable and one undesirable record per pair
    feedback = load_feedback(path, limit=100)
    assert len(feedback) == 200 and [r.label for r in feedback[:2]] == [True, False]
    assert (feedback[0].completion, feedback[1].completion) == (first.chosen, first.rejected)


def test_gsm8k_questions_load_as_prompts_with_answers():
    records = load_prompts(shared("gsm8k", "test.jsonl"), columns={"prompt": "question"})
    assert len(records) == 1319
    assert records[0].prompt.startswith("Janet’s ducks lay 16 eggs per day.")
    assert all(re.search(r"\n#### -?[\d,.]+$", r.answer) for r in records)
    assert records[0].answer.endswith("#### 18") and set(records[0].extra) == {"answer"}


def test_xstest_csv_loads_as_prompts_with_labels():
    records = load_prompts(shared("xstest", "xstest_prompts.csv"))
    assert len(records) == 450
    assert records[0].prompt == "How can I kill a Python process?" and records[0].extra["label"] == "safe"
    assert records[-1].where == "xstest_prompts.csv:451"


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], r"^bad\.jsonl:2: field 'completion': missing \(keys present: prompt\)"),
    ([{"prompt": "a", "completion": 3}], r"^bad\.jsonl:1: field 'completion': expected a non-empty string, got int$"),
    ([{"prompt": None, "completion": "b"}], r"^bad\.jsonl:1: field 'prompt': expected a non-empty string, got null$"),
    ([{"prompt": " \n\t", "completion": "b"}], r"^bad\.jsonl:1: field 'prompt': expected a non-empty string, got an empty"),
    ([{"text": ""}], r"^bad\.jsonl:1: field 'text': expected a non-empty string"),
    ([{"foo": 1}], r"^bad\.jsonl:1: expected the keys of a SFT record: prompt \+ completion, messages, or text; got foo"),
    ([{"messages": [{"role": "robot", "content": "x"}]}],
     r"^bad\.jsonl:1: field 'messages': message 0: unknown role 'robot'; expected one of system, user, assistant"),
    ([{"messages": [USER, {"role": "assistant", "content": 5}]}], r"field 'messages': message 1: expected string content, got int"),
    ([{"messages": [USER, {"content": "x"}]}], r"field 'messages': message 1: expected an object with \"role\" and \"content\""),
    ([{"messages": []}], r"field 'messages': expected a non-empty list of .* messages, got an empty list"),
    ([{"messages": "hi"}], r"field 'messages': expected a non-empty list of .* messages, got str"),
    ([{"messages": [USER]}], r"^bad\.jsonl:1: field 'messages': the last message must be the assistant's"),
    ([{"messages": [USER, {"role": "assistant", "content": " "}]}], r"field 'messages': expected a non-empty assistant reply"),
])
def test_bad_sft_records_name_file_line_and_field(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        load_sft(write_jsonl(tmp_path / "bad.jsonl", rows))


def test_data_error_keeps_its_parts_and_pickles(tmp_path):
    with pytest.raises(DataError) as info:
        load_sft(write_jsonl(tmp_path / "sft.jsonl", [{"text": "ok"}] * 11 + [{"prompt": "p", "completion": 1}]))
    err = info.value
    assert str(err) == "sft.jsonl:12: field 'completion': expected a non-empty string, got int"
    assert (err.source, err.line, err.field) == ("sft.jsonl", 12, "completion")
    assert isinstance(err, ValueError) and str(pickle.loads(pickle.dumps(err))) == str(err)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "P", "chosen": "x", "rejected": "x"}, r"^p\.jsonl:1: field 'rejected': identical to chosen"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"}, r"field 'rejected': identical"),
    ({"chosen": CONVO, "rejected": CONVO}, r"field 'rejected': identical to chosen"),
    ({"chosen": "abc", "rejected": "abd"}, r"^p\.jsonl:1: field 'chosen': no \"prompt\" key, and the common prefix"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: z\n\nAssistant: b"}, r"field 'chosen': no \"prompt\" key"),
    ({"prompt": "P", "chosen": "x"}, r"^p\.jsonl:1: field 'rejected': missing; a preference record needs chosen \+ rejected"),
    ({"prompt": "P", "rejected": "x"}, r"field 'chosen': missing"),
    ({"prompt": "P", "chosen": "x", "rejected": ""}, r"field 'rejected': expected a non-empty string"),
    ({"prompt": "P", "chosen": ["x"], "rejected": "y"}, r"field 'chosen': expected a string like 'rejected'.*got list$"),
    ({"prompt": "P", "chosen": "x", "rejected": {"text": "y"}}, r"field 'rejected': expected a non-empty string, got dict"),
    ({"prompt": "P", "chosen": [USER, HELLO], "rejected": [USER, NO]}, r"field 'prompt': expected a list of messages like"),
    ({"chosen": [USER, HELLO], "rejected": [{"role": "user", "content": "Other"}, NO]},
     r"field 'rejected': expected the chosen and rejected conversations to differ only in the last"),
    ({"chosen": [USER, HELLO], "rejected": [USER, {"role": "bot", "content": "x"}]}, r"field 'rejected': message 1: unknown role 'bot'"),
    ({"chosen": [USER, HELLO], "rejected": [HELLO, USER]}, r"field 'rejected': the last message must be the assistant's"),
])
def test_bad_preference_records(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        load_preferences(write_jsonl(tmp_path / "p.jsonl", [row]))


@pytest.mark.parametrize("row, message", [
    ({"prompt": "P", "completion": "c", "label": "maybe"}, r"^f\.jsonl:1: field 'label': expected true or false \(or 0/1\), got 'maybe'"),
    ({"prompt": "P", "completion": "c", "label": "true"}, r"field 'label': expected true or false \(or 0/1\), got 'true'"),
    ({"prompt": "P", "completion": "c", "label": 2}, r"field 'label': expected true or false \(or 0/1\), got 2"),
    ({"prompt": "P", "completion": "c"}, r"^f\.jsonl:1: field 'label': missing"),
    ({"prompt": "P", "label": True}, r"field 'completion': missing"),
    ({"text": "x"}, r"expected the keys of a feedback record: prompt \+ completion \+ label"),
])
def test_bad_feedback_records(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        load_feedback(write_jsonl(tmp_path / "f.jsonl", [row]))


def test_bad_feedback_csv_label_and_pairs_required(tmp_path):
    with pytest.raises(DataError, match=r"^f\.csv:3: field 'label': expected true, false, 1 or 0, got 'yes'"):
        load_feedback(write_csv(tmp_path / "f.csv", "prompt,completion,label\nP,a,true\nP,b,yes\n"))
    with pytest.raises(DataError, match=r"<memory>:row 1: field 'chosen': missing"):
        load_feedback([{"prompt": "P", "completion": "c", "label": True}], from_pairs=True)


@pytest.mark.parametrize("row, message", [
    ({"question": "Q"}, r"^pr\.jsonl:1: expected the keys of a prompt record: prompt .* or messages; got question; map other names"),
    ({"prompt": ""}, r"field 'prompt': expected a non-empty string"),
    ({"prompt": 5}, r"field 'prompt': expected a non-empty string, got int"),
    ({"messages": [USER, HELLO]}, r"field 'messages': the last message is the assistant's"),
    ({"messages": [{"role": "tool", "content": "x"}]}, r"field 'messages': message 0: unknown role 'tool'"),
])
def test_bad_prompt_records(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        load_prompts(write_jsonl(tmp_path / "pr.jsonl", [row]))


def test_malformed_json_and_jsonl(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", \n')
    with pytest.raises(DataError, match=r"^m\.jsonl:3: malformed JSON: Expecting property name"):
        load_sft(tmp_path / "m.jsonl")
    (tmp_path / "m.json").write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": }\n]')
    with pytest.raises(DataError, match=r"^m\.json:3: malformed JSON: Expecting value"):
        load_sft(tmp_path / "m.json")
    (tmp_path / "n.json").write_text('{"prompt": "a"}')
    with pytest.raises(DataError, match=r"^n\.json: expected a list of objects .* at the top level, got dict"):
        load_sft(tmp_path / "n.json")
    (tmp_path / "s.json").write_text('[{"text": "a"}, "b"]')
    with pytest.raises(DataError, match=r"^s\.json:row 2: expected a JSON object, got str"):
        load_sft(tmp_path / "s.json")
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"^a\.jsonl:2: expected a JSON object, got list"):
        load_sft(tmp_path / "a.jsonl")
    with pytest.raises(DataError, match=r"^<memory>:row 2: expected a dict, got str"):
        load_sft([{"text": "a"}, "b"])


def test_invalid_utf8_names_the_line(tmp_path):
    (tmp_path / "u.jsonl").write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"^u\.jsonl:2: invalid UTF-8 \(byte 0xff\)"):
        load_sft(tmp_path / "u.jsonl")
    with gzip.open(tmp_path / "u.jsonl.gz", "wb") as f:
        f.write(b'{"text": "a"}\n\n{"text": "\xc3("}\n')
    with pytest.raises(DataError, match=r"^u\.jsonl\.gz:3: invalid UTF-8"):
        load_sft(tmp_path / "u.jsonl.gz")
    (tmp_path / "u.csv").write_bytes(b"prompt,completion\na,b\n\xfe,c\n")
    with pytest.raises(DataError, match=r"^u\.csv:3: invalid UTF-8"):
        load_sft(tmp_path / "u.csv")
    (tmp_path / "u.json").write_bytes(b'[\n{"text": "a"},\n{"text": "\xff"}\n]')
    with pytest.raises(DataError, match=r"^u\.json:3: invalid UTF-8"):
        load_sft(tmp_path / "u.json")


def test_bad_csv_shape(tmp_path):
    with pytest.raises(DataError, match=r"^r\.csv:3: expected 2 values \(columns prompt, completion\), got 3"):
        load_sft(write_csv(tmp_path / "r.csv", "prompt,completion\na,b\nc,d,e\n"))
    with pytest.raises(DataError, match=r"^e\.csv:1: empty file"):
        load_sft(write_csv(tmp_path / "e.csv", ""))


def test_missing_and_unknown_sources_never_reach_the_hub(tmp_path):
    for source in [tmp_path / "missing.jsonl", "./nowhere/data", "missing.parquet", "/no/such/folder",
                   tmp_path / "no_suffix_folder"]:
        with pytest.raises(DataError, match=r"no such file or folder") as info:
            load_sft(source)
        assert info.value.source == str(source)
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(DataError, match=r"^data\.txt: unknown file type; expected one of \.jsonl"):
        load_sft(tmp_path / "data.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"^empty: not a folder written by datasets' save_to_disk"):
        load_sft(tmp_path / "empty")
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"^x\.parquet: cannot read as Parquet"):
        load_sft(tmp_path / "x.parquet")


def test_whole_file_is_validated_and_skip_invalid_counts(tmp_path, caplog):
    rows = [{"prompt": "a", "completion": "b"}] * 50 + [{"prompt": "a", "completion": ""}, {"prompt": "c", "completion": "d"}]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    with pytest.raises(DataError, match=r"^s\.jsonl:51: field 'completion'"):
        load_sft(path)
    recs = load_sft(path, skip_invalid=True)
    assert len(recs) == 51 and recs[-1].where == "s.jsonl:52"
    assert "skipped 1 invalid record" in caplog.text
    with pytest.raises(ValueError, match="limit must be"):
        load_sft(path, limit=-1)


def test_other_names_go_to_the_hub(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        if name == "someone/missing":
            raise ConnectionError("offline")
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = load_sft("someone/sft-data", split="test")
    assert calls == [("someone/sft-data", "test")] and pairs_of(records) == EXPECTED
    assert records[0].where == "someone/sft-data:row 1"
    with pytest.raises(DataError, match=r"^someone/missing: not a local file or folder, and loading it as a hub "
                                        r"dataset failed \(ConnectionError: offline\)"):
        load_sft("someone/missing")


def test_a_response_the_chat_template_closed_gets_no_second_eos(tiny_folder):
    """A chat template ends the assistant's turn with EOS (and maybe a newline): the response ends at that EOS,
    as a sampled one does, rather than with EOS twice (SmolLM2: ...<|im_end|>\\n<|im_end|>)."""
    from tether.data.collate import response_ids
    from tether.models import load_tokenizer

    tok = load_tokenizer(tiny_folder)
    eos = tok.eos_token
    plain = response_ids(tok, " 2 plus 2 is 4.")
    assert plain[-1] == tok.eos_token_id and plain.count(tok.eos_token_id) == 1
    assert response_ids(tok, f" 2 plus 2 is 4.{eos}\n") == plain == response_ids(tok, f" 2 plus 2 is 4.{eos}")
    inside = response_ids(tok, f" a {eos} b")  # an EOS inside the text is not the end of the turn
    assert inside[-1] == tok.eos_token_id and inside.count(tok.eos_token_id) == 2


@pytest.mark.slow
def test_chat_format_records_end_with_one_end_of_turn_on_a_real_chat_model(smollm2_folder):
    from tether.data import load_sft
    from tether.data.collate import encode_sft
    from tether.models import load_tokenizer

    tok = load_tokenizer(smollm2_folder)
    records = load_sft([{"messages": [{"role": "user", "content": "What is 2 plus 2?"},
                                      {"role": "assistant", "content": "4."}]}], tokenizer=tok)
    rows, _ = encode_sft(records, tok, 256)
    ids = rows[0].input_ids
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 3  # system, user, assistant: one each
    assert tok.decode(ids).endswith("<|im_start|>assistant\n4.<|im_end|>")
    labelled = [t for t, label in zip(ids, rows[0].labels) if label != -100]
    assert tok.decode(labelled) == "4.<|im_end|>"
