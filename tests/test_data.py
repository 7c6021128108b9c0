"""Data: every record format from every kind of source, the real shared files, and bad input."""

from __future__ import annotations

import gzip
import json

import pytest

from tether.data import (
    DataError,
    fingerprint,
    load_feedback,
    load_preferences,
    load_prompts,
    load_sft,
    render_messages,
)

from .conftest import SHARED_DATA

CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- formats ------------------------------------------------------------------------------


def test_sft_formats_prompt_completion_messages_and_text(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "Q?", "completion": " A.", "id": 7},
        {"messages": CONVO},
        {"text": "Plain text."},
    ])
    a, b, c = load_sft(path)
    assert (a.prompt, a.completion, a.extra, a.id, a.where) == ("Q?", " A.", {"id": 7}, 7, "sft.jsonl:1")
    assert (b.prompt, b.completion) == ("Be brief.\n\nHuman: Hi\n\nAssistant:", " Hello.")
    assert (c.prompt, c.completion) == ("", "Plain text.")


def test_messages_use_the_tokenizers_chat_template_when_it_has_one(tiny_folder):
    from tether.models import load_tokenizer

    tok = load_tokenizer(tiny_folder)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    [rec] = load_sft([{"messages": CONVO}], tokenizer=tok)
    assert (rec.prompt, rec.completion) == ("<system>Be brief.<user>Hi<assistant>", "Hello.")
    assert render_messages(CONVO[:2]) == "Be brief.\n\nHuman: Hi"


def test_preference_formats_explicit_implicit_and_conversational():
    rows = [
        {"prompt": "P", "chosen": " good", "rejected": " bad"},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello there", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away"},
        {"chosen": CONVO, "rejected": CONVO[:2] + [{"role": "assistant", "content": "No."}]},
        {"prompt": CONVO[1:2], "chosen": CONVO[2:], "rejected": [{"role": "assistant", "content": "No."}]},
    ]
    explicit, implicit, convo, split = load_preferences(rows)
    assert (explicit.prompt, explicit.chosen, explicit.rejected) == ("P", " good", " bad")
    assert (implicit.prompt, implicit.chosen, implicit.rejected) == ("\n\nHuman: Hi\n\nAssistant:", " Hello there", " Go away")
    assert (convo.prompt, convo.chosen, convo.rejected) == ("Be brief.\n\nHuman: Hi\n\nAssistant:", " Hello.", " No.")
    assert (split.prompt, split.chosen) == ("\n\nHuman: Hi\n\nAssistant:", " Hello.")
    assert implicit.where == "<memory>:row 2"


def test_implicit_prompt_ends_at_the_last_shared_assistant_turn():
    # the responses share their first word: the prompt must still stop at the last "\n\nAssistant:"
    [rec] = load_preferences([{"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: I can help",
                               "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: I cannot"}])
    assert rec.prompt.endswith("\n\nHuman: c\n\nAssistant:") and rec.chosen == " I can help"


def test_feedback_unpaired_and_from_pairs(tmp_path):
    path = tmp_path / "fb.csv"
    path.write_text("prompt,completion,label\nP,yes,true\nP,no,0\n")
    good, bad = load_feedback(path)
    assert (good.label, bad.label, good.where, bad.where) == (True, False, "fb.csv:2", "fb.csv:3")
    recs = load_feedback([{"prompt": "P", "chosen": " a", "rejected": " b"}])
    assert [(r.completion, r.label) for r in recs] == [(" a", True), (" b", False)]
    assert load_feedback([{"prompt": "P", "completion": "c", "label": 1}])[0].label is True


def test_prompts_with_extras_and_messages():
    a, b = load_prompts([{"prompt": "P", "answer": "4"}, {"messages": CONVO[:2]}])
    assert (a.prompt, a.answer, a.extra) == ("P", "4", {"answer": "4"})
    assert b.prompt == "Be brief.\n\nHuman: Hi\n\nAssistant:"


# --- sources ------------------------------------------------------------------------------


ROWS = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]


def test_every_source_kind_gives_the_same_records(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "d.jsonl", ROWS)
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": ROWS}))
    (tmp_path / "d.csv").write_text("prompt,completion\n" + "".join(f"p{i},c{i}\n" for i in range(5)))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    expected = [(r["prompt"], r["completion"]) for r in ROWS]
    for source in ["d.jsonl", "d.jsonl.gz", "d.json", "wrapped.json", "d.csv", "d.parquet", "saved", "dict"]:
        assert [(r.prompt, r.completion) for r in load_sft(tmp_path / source)] == expected, source
    assert [(r.prompt, r.completion) for r in load_sft(ds)] == expected
    assert [(r.prompt, r.completion) for r in load_sft(ROWS)] == expected
    assert len(load_sft(tmp_path / "dict", split="test")) == 1
    assert len(load_sft(tmp_path / "d.jsonl", limit=2)) == 2
    assert fingerprint(load_sft(tmp_path / "d.csv")) == fingerprint(load_sft(ROWS)) != fingerprint(load_sft(ROWS[:4]))


def test_columns_map_field_names():
    [rec] = load_prompts([{"question": "Q", "answer": "A"}], columns={"prompt": "question"})
    assert (rec.prompt, rec.extra) == ("Q", {"answer": "A"})


