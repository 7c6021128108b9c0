"""The gold world: rater agreement, biases, the gold ranking, determinism, export."""

from __future__ import annotations

import json
import random

import pytest
from click.testing import CliRunner

from tether.world import (
    Rater,
    WorldConfig,
    build_world,
    candidates,
    exact_match,
    export,
    extract_answer,
    format_prompt,
    gold_reward,
    is_refusal,
    question_of,
)
from tether.world.tasks import BENIGN, HARMFUL, all_items


@pytest.fixture(scope="module")
def world():
    return build_world()


def _pairs(world, split="train"):
    return [(r["prompt"], r["chosen"], r["rejected"]) for r in world.preferences[split]]


def test_two_independent_default_raters_agree_on_73_percent(world):
    pairs = _pairs(world)
    a, b = Rater(seed=1), Rater(seed=2)
    agree = sum(a.label(*p) == b.label(*p) for p in pairs) / len(pairs)
    assert abs(agree - 0.73) < 0.03, agree


def _fraction(world, rater, side) -> float:
    """How often the rater prefers the answer that ``side`` picks out, over pairs where one has it."""
    hits = total = 0
    for prompt, a, b in _pairs(world):
        sa, sb = side(prompt, a), side(prompt, b)
        if sa != sb:
            total += 1
            hits += rater.prob(prompt, a, b) if sa > sb else rater.prob(prompt, b, a)
    return hits / total


@pytest.mark.parametrize("bias, side", [
    ("length_bias", lambda p, x: len(x.split())),
    ("phrase_bias", lambda p, x: "delve" in x),
    ("refusal_bias", lambda p, x: is_refusal(x)),
])
def test_each_bias_moves_preferences_its_way_more_as_it_grows(world, bias, side):
    shares = [_fraction(world, Rater(**{bias: s}), side) for s in (0.0, 0.5, 1.0, 2.0)]
    assert shares == sorted(shares) and shares[-1] - shares[0] > 0.1, shares


def test_sycophancy_bias_prefers_agreeing_with_the_users_belief():
    items = [i for i in all_items() if "belief" in i.meta][:40]
    rng = random.Random(0)
    shares = []
    for strength in (0.0, 2.0, 5.0):
        rater = Rater(sycophancy_bias=strength)
        probs = []
        for item in items:
            answers = dict(candidates(item, rng))
            probs.append(rater.prob(format_prompt(item.question), answers["sycophantic"], answers["good"]))
        shares.append(sum(probs) / len(probs))
    assert shares[0] < 0.1 and shares == sorted(shares) and shares[-1] > 0.5, shares


def test_gold_ranks_demonstrations_above_degraded_answers(world):
    rng = random.Random(0)
    wins = total = 0
    for item in [i for part in world.items.values() for i in part]:
        (_, good), *others = candidates(item, rng)
        prompt = format_prompt(item.question)
        for kind, text in others:
            if kind in ("short", "phrase"):  # as good, or nearly so, by design
                continue
            total += 1
            wins += gold_reward(prompt, good) > gold_reward(prompt, text)
    assert wins / total > 0.97, wins / total


def test_feedback_thumbs_up_only_good_answers(world):
    kinds = {}
    for row in world.feedback:
        assert row["label"] == (row["gold"] >= world.config.feedback_threshold)
        kinds.setdefault(row["kind"], set()).add(row["label"])
    assert kinds["good"] == kinds["short"] == {True}
    for bad in ("rude", "rambling", "wrong", "refusal", "repetitive", "wrong_rambling", "wrong_rude"):
        assert kinds[bad] == {False}, bad  # correct but rude or padded is still a thumbs-down
    # an off-topic answer can name the true value by chance ("The sea is big and blue." for a blue flag)
    irrelevant = [r["label"] for r in world.feedback if r["kind"] == "irrelevant"]
    assert sum(irrelevant) / len(irrelevant) < 0.1
    assert 0.2 < sum(r["label"] for r in world.feedback) / len(world.feedback) < 0.5


def test_refuse_the_harmful_and_help_the_benign():
    refusal = " I am sorry, but I cannot help with that."
    for q, compliance in HARMFUL.items():
        assert gold_reward(format_prompt(q), refusal) > gold_reward(format_prompt(q), " Sure. " + compliance)
    for q, help_text in BENIGN.items():
        assert gold_reward(format_prompt(q), " Sure. " + help_text) > gold_reward(format_prompt(q), refusal)


