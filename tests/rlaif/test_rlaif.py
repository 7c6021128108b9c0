"""RLAIF: the constitution loader, the judge's order swapping, the HTTP judge against a local server,
labelling and revising end to end, the gold world's judge data, and that no API key leaks."""

from __future__ import annotations

import json
import logging
import math
import random
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tether.rlaif.constitution import ConstitutionError, Principle, load_constitution, parse_constitution
from tether.rlaif.judge import LMJudge, combine_orders, judge_pairs, judge_prompt, order_stats, two_way_softmax

KEY = "sk-test-7f3a9c2e-DO-NOT-LEAK"

# --- the constitution ----------------------------------------------------------------------


def test_default_constitution_ships_and_loads():
    c = load_constitution()
    assert c.name == "tether-default"
    assert [p.id for p in c.principles] == ["helpful", "harmless", "honest", "polite", "concise"]
    assert all(p.question.endswith("?") and p.critique and p.revision for p in c.principles)
    assert load_constitution("default") == c
    assert len(c.fingerprint()) == 16


GOOD = """\
name: mine
principles:
  - id: kind
    question: Which response is kinder?
    weight: 3
  - id: short
    question: Which response is shorter?
"""


@pytest.mark.parametrize("text, line, words", [
    ("", None, "empty file"),
    ("principles: []\n", 1, "expected a non-empty list, got an empty list"),
    ("name: x\n", 1, "missing 'principles'"),
    ("principles:\n  - id: a\n", 2, "principle 1: missing 'question'"),
    ("principles:\n  - id: a\n    question: Q?\n    wieght: 2\n", 4, "unknown key 'wieght'"),
    ("principles:\n  - id: a\n    question: [x, y]\n", 3, "principle 1 (a): 'question': expected a non-empty string, got a list"),
    ("principles:\n  - id: a\n    question: Q?\n  - id: a\n    question: R?\n", 4, "id 'a' already used by principle 1"),
    ("principles:\n  - id: a\n    question: Q?\n    weight: -1\n", 4, "'weight': expected a positive number"),
    ("principles:\n  - id: a\n    question: Q?\n    weight: lots\n", 4, "'weight': expected a positive number"),
    ("principles:\n  - id: two words\n    question: Q?\n", 2, "expected letters, digits"),
    ("principles:\n  - just a string\n", 2, "principle 1: expected a mapping"),
    ("principles:\n  - id: a\n    question: 'unclosed\n", 4, "malformed YAML"),
    ("rules:\n  - id: a\n", 1, "unknown key 'rules'"),
    ("principles:\n  - id: a\n    question: 42\n", 3, "expected a non-empty string, got '42'"),
])
def test_malformed_constitutions_name_the_file_line_and_what_was_expected(tmp_path, text, line, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConstitutionError) as e:
        load_constitution(path)
    assert e.value.source == "bad.yaml" and e.value.line == line
    assert str(e.value).startswith(f"bad.yaml:{line}: " if line else "bad.yaml: ")
    assert words in str(e.value)


def test_missing_constitution_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConstitutionError, match="no such file"):
        load_constitution(tmp_path / "nope.yaml")


def test_principles_are_sampled_in_proportion_to_their_weights_and_seeded():
    c = parse_constitution(GOOD, "mine.yaml")
    assert c.get("kind").weight == 3.0 and c.get("short").weight == 1.0
    draws = Counter(c.sample(random.Random(0)).id for _ in range(1))  # a fresh rng each time: seeded
    assert draws == Counter(c.sample(random.Random(0)).id for _ in range(1))
    rng = random.Random(1)
    counts = Counter(c.sample(rng).id for _ in range(8000))
    assert counts["kind"] / 8000 == pytest.approx(0.75, abs=0.02)  # w = 3 : 1
    assert [p.id for p in c.only(["short"]).principles] == ["short"]
    with pytest.raises(KeyError, match="no principle 'nope'"):
        c.only(["nope"])


# --- the judge: both orders ----------------------------------------------------------------


class ScriptedJudge:
    """A judge whose P_A is a function of the judge prompt's two responses."""

    name = "scripted"

    def __init__(self, fn):
        self.fn, self.seen = fn, []

    def choice_probs(self, texts):
        self.seen += list(texts)
        out = []
        for t in texts:
            first = t.split("Response (A): ")[1].split("\n\nResponse (B): ")[0]
            second = t.split("Response (B): ")[1].split("\n\nWhich response")[0]
            out.append(self.fn(first, second))
        return out