# --- the real files in shared/data ---------------------------------------------------------


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="shared data folder absent")
def test_hh_rlhf_harmless_test_set_prompts_are_extracted():
    path = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    with gzip.open(path, "rt") as f:
        raw = [json.loads(line) for line in f]
    with pytest.raises(DataError, match=r"harmless-base-test.jsonl.gz:87: field 'chosen': expected a non-empty response"):
        load_preferences(path)  # the published file has 4 pairs with an empty response
    records = load_preferences(path, skip_invalid=True)
    assert len(raw) == 2312 and len(records) == 2308
    assert all(r.prompt.endswith("\n\nAssistant:") and r.prompt.startswith("\n\nHuman:") for r in records)
    by_line = {int(r.where.rsplit(":", 1)[1]): r for r in records}
    for line, rec in list(by_line.items())[:200]:
        assert rec.prompt + rec.chosen == raw[line - 1]["chosen"]
        assert rec.prompt + rec.rejected == raw[line - 1]["rejected"]
    first = by_line[1]
    assert first.prompt.count("\n\nHuman:") == raw[0]["chosen"].count("\n\nHuman:")
    assert "\n\nHuman:" not in first.chosen and "\n\nHuman:" not in first.rejected


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="shared data folder absent")
def test_gsm8k_questions_load_as_prompts_with_answers():
    records = load_prompts(SHARED_DATA / "gsm8k" / "test.jsonl", columns={"prompt": "question"})
    assert len(records) == 1319
    assert records[0].prompt.startswith("Janet")
    assert all("\n#### " in r.answer for r in records)
    assert records[0].answer.rsplit("#### ", 1)[1] == "18"


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], r"bad.jsonl:2: field 'completion': missing"),
    ([{"prompt": "a", "completion": 3}], r"bad.jsonl:1: field 'completion': expected a non-empty string, got int"),
    ([{"prompt": "  ", "completion": "b"}], r"bad.jsonl:1: field 'prompt': expected a non-empty string, got an empty one"),
    ([{"foo": 1}], r"bad.jsonl:1: expected keys prompt \+ completion, messages, or text; got foo"),
    ([{"messages": [{"role": "robot", "content": "x"}]}], r"bad.jsonl:1: field 'messages': message 0: expected"),
    ([{"messages": [{"role": "user", "content": "x"}]}], r"field 'messages': the last message must be the assistant's"),
])
def test_bad_sft_records_name_file_line_and_field(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        load_sft(write_jsonl(tmp_path / "bad.jsonl", rows))


def test_bad_preference_and_feedback_records(tmp_path):
    with pytest.raises(DataError, match=r"p.jsonl:1: field 'rejected': identical to chosen"):
        load_preferences(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "P", "chosen": "x", "rejected": "x"}]))
    with pytest.raises(DataError, match=r"p.jsonl:1: field 'chosen': no \"prompt\" field"):
        load_preferences(write_jsonl(tmp_path / "p.jsonl", [{"chosen": "abc", "rejected": "abd"}]))
    with pytest.raises(DataError, match=r"p.jsonl:1: field 'rejected': missing"):
        load_preferences(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "P", "chosen": "x"}]))
    with pytest.raises(DataError, match=r"f.jsonl:1: field 'label': expected true or false, got 'maybe'"):
        load_feedback(write_jsonl(tmp_path / "f.jsonl", [{"prompt": "P", "completion": "c", "label": "maybe"}]))
    with pytest.raises(DataError, match=r"f.jsonl:1: field 'label': expected true or false, got 2"):
        load_feedback(write_jsonl(tmp_path / "f.jsonl", [{"prompt": "P", "completion": "c", "label": 2}]))


def test_malformed_files(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", \n')
    with pytest.raises(DataError, match=r"m.jsonl:3: malformed JSON"):
        load_sft(tmp_path / "m.jsonl")
    (tmp_path / "u.jsonl").write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
    with pytest.raises(DataError, match=r"u.jsonl:2: invalid UTF-8"):
        load_sft(tmp_path / "u.jsonl")
    (tmp_path / "u.csv").write_bytes(b"prompt,completion\na,b\n\xfe,c\n")
    with pytest.raises(DataError, match=r"u.csv:3: invalid UTF-8"):
        load_sft(tmp_path / "u.csv")
    (tmp_path / "n.json").write_text('{"prompt": "a"}')
    with pytest.raises(DataError, match=r"n.json: expected a list of objects"):
        load_sft(tmp_path / "n.json")
    (tmp_path / "a.jsonl").write_text('[1, 2]\n')
    with pytest.raises(DataError, match=r"a.jsonl:1: expected a JSON object, got list"):
        load_sft(tmp_path / "a.jsonl")
    with pytest.raises(DataError, match=r"missing.jsonl: no such file"):
        load_sft(tmp_path / "missing.jsonl")


def test_skip_invalid_skips_and_counts(tmp_path, caplog):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": ""}, {"prompt": "c", "completion": "d"}]
    recs = load_sft(write_jsonl(tmp_path / "s.jsonl", rows), skip_invalid=True)
    assert [r.where for r in recs] == ["s.jsonl:1", "s.jsonl:3"]
    assert "skipped 1 invalid record" in caplog.text