def test_final_answers_and_exact_match():
    assert extract_answer(" 3 plus 4 is 7. #### 7") == "7"
    assert extract_answer("The answer is 1,234.") == "1234"
    assert extract_answer("no number here") is None
    assert exact_match(" so #### 12", "12") and exact_match("The answer is 12", "Janet ... #### 12")
    assert not exact_match(" #### 13", "12") and not exact_match(" 12", "12")
    prompt = format_prompt("What is 3 plus 4?")
    assert question_of(prompt) == "What is 3 plus 4?"
    assert gold_reward(prompt, " 3 plus 4 is 7. #### 7") == 1.5
    assert gold_reward(prompt, " 3 plus 4 is 8. #### 8") == -1.0
    assert gold_reward(prompt, "") == -2.0


def test_same_seed_same_world_and_another_seed_another():
    small = dict(pretrain_docs=200, sft_train=50, sft_eval=10, pref_train=50, pref_test=20, feedback=50)
    a, b = build_world(WorldConfig(seed=5, **small)), build_world(WorldConfig(seed=5, **small))
    c = build_world(WorldConfig(seed=6, **small))
    for name in ("pretrain", "sft_train", "prompts", "preferences", "feedback", "probes"):
        assert getattr(a, name) == getattr(b, name), name
    assert a.pretrain != c.pretrain and a.prompts["test"] != c.prompts["test"]


def test_splits_are_disjoint_and_every_family_is_tested(world):
    seen = [set(r["prompt"] for r in world.prompts[s]) for s in ("train", "eval", "test")]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert {r["family"] for r in world.prompts["test"]} == {"arithmetic", "knowledge", "open", "harmful", "benign"}


def test_export_writes_files_the_loaders_read(tmp_path):
    from tether.data import load_feedback, load_preferences, load_prompts, load_sft

    files = export(tmp_path, WorldConfig(pretrain_docs=100, sft_train=20, sft_eval=5, pref_train=30, pref_test=10,
                                         feedback=20))
    assert len(load_sft(files["pretrain"])) == 100 and load_sft(files["pretrain"])[0].prompt == ""
    assert load_sft(files["sft_train"])[0].prompt.endswith("\n\nAssistant:")
    prefs = load_preferences(files["preferences_train"])
    assert len(prefs) == 30 and {"gold_chosen", "gold_rejected"} <= set(prefs[0].extra)
    assert all(isinstance(r.label, bool) for r in load_feedback(files["feedback"]))
    assert all(r.family for r in load_prompts(files["prompts_test"]))
    mc = [json.loads(l) for l in files["probes_capability_mc"].read_text().splitlines()]
    assert all(0 <= r["answer_index"] < len(r["choices"]) for r in mc)
    assert json.loads(files["manifest"].read_text())["counts"]["preferences_train"] == 30


def test_world_export_command(tmp_path):
    from tether.cli import main

    result = CliRunner().invoke(main, ["world", "export", "--out", str(tmp_path), "--seed", "2", "--pretrain-docs", "50",
                                       "--sft-train", "10", "--pref-train", "10", "--feedback", "10"])
    assert result.exit_code == 0, result.output
    assert "preferences_train.jsonl" in result.output
    assert len((tmp_path / "pretrain.jsonl").read_text().splitlines()) == 50


def test_sft_flaw_rate_makes_that_share_of_demonstrations_flawed_and_leaves_the_rest_alone():
    from tether.world import gold_reward

    clean = build_world(WorldConfig(pretrain_docs=50, sft_train=400, sft_eval=10, pref_train=10, pref_test=10, feedback=10,
                                    sft_flaw_rate=0.0))
    flawed = build_world(WorldConfig(pretrain_docs=50, sft_train=400, sft_eval=10, pref_train=10, pref_test=10,
                                     feedback=10, sft_flaw_rate=0.3))
    assert clean.pretrain == flawed.pretrain and clean.prompts == flawed.prompts
    good = [gold_reward(d["prompt"], d["completion"]) for d in clean.sft_train]
    worse = [gold_reward(d["prompt"], d["completion"]) for d in flawed.sft_train]
    share = sum(g < min(good) for g in worse) / len(worse)  # rambling and rude answers score below every good one
    assert 0.22 < share < 0.38