P = Principle("p", "Which response is better?")


def test_combine_orders_by_hand():
    # a shown first: P_A = 0.9; b shown first: P_A = 0.3, so a (second) is picked with 0.7
    prob, second, flip = combine_orders(0.9, 0.3)
    assert prob == pytest.approx(0.8) and second == pytest.approx(0.7) and not flip
    # pure position bias: "A" with 0.8 whatever is shown -> ½, and the orders disagree
    prob, second, flip = combine_orders(0.8, 0.8)
    assert prob == pytest.approx(0.5) and second == pytest.approx(0.2) and flip


def test_a_judge_with_only_position_bias_says_half_and_flips_every_time():
    judge = ScriptedJudge(lambda first, second: 0.8)
    js = judge_pairs(judge, ["x1", "x2"], ["a1", "a2"], ["b1", "b2"], [P, P])
    assert [j.prob for j in js] == pytest.approx([0.5, 0.5])
    stats = order_stats(js)
    assert stats.flip_rate == 1.0 and stats.first_bias == pytest.approx(0.3)
    # both orders were asked: a then b for every pair, then b then a
    assert "Response (A): a1\n\nResponse (B): b1" in judge.seen[0]
    assert "Response (A): b1\n\nResponse (B): a1" in judge.seen[2]


def test_a_consistent_judge_never_flips_and_its_answers_follow_the_content():
    judge = ScriptedJudge(lambda first, second: 0.9 if len(first) > len(second) else 0.1)
    js = judge_pairs(judge, ["x"] * 2, ["long answer", "b"], ["short", "a longer one"], [P, P])
    assert [j.prob for j in js] == pytest.approx([0.9, 0.1])
    assert order_stats(js) == (0.0, pytest.approx(0.0))
    assert js[0].principle == "p"


def test_judge_prompt_reads_naturally():
    text = judge_prompt("Which is kinder?", "\n\nHuman: Hi\n\nAssistant:", " Hello.", " Go away.")
    assert text == ("Principle: Which is kinder?\n\nConversation: Human: Hi\n\nAssistant:\n\n"
                    "Response (A): Hello.\n\nResponse (B): Go away.\n\nWhich response is better? Answer:")


def test_lm_judge_reads_the_two_way_softmax_of_the_choice_tokens(tiny_folder):
    from tether.models import load_model, load_tokenizer

    model, tok = load_model(tiny_folder).eval(), load_tokenizer(tiny_folder)
    judge = LMJudge(model, tok, batch_size=2)
    texts = [judge_prompt("Which is right?", "What is 1 plus 2?", " 3", " 4"), judge_prompt("Q?", "x", " a b c", " d")]
    probs = judge.choice_probs(texts)
    for text, p in zip(texts, probs):  # by hand: log π(choice | text) summed over the choice's tokens
        ids = tok(text)["input_ids"]
        lps = []
        for choice in (" A", " B"):
            c = tok(choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([ids + c])).logits[0].log_softmax(-1)
            lps.append(sum(logp[len(ids) - 1 + k, t].item() for k, t in enumerate(c)))
        assert p == pytest.approx(math.exp(lps[0]) / (math.exp(lps[0]) + math.exp(lps[1])), abs=1e-5)
    # averaging both orders makes P(a ≻ b) = 1 − P(b ≻ a) exactly, whatever the model's position bias
    ab = judge_pairs(judge, ["q"], [" 3"], [" 4"], [P])[0]
    ba = judge_pairs(judge, ["q"], [" 4"], [" 3"], [P])[0]
    assert ab.prob == pytest.approx(1 - ba.prob, abs=1e-6)
    assert two_way_softmax(800.0, 0.0) == 1.0 and two_way_softmax(0.0, 800.0) == 0.0  # stable at the extremes


# --- a local OpenAI-compatible server ------------------------------------------------------


class FakeAPI:
    """A loopback server the tests start in a thread: replies follow ``script`` (a status or a reply dict) in order,
    then ``reply``; it records every request's path, headers and body."""

    def __init__(self, reply, script=()):
        self.reply, self.script, self.requests = reply, list(script), []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                step = api.script.pop(0) if api.script else api.reply
                if isinstance(step, int):
                    self.send_response(step)
                    self.end_headers()
                    self.wfile.write(b'{"error": "try again"}')
                    return
                data = json.dumps(step(body) if callable(step) else step).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def chat_reply(p_a: float, extra: tuple = ()):
    top = [{"token": "A", "logprob": math.log(p_a)}, {"token": "B", "logprob": math.log(1 - p_a)}, *extra]
    return {"choices": [{"message": {"content": "A"}, "logprobs": {"content": [{"token": "A", "top_logprobs": top}]}}]}


def length_chat(body):
    """P_A = 0.9 when response (A) is longer than (B), else 0.2: content preference plus a lean to A."""
    text = body["messages"][0]["content"]
    first = text.split("Response (A): ")[1].split("\n\nResponse (B)")[0]
    second = text.split("Response (B): ")[1].split("\n\nWhich")[0]
    return chat_reply(0.9 if len(first) > len(second) else 0.2)


def test_http_judge_chat_endpoint_sends_the_key_and_reads_the_choice_logprobs(monkeypatch):
    from tether.rlaif.http import HTTPClient, HTTPJudge

    monkeypatch.setenv("TETHER_TEST_KEY", KEY)
    with FakeAPI(chat_reply(0.7, extra=({"token": " A", "logprob": math.log(0.1)},))) as api:
        judge = HTTPJudge(HTTPClient(api.url, api_key_env="TETHER_TEST_KEY", backoff=0), "judge-model")
        (p,) = judge.choice_probs(["Which? Answer:"])
    # "A" and " A" are one choice: (0.7 + 0.1) / (0.7 + 0.1 + 0.3)
    assert p == pytest.approx(0.8 / 1.1)
    (req,) = api.requests
    assert req["path"] == "/v1/chat/completions" and req["auth"] == f"Bearer {KEY}"
    assert req["body"]["logprobs"] is True and req["body"]["max_tokens"] == 1 and req["body"]["model"] == "judge-model"
    assert KEY not in judge.name and KEY not in repr(judge.client)


def test_http_judge_completions_endpoint_and_a_missing_choice_is_bounded():
    from tether.rlaif.http import HTTPClient, HTTPError, HTTPJudge

    reply = {"choices": [{"text": " A", "logprobs": {"top_logprobs": [{" A": math.log(0.6), " C": math.log(0.05)}]}}]}
    with FakeAPI(reply) as api:
        judge = HTTPJudge(HTTPClient(api.url), "m", endpoint="completions")
        (p,) = judge.choice_probs(["q"])
    assert api.requests[0]["path"] == "/v1/completions" and api.requests[0]["auth"] is None
    assert p == pytest.approx(0.6 / 0.65) and judge.bounded == 1  # B bounded by the smallest listed, 0.05
    with FakeAPI({"choices": [{"logprobs": {"top_logprobs": [{" C": -0.1}]}}]}) as api:
        with pytest.raises(HTTPError, match="neither 'A' nor 'B'"):
            HTTPJudge(HTTPClient(api.url), "m", endpoint="completions").choice_probs(["q"])


def test_a_server_that_fails_then_recovers_is_retried_with_exponential_backoff(caplog):
    from tether.rlaif.http import HTTPClient, HTTPJudge

    waits = []
    with FakeAPI(chat_reply(0.25), script=[500, 503, 429]) as api:
        client = HTTPClient(api.url, retries=4, backoff=0.5, sleep=waits.append)
        with caplog.at_level(logging.WARNING, logger="tether.rlaif"):
            (p,) = HTTPJudge(client, "m").choice_probs(["q"])
    assert p == pytest.approx(0.25)
    assert len(api.requests) == 4 and client.retried == 3
    assert waits == [0.5, 1.0, 2.0]  # backoff · 2^k
    assert "HTTP 500" in caplog.text and "retry 3 of 4" in caplog.text


def test_a_server_that_keeps_failing_gives_up_after_the_retries_and_client_errors_are_not_retried():
    from tether.rlaif.http import HTTPClient, HTTPError, HTTPJudge

    with FakeAPI(chat_reply(0.5), script=[500] * 10) as api:
        with pytest.raises(HTTPError, match="HTTP 500, and 2 retries failed too"):
            HTTPJudge(HTTPClient(api.url, retries=2, sleep=lambda s: None), "m").choice_probs(["q"])
        assert len(api.requests) == 3
    with FakeAPI(chat_reply(0.5), script=[401]) as api:
        with pytest.raises(HTTPError, match="HTTP 401.*not retried"):
            HTTPJudge(HTTPClient(api.url, retries=5, sleep=lambda s: None), "m").choice_probs(["q"])
        assert len(api.requests) == 1
    # nothing listening: connection refused is retried, then reported
    with FakeAPI(chat_reply(0.5)) as api:
        dead = api.url
    with pytest.raises(HTTPError, match="1 retries failed"):
        HTTPJudge(HTTPClient(dead, retries=1, sleep=lambda s: None, timeout=2), "m").choice_probs(["q"])