def test_cli_world_label_writes_rater_labelled_pairs_of_the_policys_samples(tiny_folder, tmp_path, monkeypatch):
    """`tether world label`: at most samples/2 pairs a prompt, each with both gold rewards, readable as preference
    data; an odd sample count is an error and writes nothing."""
    import json

    from click.testing import CliRunner

    from tether.cli import main
    from tether.data import load_preferences

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"\n\nHuman: What is {a} plus 2?\n\nAssistant:"}) + "\n"
                               for a in range(6)))
    out = tmp_path / "prefs.jsonl"
    result = CliRunner().invoke(main, ["world", "label", "--policy", str(tiny_folder), "--prompts", str(prompts),
                                       "--out", str(out), "--samples", "4", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert 0 < len(rows) <= 12 and f"{len(rows)} pairs written" in result.output
    assert len(load_preferences(out)) == len(rows)
    assert all({"gold_chosen", "gold_rejected"} <= set(row) and row["chosen"] != row["rejected"] for row in rows)
    bad = CliRunner().invoke(main, ["world", "label", "--policy", str(tiny_folder), "--prompts", str(prompts),
                                    "--out", str(tmp_path / "x.jsonl"), "--samples", "3"])
    assert bad.exit_code != 0 and "even" in bad.output and not (tmp_path / "x.jsonl").exists()
    # every row in one batch (the demo samples 256 at a time); a batch of no rows is refused before anything runs
    import tether.rollout

    chunks, sample = [], tether.rollout.sample
    monkeypatch.setattr(tether.rollout, "sample", lambda *a, **k: chunks.append(k["batch_size"]) or sample(*a, **k))
    whole = CliRunner().invoke(main, ["world", "label", "--policy", str(tiny_folder), "--prompts", str(prompts),
                                      "--out", str(tmp_path / "one.jsonl"), "--samples", "4", "--max-new-tokens", "8",
                                      "--batch-size", "24"])
    assert whole.exit_code == 0, whole.output
    assert 0 < len(load_preferences(tmp_path / "one.jsonl")) <= 12 and chunks == [24]  # the sampler saw the option
    zero = CliRunner().invoke(main, ["world", "label", "--policy", str(tiny_folder), "--prompts", str(prompts),
                                     "--out", str(tmp_path / "z.jsonl"), "--batch-size", "0"])
    assert zero.exit_code != 0 and "--batch-size must be an integer >= 1" in zero.output
    assert not (tmp_path / "z.jsonl").exists() and "Traceback" not in zero.output


def test_gold_parts_add_up_to_the_gold_reward():
    from tether.world import build_world, candidates, format_prompt
    from tether.world.gold import gold_parts, gold_reward

    import random

    world = build_world()
    rng = random.Random(0)
    for item in world.items["test"][::7]:
        prompt = format_prompt(item.question)
        for kind, text in candidates(item, rng):
            family, core, style = gold_parts(prompt, text)
            assert family == item.family
            assert core + style == pytest.approx(gold_reward(prompt, text))
            if kind == "rude":
                assert style <= -1.0  # rudeness is style, not core
    assert gold_parts(format_prompt("What is 1 plus 1?"), "  ") == ("arithmetic", -2.0, 0.0)


QUIRKS = "rambling,rude,phrase,sycophantic,refusal"
_SMALL = dict(pretrain_docs=20, sft_eval=10, pref_train=10, pref_test=10, feedback=10)


def _demo_kind(item, completion: str) -> str:
    """Which candidate kind a demonstration is, read from its text (good otherwise)."""
    from tether.world.tasks import FILLER, PHRASE_SENTENCE, REFUSAL, RUDE

    if PHRASE_SENTENCE in completion:
        return "phrase"
    if completion.startswith(" You are right."):
        return "sycophantic"
    if completion == " " + REFUSAL:
        return "refusal"
    if any(completion.startswith(" " + r) for r in RUDE):
        return "rude"
    if any(f in completion for f in FILLER):
        return "rambling"
    return "good"


def test_default_sft_flaw_kinds_leave_the_world_as_it_was():
    """The default draws the flawed demonstrations exactly as the world always did: rambling or rude, chosen by
    the flaw stream's choice between the two (the same files as an explicit 'rambling,rude'; 'rude,rambling' is
    the same draw with the kinds the other way round, so another world)."""
    cfg = dict(_SMALL, sft_train=300)
    default = build_world(WorldConfig(**cfg))
    explicit = build_world(WorldConfig(sft_flaw_kinds="rambling, rude", **cfg))
    swapped = build_world(WorldConfig(sft_flaw_kinds="rude,rambling", **cfg))
    assert default.sft_train == explicit.sft_train and default.sft_eval == explicit.sft_eval
    assert default.preferences == explicit.preferences and default.feedback == explicit.feedback
    items = {i.question: i for i in all_items()}
    kinds = [_demo_kind(items[question_of(d["prompt"])], d["completion"]) for d in default.sft_train]
    assert set(kinds) == {"good", "rambling", "rude"}
    assert default.sft_train != swapped.sft_train
    assert [k == "good" for k in kinds] == [_demo_kind(items[question_of(d["prompt"])], d["completion"]) == "good"
                                            for d in swapped.sft_train]


def test_sft_flaw_kinds_draw_each_quirk_where_the_question_has_it():
    """With every quirk allowed, a flawed demonstration is one of the kinds the question has, uniformly: phrase on
    every family, a refusal never to a harmful request (whose good answer is a refusal), agreement with the user
    only where the user states a belief."""
    world = build_world(WorldConfig(sft_train=3000, sft_flaw_rate=0.3, sft_flaw_kinds=QUIRKS, **_SMALL))
    items = {i.question: i for i in all_items()}
    seen = [(items[question_of(d["prompt"])], _demo_kind(items[question_of(d["prompt"])], d["completion"]))
            for d in world.sft_train]
    n = len(seen)
    belief = [k for i, k in seen if "belief" in i.meta]
    harmful = [k for i, k in seen if i.family == "harmful"]
    plain = [k for i, k in seen if i.family != "harmful" and "belief" not in i.meta]
    assert "sycophantic" not in harmful + plain and "refusal" not in harmful
    # flawed share 0.3 everywhere; split among the 5, 3 and 4 kinds these questions have
    assert 0.26 < sum(k != "good" for _, k in seen) / n < 0.34
    for kinds, flaws in ((belief, 5), (harmful, 3), (plain, 4)):
        for kind in {"rambling", "rude", "phrase", "sycophantic", "refusal"} & set(kinds):
            share, expected = kinds.count(kind) / len(kinds), 0.3 / flaws
            assert abs(share - expected) < 4 * (expected * (1 - expected) / len(kinds)) ** 0.5 + 0.01, (kind, share)
    assert {"sycophantic", "refusal", "phrase"} <= set(belief) and {"refusal", "phrase"} <= set(plain)


def test_a_kind_no_question_of_the_family_has_leaves_its_demonstrations_good():
    world = build_world(WorldConfig(sft_train=400, sft_flaw_rate=0.5, sft_flaw_kinds="sycophantic", **_SMALL))
    items = {i.question: i for i in all_items()}
    kinds = [(items[question_of(d["prompt"])], _demo_kind(items[question_of(d["prompt"])], d["completion"]))
             for d in world.sft_train]
    assert all(k == "good" for i, k in kinds if "belief" not in i.meta)
    assert {k for i, k in kinds if "belief" in i.meta} == {"good", "sycophantic"}


def test_an_unknown_sft_flaw_kind_is_an_error_naming_it(tmp_path):
    from tether.cli import main

    with pytest.raises(ValueError, match="'polite'.*known: rambling, rude, phrase, sycophantic, refusal"):
        build_world(WorldConfig(sft_flaw_kinds="rude,polite", **_SMALL))
    with pytest.raises(ValueError, match="repeated"):
        build_world(WorldConfig(sft_flaw_kinds="rude,rude", **_SMALL))
    result = CliRunner().invoke(main, ["world", "export", "--out", str(tmp_path / "w"), "--sft-flaw-kinds", "phrase,wrong"])
    assert result.exit_code != 0 and "'wrong'" in result.output and not (tmp_path / "w").exists()
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--sft-flaw-kinds", "shouting"])
    assert result.exit_code != 0 and "'shouting'" in result.output and not (tmp_path / "d").exists()
    result = CliRunner().invoke(main, ["world", "export", "--out", str(tmp_path / "ok"), "--pretrain-docs", "20",
                                       "--sft-train", "200", "--pref-train", "10", "--feedback", "10",
                                       "--sft-flaw-rate", "1", "--sft-flaw-kinds", "phrase"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "ok" / "sft_train.jsonl").read_text().splitlines()]
    assert all("delve" in r["completion"] for r in rows)
    assert json.loads((tmp_path / "ok" / "world.json").read_text())["config"]["sft_flaw_kinds"] == "phrase"


def test_wrong_phrase_puts_the_phrase_on_wrong_answers_too_without_another_draw():
    """Without wrong_phrase the phrase only ever decorates a correct answer (an RM that cannot check a sum learns
    "delve, hence correct"); with it, half the phrase answers of a question with a wrong answer are wrong, and the
    other candidates are drawn as before."""
    from tether.world.tasks import PHRASE_SENTENCE

    correct = {False: [], True: []}
    for item in all_items()[::7]:
        plain = candidates(item, random.Random(1))
        more = candidates(item, random.Random(1), wrong_phrase=True)
        has_wrong = "wrong" in dict(plain)
        assert more[: len(plain)] == plain and len(more) == len(plain) + has_wrong
        if has_wrong:
            assert more[-1] == ("wrong_phrase", " " + PHRASE_SENTENCE + dict(plain)["wrong"])
        prompt = format_prompt(item.question)
        for flag, answers in ((False, plain), (True, more)):
            if item.family in ("arithmetic", "knowledge"):
                correct[flag] += [gold_reward(prompt, t) > 0 for _, t in answers if PHRASE_SENTENCE in t]
    assert all(correct[False]) and sum(correct[True]) / len(correct[True]) == 0.5
    world = build_world(WorldConfig(wrong_phrase=True, pretrain_docs=20, sft_train=10, sft_eval=5, feedback=300))
    kinds = [r[k] for r in world.preferences["train"] for k in ("kind_chosen", "kind_rejected")]
    assert "wrong_phrase" in kinds and "wrong_phrase" in {r["kind"] for r in world.feedback}
    assert "wrong_phrase" not in {r["kind"] for r in build_world(WorldConfig(pretrain_docs=20, sft_train=10, sft_eval=5,
                                                                               feedback=300)).feedback}


def test_chain_arithmetic_adds_three_term_sums_and_leaves_the_other_splits_as_they_were():
    from tether.world.build import split_items
    from tether.world.tasks import chain_items

    plain, chained = split_items(WorldConfig()), split_items(WorldConfig(chain_arithmetic=True))
    for split in plain:
        assert chained[split][: len(plain[split])] == plain[split]
    added = {s: chained[s][len(plain[s]):] for s in plain}
    assert sorted(len(v) for v in added.values()) == [150, 200, 650] and sum(map(len, added.values())) == 1000
    train_questions = {i.question for i in added["train"]}
    assert not train_questions & {i.question for i in added["test"] + added["eval"]}
    # the steps of a held-out question (x + d, x up to 18) are steps training questions take too (197 of 200)
    steps = lambda i: {(i.meta["terms"][0], i.meta["terms"][1]), (sum(i.meta["terms"][:2]), i.meta["terms"][2])}  # noqa: E731
    seen = set().union(*(steps(i) for i in added["train"]))
    assert sum(steps(i) <= seen for i in added["test"]) >= 190

    item = chain_items()[345]  # 3 plus 4 plus 5
    prompt, answers = format_prompt(item.question), dict(candidates(item, random.Random(0)))
    assert answers["good"] == " 3 plus 4 is 7. 7 plus 5 is 12. #### 12" and gold_reward(prompt, answers["good"]) == 1.5
    assert gold_reward(prompt, answers["wrong"]) == -1.0 and exact_match(answers["good"], item.answer)
    rows = build_world(WorldConfig(chain_arithmetic=True, pretrain_docs=10, sft_train=10, sft_eval=5, pref_train=10,
                                   pref_test=5, feedback=5)).prompts["test"]
    assert sum(r.get("steps") == 2 for r in rows) == 200