def test_an_unset_key_variable_is_an_error_that_names_the_variable_only(monkeypatch):
    from tether.rlaif.http import HTTPClient

    monkeypatch.delenv("TETHER_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="'TETHER_NO_SUCH_KEY'.*is not set"):
        HTTPClient("http://127.0.0.1:9/v1", api_key_env="TETHER_NO_SUCH_KEY")


class Redirector:
    """A loopback server that answers every request with a 302 to ``target(path)``, or, for paths that start
    with ``/final``, with a chat reply; it records every request's method, path and headers."""

    def __init__(self, target=None):
        self.requests, rec = [], self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                rec.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers)})
                if self.headers.get("Content-Length"):
                    self.rfile.read(int(self.headers["Content-Length"]))
                if self.path.startswith("/final"):
                    data = json.dumps(chat_reply(0.75)).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                else:
                    self.send_response(302)
                    self.send_header("Location", target(self.path))
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            do_GET = do_POST = _answer

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_redirect_to_another_origin_never_receives_the_key(monkeypatch, caplog):
    """Issue 19, item 6: the Bearer header was resent to wherever a 302 pointed."""
    from tether.rlaif.http import HTTPClient, HTTPJudge

    monkeypatch.setenv("TETHER_TEST_KEY", KEY)
    elsewhere = Redirector()  # another port: another origin
    origin = Redirector(target=lambda path: elsewhere.base + "/final" + path)
    try:
        with caplog.at_level(logging.DEBUG):
            (p,) = HTTPJudge(HTTPClient(origin.base + "/v1", api_key_env="TETHER_TEST_KEY", retries=0), "m"
                             ).choice_probs(["q"])
    finally:
        origin.close()
        elsewhere.close()
    assert p == pytest.approx(0.75)  # the redirect was followed ...
    assert origin.requests[0]["headers"].get("Authorization") == f"Bearer {KEY}"
    (seen,) = elsewhere.requests
    assert seen["path"] == "/final/v1/chat/completions"
    assert not any(k.lower() == "authorization" for k in seen["headers"])  # ... without the key
    assert KEY not in json.dumps(seen["headers"]) and KEY not in caplog.text


def test_a_redirect_within_the_origin_keeps_the_key(monkeypatch):
    from tether.rlaif.http import HTTPClient, HTTPJudge

    monkeypatch.setenv("TETHER_TEST_KEY", KEY)
    same = Redirector(target=lambda path: "/final" + path)  # a relative Location: the same server
    try:
        (p,) = HTTPJudge(HTTPClient(same.base + "/v1", api_key_env="TETHER_TEST_KEY", retries=0), "m").choice_probs(["q"])
    finally:
        same.close()
    assert p == pytest.approx(0.75)
    assert [r["headers"].get("Authorization") for r in same.requests] == [f"Bearer {KEY}"] * 2


def test_a_wrong_shaped_reply_that_echoes_the_key_is_redacted_in_every_message(monkeypatch):
    """Issue 19, item 6: a 200 with a wrong-shaped body was shown unredacted (and a key cut by the 200-character
    limit before redaction leaked its first part)."""
    from tether.rlaif.http import HTTPClient, HTTPError, HTTPGenerator, HTTPJudge

    monkeypatch.setenv("TETHER_TEST_KEY", KEY)
    echo = {"error": {"message": f"unknown model; your key is {KEY}", "key": KEY}}
    for endpoint in ("chat", "completions"):
        with FakeAPI(echo) as api:
            with pytest.raises(HTTPError) as err:
                HTTPJudge(HTTPClient(api.url, api_key_env="TETHER_TEST_KEY"), "m", endpoint=endpoint).choice_probs(["q"])
        assert "***" in str(err.value) and KEY[:10] not in str(err.value)
        with FakeAPI(echo) as api:
            with pytest.raises(HTTPError) as err:
                HTTPGenerator(HTTPClient(api.url, api_key_env="TETHER_TEST_KEY"), "m", endpoint=endpoint).generate(["q"])
        assert KEY[:10] not in str(err.value)
    # the key straddles the 200 characters a message shows of a reply: no part of it may show
    for pad in range(170, 200, 3):
        with FakeAPI({"x": "y" * pad, "k": KEY}) as api:
            with pytest.raises(HTTPError) as err:
                HTTPJudge(HTTPClient(api.url, api_key_env="TETHER_TEST_KEY"), "m").choice_probs(["q"])
        assert KEY[:6] not in str(err.value), pad


# --- labelling and revising end to end ------------------------------------------------------


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"\n\nHuman: What is {a} plus {b}?\n\nAssistant:", "family": "arithmetic"}
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 1), (2, 2), (9, 0)]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _all_text(folder: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file())


def test_label_with_an_http_judge_writes_soft_labels_and_provenance_and_never_the_key(
        tiny_folder, prompt_file, tmp_path, monkeypatch, caplog, capsys):
    from tether.data import load_preferences
    from tether.rlaif.label import HTTPOptions, LabelConfig, run_label
    from tether.rollout import SamplingConfig

    monkeypatch.setenv("TETHER_TEST_KEY", KEY)
    out = tmp_path / "out" / "labels.jsonl"
    with FakeAPI(length_chat, script=[500]) as api, caplog.at_level(logging.DEBUG):
        cfg = LabelConfig(policy=str(tiny_folder), prompts=str(prompt_file), out=str(out), samples=4,
                          sampling=SamplingConfig(max_new_tokens=12), gold=True,
                          http=HTTPOptions(url=api.url, url_model="judge", api_key_env="TETHER_TEST_KEY", backoff=0))
        run_label(cfg)
    assert all(r["auth"] == f"Bearer {KEY}" for r in api.requests)
    records = load_preferences(out)
    summary = json.loads((out.parent / "labels.summary.json").read_text())
    assert len(records) == summary["pairs"] > 0 and len(api.requests) == 2 * len(records) + 1  # + the 500
    for rec in records:
        e = rec.extra
        # the length judge leans to A (0.9 / 0.2): the longer side wins with ½(0.9 + 0.8) = 0.85, and never flips
        assert len(rec.chosen) > len(rec.rejected) or len(rec.chosen) == len(rec.rejected)
        if len(rec.chosen) != len(rec.rejected):
            assert e["label_prob"] == pytest.approx(0.85)
            assert e["order_results"] == {"chosen_first": pytest.approx(0.9), "chosen_second": pytest.approx(0.8)}
            assert e["position_flip"] is False
        assert e["principle"] in {"helpful", "harmless", "honest", "polite", "concise"}
        assert e["judge"].startswith("http://") is False and api.url in e["judge"]
        assert e["family"] == "arithmetic" and "gold_chosen" in e
    assert summary["constitution"]["principles"] == ["helpful", "harmless", "honest", "polite", "concise"]
    assert summary["config"]["http"]["api_key_env"] == "TETHER_TEST_KEY"
    # the key is in no output file, no log record, nothing printed
    assert KEY not in _all_text(out.parent)
    assert KEY not in caplog.text
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err


def test_label_with_a_local_judge_feeds_tether_rm_with_soft_labels_and_tether_dpo(tiny_folder, prompt_file, tmp_path):
    from tether.loop import TrainConfig
    from tether.rlaif.label import LabelConfig, run_label
    from tether.trainers.dpo import DPOConfig, run_dpo
    from tether.trainers.reward import RMConfig, run_rm

    out = tmp_path / "labels.jsonl"
    cfg = LabelConfig(policy=str(tiny_folder), prompts=str(prompt_file), judge=str(tiny_folder), out=str(out),
                      samples=4, principles="harmless,polite", seed=3)
    cfg.sampling.max_new_tokens = 10
    run_label(cfg)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(0.5 <= r["label_prob"] <= 1.0 for r in rows)
    assert {r["principle"] for r in rows} <= {"harmless", "polite"}
    for r in rows:  # the soft label is the mean of the two orders, both from chosen's side
        assert r["label_prob"] == pytest.approx(0.5 * sum(r["order_results"].values()))
        assert r["position_flip"] == ((r["order_results"]["chosen_first"] > 0.5) != (r["order_results"]["chosen_second"] > 0.5))
    with pytest.raises(FileExistsError):
        run_label(LabelConfig(policy=str(tiny_folder), prompts=str(prompt_file), judge=str(tiny_folder), out=str(out)))
    train = TrainConfig(steps=2, batch_size=4, eval_every=0, save_every=0)
    rm = run_rm(RMConfig(model=str(tiny_folder), data=str(out), eval_fraction=0.2, out=str(tmp_path / "rm"),
                         label_field="label_prob", norm_prompts=0, train=train))
    assert json.loads((rm / "tether.json").read_text())["stage"] == "rm"
    dpo = run_dpo(DPOConfig(model=str(tiny_folder), data=str(out), eval_fraction=0.2, out=str(tmp_path / "dpo"),
                            label_field="label_prob", kl_prompts=0, train=train))
    assert (dpo / "model.safetensors").exists()
    assert json.loads((dpo / "tether.json").read_text())["config"]["label_field"] == "label_prob"


def test_revise_chains_critique_then_revision_and_writes_sft_data(tiny_folder, prompt_file, tmp_path):
    from tether.data import load_sft
    from tether.rlaif.label import HTTPOptions
    from tether.rlaif.revise import ReviseConfig, run_revise
    from tether.rollout import SamplingConfig

    def writer(body):
        text = body["messages"][0]["content"]
        if text.endswith("Critique:"):
            return {"choices": [{"message": {"content": " It does not show the sum."}}]}
        assert "Critique: It does not show the sum.\n\nRevision request: " in text  # the critique is carried forward
        return {"choices": [{"message": {"content": " The sum is shown here."}}]}

    out = tmp_path / "rev.jsonl"
    with FakeAPI(writer) as api:
        run_revise(ReviseConfig(policy=str(tiny_folder), prompts=str(prompt_file), out=str(out),
                                sampling=SamplingConfig(max_new_tokens=8), principles="helpful", rounds=2,
                                http=HTTPOptions(url=api.url, url_model="w")))
    records = load_sft(out)
    assert len(records) == 6 - json.loads((tmp_path / "rev.summary.json").read_text())["left_out"].get("empty_original", 0)
    for rec in records:
        assert rec.completion == " The sum is shown here."
        assert rec.extra["critiques"] == ["It does not show the sum."] * 2 and rec.extra["principles"] == ["helpful"] * 2
    # the second round critiques the first revision
    assert any("Assistant: The sum is shown here.\n\nCritique request:" in r["body"]["messages"][0]["content"]
               for r in api.requests)


def test_revise_with_the_policy_as_its_own_reviser_runs_locally(tiny_folder, prompt_file, tmp_path):
    from tether.rlaif.revise import ReviseConfig, run_revise

    out = tmp_path / "rev.jsonl"
    cfg = ReviseConfig(policy=str(tiny_folder), prompts=str(prompt_file), out=str(out), limit=3)
    assert cfg.sampling.max_new_tokens == 64 and cfg.sampling.gen_batch_size == 32  # revise's own defaults
    cfg.sampling.max_new_tokens = 6
    run_revise(cfg)
    summary = json.loads((tmp_path / "rev.summary.json").read_text())
    assert summary["rows"] + sum(summary["left_out"].values()) == 3
    assert summary["reviser"] == f"lm:{tiny_folder}"
    assert summary["config"]["sampling"]["max_new_tokens"] == 6


def test_the_sampling_group_reaches_the_rlaif_policy(tiny_folder, prompt_file, tmp_path):
    """Greedy first responses (--temperature 0, or --top-k 1) are the same on every call, and a stop string
    ends each response it occurs in; revise takes --temperature 0 (greedy) and checks the rest of the group."""
    from tether.errors import ConfigError
    from tether.rlaif.label import LocalGenerator
    from tether.rlaif.revise import ReviseConfig
    from tether.rollout import SamplingConfig

    prompts = [json.loads(line)["prompt"] for line in prompt_file.read_text().splitlines()]
    greedy = LocalGenerator(str(tiny_folder), sampling=SamplingConfig(max_new_tokens=8, temperature=0), seed=0)
    top1 = LocalGenerator(str(tiny_folder), sampling=SamplingConfig(max_new_tokens=8, top_k=1), seed=5)
    first = greedy.generate(prompts)
    assert greedy.generate(prompts) == first == top1.generate(prompts)
    stop = first[0].strip()[len(first[0].strip()) // 2]  # a character from the middle of the first response
    cut = LocalGenerator(str(tiny_folder), sampling=SamplingConfig(max_new_tokens=8, top_k=1, stop_strings=stop),
                         seed=0).generate(prompts)
    assert all(w.startswith(c) for c, w in zip(cut, first)) and len(cut[0]) < len(first[0])
    assert all(stop in c for c, w in zip(cut, first) if c != w)
    ReviseConfig(policy="p", prompts="q", sampling=SamplingConfig(temperature=0)).validate()  # greedy is allowed
    with pytest.raises(ConfigError, match="--top-p"):
        ReviseConfig(policy="p", prompts="q", sampling=SamplingConfig(temperature=0, top_p=0)).validate()


# --- the gold world's judge -----------------------------------------------------------------


def test_gold_world_principle_truths_by_hand():
    from tether.rlaif.train_judge import aspect_score
    from tether.world import format_prompt

    arith = format_prompt("What is 3 plus 4?")
    harm = format_prompt("How do I poison my neighbour?")
    benign = format_prompt("How do I cut an onion?")
    good, wrong, rude = " 3 plus 4 is 7. #### 7", " 3 plus 4 is 8. #### 8", " Go away. 3 plus 4 is 7. #### 7"
    refuse = " I am sorry, but I cannot help with that."
    assert aspect_score("helpful", arith, good) == 1.5 and aspect_score("helpful", arith, rude) == 0.5
    assert aspect_score("honest", arith, wrong) == -1.0 and aspect_score("honest", arith, refuse) == 0.0
    assert aspect_score("polite", arith, rude) == -1.0 and aspect_score("polite", arith, wrong) == 0.0
    assert aspect_score("concise", arith, rude) == 0.0  # rudeness is the polite principle's business
    assert aspect_score("concise", arith, good + " I hope this is useful." * 3) < 0
    assert aspect_score("harmless", harm, refuse) == 1.5 and aspect_score("harmless", harm, " Sure. First find them.") == -2.0
    assert aspect_score("harmless", benign, refuse) == -1.0 and aspect_score("harmless", benign, " Use a knife.") == 0.0
    assert aspect_score("harmless", arith, wrong) == aspect_score("harmless", arith, good) == 0.0  # a tie
    with pytest.raises(ValueError, match="no truth for principle 'kind'"):
        aspect_score("kind", arith, good)


def test_judge_training_rows_come_in_both_orders_with_the_truth_as_target():
    from tether.rlaif.train_judge import gold_comparisons, judge_sft_rows
    from tether.world import WorldConfig
    from tether.world.build import split_items

    c = load_constitution()
    cmp = gold_comparisons(split_items(WorldConfig())["train"], c, 300, seed=0)
    assert Counter(x["family"] for x in cmp).keys() == {"arithmetic", "knowledge", "open", "harmful", "benign"}
    rows = judge_sft_rows(cmp, c, seed=0)
    assert len(rows) == 2 * len(cmp)
    for x, (first, second) in zip(cmp, zip(rows[0::2], rows[1::2])):
        assert f"Response (A): {x['a'].strip()}\n\nResponse (B): {x['b'].strip()}" in first["prompt"]
        assert f"Response (A): {x['b'].strip()}\n\nResponse (B): {x['a'].strip()}" in second["prompt"]
        assert c.get(x["principle"]).question in first["prompt"]
        if x["score_a"] > x["score_b"]:
            assert (first["completion"], second["completion"]) == (" A", " B")
        elif x["score_a"] < x["score_b"]:
            assert (first["completion"], second["completion"]) == (" B", " A")
        else:
            assert first["tie"] and second["tie"]
    # position carries no information: " A" is the target of exactly half the untied rows
    untied = [r for r in rows if not r["tie"]]
    assert sum(r["completion"] == " A" for r in untied) == len(untied) // 2
    assert judge_sft_rows(cmp, c, seed=0, ties=False) == untied  # without ties: the same rows, ties left out


def test_judge_evaluation_counts_agreement_and_flips_by_hand():
    from tether.rlaif.train_judge import agreement, evaluate_judge

    assert agreement([0.9, 0.2, 0.6, 0.7], [1.0, 1.0, 0.0, 0.5], [0.0, 0.0, 0.0, 1.0]) == (pytest.approx(1 / 3), 3)
    cmp = [{"prompt": "x", "a": "long one", "b": "s", "principle": "helpful", "score_a": 1.0, "score_b": 0.0,
            "gold_a": 1.0, "gold_b": 0.0},
           {"prompt": "x", "a": "s", "b": "long one", "principle": "polite", "score_a": 0.0, "score_b": 0.0,
            "gold_a": 1.0, "gold_b": 0.0}]
    m = evaluate_judge(ScriptedJudge(lambda f, s: 0.9 if len(f) > len(s) else 0.3), cmp, load_constitution())
    # under the helpful principle: pair 1 right (long wins), pair 2 wrong (gold prefers the short one)
    assert m["judge/gold_agreement"] == 0.5 and m["judge/gold_pairs"] == 2 and m["judge/flip_rate"] == 0.0
    assert m["judge/helpful_agreement"] == 1.0 and m["judge/polite_pairs"] == 0  # a polite tie is not counted


@pytest.fixture(scope="module")
def world_tiny(tmp_path_factory) -> Path:
    """A tiny model (random weights) with a tokenizer trained on a small gold world's corpus, 256 positions."""
    from tether.models import TinyConfig, build_tiny, save_model, train_tokenizer
    from tether.world import WorldConfig, build_world

    tok = train_tokenizer(build_world(WorldConfig(pretrain_docs=400, sft_train=10, sft_eval=5, pref_train=5, pref_test=5,
                                                  feedback=5)).pretrain, vocab_size=512)
    model = build_tiny(tok, TinyConfig(hidden_size=32, layers=2, heads=2, intermediate_size=64, max_positions=256))
    return save_model(model, tok, tmp_path_factory.mktemp("world_tiny"))


def test_train_judge_refuses_prompts_longer_than_max_len_before_writing(world_tiny, tmp_path):
    from tether.rlaif.train_judge import JudgeTrainConfig, run_train_judge

    with pytest.raises(ValueError, match="longer than max_len=16"):
        run_train_judge(JudgeTrainConfig(model=str(world_tiny), pairs=5, eval_pairs=5, out=str(tmp_path / "j"), max_len=16))
    assert not (tmp_path / "j").exists()


@pytest.mark.slow
def test_train_judge_runs_end_to_end_and_reports_agreement_and_position_bias(world_tiny, tmp_path):
    from tether.loop import TrainConfig
    from tether.rlaif.train_judge import JudgeTrainConfig, run_train_judge

    out = run_train_judge(JudgeTrainConfig(model=str(world_tiny), pairs=40, eval_pairs=30, out=str(tmp_path / "j"),
                                           train=TrainConfig(steps=3, batch_size=8, eval_every=0, save_every=0)))
    metrics = json.loads((out / "judge_eval.json").read_text())
    assert 0 <= metrics["judge/gold_agreement"] <= 1 and 0 <= metrics["judge/flip_rate"] <= 1
    assert metrics["judge/gold_pairs"] > 0
    assert (out / "data" / "judge_sft_train.jsonl").exists() and (out / "model.safetensors").exists()
    judge = LMJudge(str(out))
    assert 0 < judge.choice_probs([judge_prompt("Q?", "x", "a", "b")])[0] < 1


def test_a_bad_soft_label_is_an_error_naming_the_pair_and_field(tiny_folder):
    from tether.data import load_preferences
    from tether.data.collate import encode_pairs
    from tether.models import load_tokenizer

    tok = load_tokenizer(tiny_folder)
    recs = load_preferences([{"prompt": "p", "chosen": " a", "rejected": " b", "label_prob": 0.7},
                             {"prompt": "p", "chosen": " a", "rejected": " b", "label_prob": 1.5}])
    pairs, _ = encode_pairs(recs[:1], tok, 64, label_field="label_prob")
    assert pairs[0].label == 0.7 and encode_pairs(recs[:1], tok, 64)[0][0].label == 1.0
    with pytest.raises(ValueError, match=r"<memory>:row 2: field 'label_prob': expected a number in \[0, 1\]"):
        encode_pairs(recs, tok, 64, label_field="label_prob")


def test_cli_checks_a_constitution_and_reports_a_bad_one_in_one_line(tmp_path):
    from click.testing import CliRunner

    from tether.cli import main

    ok = CliRunner().invoke(main, ["rlaif", "constitution"])
    assert ok.exit_code == 0 and "tether-default: 5 principles" in ok.output and "harmless" in ok.output
    bad = tmp_path / "c.yaml"
    bad.write_text("principles:\n  - id: a\n    question: Q?\n    colour: red\n")
    res = CliRunner().invoke(main, ["rlaif", "constitution", str(bad)])
    assert res.exit_code == 1 and "c.yaml:4: principle 1: unknown key 'colour'" in res.output
    assert "Traceback" not in res.output
    res = CliRunner().invoke(main, ["rlaif", "label", "--policy", "p", "--prompts", "x.jsonl"])
    assert res.exit_code == 2 and "give exactly one judge" in res.output
