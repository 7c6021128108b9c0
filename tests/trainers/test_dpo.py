"""DPO family and KTO: the trainers' gathering code against closed forms, the reference cache, and runs end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tether.cli import main
from tether.data import load_preferences
from tether.data.collate import EncodedFeedback, encode_pairs, pad, pad_pairs_labelled, pair_rows
from tether.losses.lm import IGNORE_INDEX, sequence_logprobs
from tether.models import load_model, load_tokenizer
from tether import scoring
from tether.trainers.dpo import DPO_LOSSES, DPOConfig, dpo_step, pair_count, run_dpo
from tether.trainers.kto import KTOConfig, mismatched_rows
from tether.world import format_prompt
from tests.toy import pref_rows


_pref_rows = pref_rows


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _pref_rows()))
    return path


@pytest.fixture
def small_pairs_file(tmp_path):
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _pref_rows()[::6]))  # 24 pairs
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))


def _encoded(tiny_folder, n=6):
    tokenizer = load_tokenizer(tiny_folder)
    records = load_preferences([r for r in _pref_rows()[::24][:n]], tokenizer=tokenizer)
    pairs, _ = encode_pairs(records, tokenizer, 64)
    return tokenizer, pairs



def step_loss(model, batch, cfg):
    """The loss of a step made of this one micro-batch: each term's sum over its count (tether.loop.accumulate)."""
    terms, metrics = dpo_step(model, batch, cfg)
    counts = pair_count(batch)
    return sum(total / counts[k] for k, total in terms.items()), metrics


@pytest.mark.parametrize("loss, smoothing, expected", [
    ("sigmoid", 0.0, math.log(2)),  # h = 0: −log σ(0) = log 2
    ("sigmoid", 0.2, math.log(2)),  # cDPO: −0.8 log σ(0) − 0.2 log σ(0) = log 2
    ("robust", 0.2, math.log(2)),  # (0.8 log 2 − 0.2 log 2) / 0.6 = log 2
    ("ipo", 0.0, 25.0),  # (0 − 1/(2·0.1))² = 25
    ("hinge", 0.0, 1.0),  # max(0, 1 − 0.1·0) = 1
])

def test_policy_equal_to_reference_gives_the_closed_form_through_the_trainer(tiny_folder, loss, smoothing, expected):
    tokenizer, pairs = _encoded(tiny_folder)
    model = load_model(tiny_folder).eval()
    ref = scoring.sequence_logprobs(model, pair_rows(pairs), tokenizer.pad_token_id, batch_size=4)  # batched differently on purpose
    ref_c, ref_r = ref.chunk(2)
    batch = {**pad_pairs_labelled(pairs, tokenizer.pad_token_id), "ref_chosen": ref_c, "ref_rejected": ref_r}
    value, metrics = step_loss(model, batch, DPOConfig(model="m", data="d", loss=loss, label_smoothing=smoothing))
    assert value.item() == pytest.approx(expected, abs=1e-5)
    assert metrics["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["logp_chosen"] == pytest.approx(ref_c.mean().item(), abs=1e-4)


def test_rpo_adds_alpha_times_the_per_token_nll_of_the_chosen_responses(tiny_folder):
    """At π = π_ref the sigmoid loss is log 2; RPO adds α · (−Σ log p over chosen response tokens / their count)."""
    tokenizer, pairs = _encoded(tiny_folder)
    model = load_model(tiny_folder).eval()
    ref_c, ref_r = scoring.sequence_logprobs(model, pair_rows(pairs), tokenizer.pad_token_id, batch_size=4).chunk(2)
    batch = {**pad_pairs_labelled(pairs, tokenizer.pad_token_id), "ref_chosen": ref_c, "ref_rejected": ref_r}
    tokens = sum(len(p.chosen) - p.prompt_len for p in pairs)
    nll = -ref_c.sum().item() / tokens  # chosen response tokens of the whole batch weigh the same
    value, metrics = step_loss(model, batch, DPOConfig(model="m", data="d", rpo_alpha=0.5))
    assert metrics["nll_chosen"] == pytest.approx(nll, rel=1e-4)
    assert value.item() == pytest.approx(math.log(2) + 0.5 * nll, rel=1e-4)
    with pytest.raises(ValueError, match="rpo-alpha"):
        DPOConfig(model="m", data="d", rpo_alpha=-1).validate()


def test_soft_labels_give_each_pair_its_own_epsilon_through_the_trainer(tiny_folder):
    """With label_field the batch carries p per pair and dpo_step's losses are −p log σ(βh) − (1 − p) log σ(−βh)."""
    tokenizer, pairs = _encoded(tiny_folder)
    model = load_model(tiny_folder).eval()
    ref_c, ref_r = scoring.sequence_logprobs(model, pair_rows(pairs), tokenizer.pad_token_id, batch_size=4).chunk(2)
    ref_c = ref_c - 1.0  # a margin h = +1 for every pair (the policy's chosen log-ratio is +1)
    soft = torch.linspace(0.5, 1.0, len(pairs))
    batch = {**pad_pairs_labelled(pairs, tokenizer.pad_token_id), "ref_chosen": ref_c, "ref_rejected": ref_r,
             "soft_label": soft}
    value, _ = step_loss(model, batch, DPOConfig(model="m", data="d", beta=0.5, label_field="label_prob"))
    bh = torch.tensor(0.5)
    expected = -(soft * torch.nn.functional.logsigmoid(bh) + (1 - soft) * torch.nn.functional.logsigmoid(-bh)).mean()
    assert value.item() == pytest.approx(expected.item(), abs=1e-4)
    with pytest.raises(ValueError, match="label_field"):
        DPOConfig(model="m", data="d", loss="ipo", label_field="label_prob").validate()


def test_one_concatenated_forward_equals_two_and_prompt_tokens_count_for_nothing(tiny_folder):
    tokenizer, pairs = _encoded(tiny_folder)
    model = load_model(tiny_folder).eval()
    pad_id = tokenizer.pad_token_id
    with torch.no_grad():
        both = pad_pairs_labelled(pairs, pad_id)  # (2B, T)
        joint = sequence_logprobs(model(input_ids=both["input_ids"], attention_mask=both["attention_mask"]).logits,
                                  both["labels"])
        rows = pair_rows(pairs)
        sides = [pad(rows[: len(pairs)], pad_id), pad(rows[len(pairs) :], pad_id)]
        separate = torch.cat([sequence_logprobs(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                                b["labels"]) for b in sides])
    assert torch.allclose(joint, separate, atol=1e-5)
    # by hand: sum over response positions t of log p(ids[t] | ids[:t]), one unpadded sequence at a time
    for i, p in enumerate(pairs):
        assert (both["labels"][i, : p.prompt_len] == IGNORE_INDEX).all()
        ids = torch.tensor([p.chosen])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)  # (T, V)
        by_hand = sum(logp[t - 1, p.chosen[t]].item() for t in range(p.prompt_len, len(p.chosen)))
        assert joint[i].item() == pytest.approx(by_hand, abs=1e-4)
        whole = sum(logp[t - 1, p.chosen[t]].item() for t in range(1, len(p.chosen)))
        assert abs(whole - by_hand) > 1.0  # the prompt would have counted, had it not been masked


def test_kto_mismatched_pairs_shift_completions_by_one():
    ex = [EncodedFeedback([1, 2], [10, 0], True), EncodedFeedback([3], [11, 12, 0], False), EncodedFeedback([4], [13, 0], True)]
    rows = mismatched_rows(ex, max_len=8)
    assert [r.input_ids for r in rows] == [[1, 2, 13, 0], [3, 10, 0], [4, 11, 12, 0]]
    assert rows[0].labels == [IGNORE_INDEX, IGNORE_INDEX, 13, 0]


def test_bad_options_are_errors():
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOConfig(model="m", data="d", loss="ipo", label_smoothing=0.1).validate()
    with pytest.raises(ValueError, match="loss must be one of"):
        DPOConfig(model="m", data="d", loss="orpo").validate()
    with pytest.raises(ValueError, match="--batch-size must be at least 2 for KTO"):
        cfg = KTOConfig(model="m", data="d")
        cfg.train.batch_size = 1
        cfg.validate()


def _cfg(tiny_folder, data, out, **kw) -> DPOConfig:
    cfg = DPOConfig(model=str(tiny_folder), data=str(data), out=str(out), **{
        "eval_fraction": 0.25, "kl_prompts": 4, "kl_max_new_tokens": 8, "overwrite": True, **kw})
    cfg.train.steps, cfg.train.batch_size, cfg.train.eval_every, cfg.train.save_every = 2, 4, 0, 0
    return cfg


@pytest.mark.slow
def test_a_rerun_reads_the_reference_cache_and_gives_identical_results(tmp_path, tiny_folder, small_pairs_file):
    first = json.loads((run_dpo(_cfg(tiny_folder, small_pairs_file, tmp_path / "a")) / "tether.json").read_text())
    assert len(list((tmp_path / "cache" / "ref_logps").glob("*.safetensors"))) == 1
    second = json.loads((run_dpo(_cfg(tiny_folder, small_pairs_file, tmp_path / "b")) / "tether.json").read_text())
    assert first["metrics"]["ref/cache_hit"] == 0.0 and second["metrics"]["ref/cache_hit"] == 1.0
    for key in ("train/loss", "eval/loss", "eval/reward_margin", "eval/kl"):
        assert first["metrics"][key] == second["metrics"][key]
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # a different max_len (other token rows) misses the cache
    third = json.loads((run_dpo(_cfg(tiny_folder, small_pairs_file, tmp_path / "c", max_len=24)) / "tether.json").read_text())
    assert third["metrics"]["ref/cache_hit"] == 0.0


@pytest.mark.slow
def test_dpo_learns_the_held_out_preferences_and_saves_a_plain_transformers_model(tmp_path, tiny_folder, pairs_file):
    out = tmp_path / "dpo"
    r = CliRunner().invoke(main, ["dpo", "--model", str(tiny_folder), "--data", str(pairs_file), "--out", str(out),
                                  "--eval-fraction", "0.15", "--steps", "30", "--batch-size", "8", "--lr", "1e-3",
                                  "--warmup-steps", "5", "--eval-every", "15", "--save-every", "0", "--kl-prompts", "16",
                                  "--kl-max-new-tokens", "16"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 1: policy = reference
    evals = [l for l in lines if "eval/loss" in l]
    meta = json.loads((out / "tether.json").read_text())
    m = meta["metrics"]
    assert meta["stage"] == "dpo" and len(evals) == 2
    assert m["eval/reward_accuracy"] > 0.9 and m["eval/reward_margin"] > 0.5 and m["eval/loss"] < math.log(2) - 0.3
    assert evals[1]["eval/reward_margin"] > evals[0]["eval/reward_margin"] > 0
    # the KL to the reference at every evaluation, so a trend exists (issue 20): it grows as the policy moves
    assert all("eval/kl" in e for e in evals) and evals[1]["eval/kl"] > evals[0]["eval/kl"]
    assert m["eval/kl"] == evals[-1]["eval/kl"]
    assert {"eval/logp_chosen", "eval/logp_rejected", "eval/reward_chosen", "eval/reward_rejected",
            "train/reward_accuracy", "eval/kl"} <= set(m)
    trained = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_folder)
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, base.state_dict()[n])]
    assert len(changed) > 0.9 * len(list(trained.parameters()))


@pytest.mark.slow
@pytest.mark.parametrize("loss", [*DPO_LOSSES, "cdpo"])
def test_every_loss_runs_a_step(tmp_path, tiny_folder, small_pairs_file, loss):
    extra = {"loss": "sigmoid", "label_smoothing": 0.1} if loss == "cdpo" else {"loss": loss}
    cfg = _cfg(tiny_folder, small_pairs_file, tmp_path / loss, **extra)
    cfg.train.steps = 1
    m = json.loads((run_dpo(cfg) / "tether.json").read_text())["metrics"]
    assert math.isfinite(m["train/loss"]) and math.isfinite(m["eval/loss"]) and math.isfinite(m["eval/kl"])


@pytest.mark.slow
def test_kto_raises_desirable_log_ratios_above_undesirable(tmp_path, tiny_folder, pairs_file):
    out = tmp_path / "kto"
    r = CliRunner().invoke(main, ["kto", "--model", str(tiny_folder), "--data", str(pairs_file), "--out", str(out),
                                  "--eval-fraction", "0.15", "--steps", "30", "--batch-size", "8", "--lr", "1e-3",
                                  "--warmup-steps", "5", "--eval-every", "0", "--save-every", "0", "--kl-prompts", "8",
                                  "--kl-max-new-tokens", "8", "--undesirable-weight", "1.5"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "tether.json").read_text())
    m = meta["metrics"]
    assert meta["stage"] == "kto" and meta["data"]["train"]["records"] == 2 * 144 - meta["data"]["eval"]["records"]
    assert m["eval/reward_margin"] > 0.1 and m["eval/reward_desirable"] > m["eval/reward_undesirable"]
    assert m["eval/kl_ref_point"] >= 0 and "train/kl_ref_point" in m and "eval/kl" in m
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train/kl_ref_point"] == pytest.approx(0.0, abs=1e-5)  # step 1: policy = reference


@pytest.mark.slow
def test_resume_from_a_checkpoint_ends_with_the_same_weights(tmp_path, tiny_folder, small_pairs_file):
    cfg = _cfg(tiny_folder, small_pairs_file, tmp_path / "run", kl_prompts=0)
    cfg.train.steps, cfg.train.save_every, cfg.train.keep_checkpoints = 3, 1, 3
    whole = load_file(str(run_dpo(cfg) / "model.safetensors"))
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000003")  # as if killed after step 2
    cfg.resume, cfg.overwrite = True, False
    resumed = load_file(str(run_dpo(cfg) / "model.safetensors"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.slow
def test_lora_dpo_uses_the_adapter_free_model_as_reference_and_saves_merged(tmp_path, tiny_folder, small_pairs_file):
    cfg = _cfg(tiny_folder, small_pairs_file, tmp_path / "lora")
    cfg.lora.r, cfg.train.lr = 4, 1e-2
    out = run_dpo(cfg)
    m = json.loads((out / "tether.json").read_text())["metrics"]
    assert math.isfinite(m["eval/kl"]) and (out / "adapter").is_dir()
    AutoModelForCausalLM.from_pretrained(out)


# --- judging policies: win-rate under a judge, and on-policy preference pairs --------------


def test_policy_win_rate_against_itself_is_a_half_and_a_judge_decides_the_rest(tiny_folder):
    from tether.instruments.winrate import policy_win_rate

    model, tokenizer = load_model(tiny_folder), load_tokenizer(tiny_folder)
    prompts = [format_prompt(f"What is {a} plus 1?") for a in range(5)]
    # the same policy with the same seeds gives the same samples: every comparison ties, so ½ exactly
    same = policy_win_rate(model, model, tokenizer, prompts, lambda p, r: [len(x) for x in r], samples=3,
                           max_new_tokens=8)
    assert same.rate == 0.5 and same.ties == same.comparisons == 15 and same.interval == (0.5, 0.5)
    # another policy (other weights): a judge that scores by length counts wins and losses by hand
    other = load_model(tiny_folder)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    judge = lambda p, r: [float(len(x)) for x in r]  # noqa: E731
    res = policy_win_rate(other, model, tokenizer, prompts, judge, samples=2, max_new_tokens=8, seed=3)
    from tether.rollout import generate

    repeated = [p for p in prompts for _ in range(2)]
    la = [len(x) for x in generate(other, tokenizer, repeated, max_new_tokens=8, seed=3)]
    lb = [len(x) for x in generate(model, tokenizer, repeated, max_new_tokens=8, seed=3)]
    wins, ties = sum(a > b for a, b in zip(la, lb)), sum(a == b for a, b in zip(la, lb))
    assert (res.wins, res.ties, res.losses) == (wins, ties, 10 - wins - ties)
    assert res.rate == pytest.approx((wins + 0.5 * ties) / 10) and res.mean_a == pytest.approx(sum(la) / 10)
    assert res.interval[0] <= res.rate <= res.interval[1]
    with pytest.raises(ValueError):
        policy_win_rate(model, model, tokenizer, [], judge)


def test_policy_preferences_pair_a_policys_own_samples_and_label_them_with_the_rater(tiny_folder):
    from tether.world import Rater
    from tether.world.sampled import policy_preferences

    model, tokenizer = load_model(tiny_folder), load_tokenizer(tiny_folder)
    rows = [{"prompt": format_prompt(f"What is {a} plus 2?"), "family": "arithmetic"} for a in range(6)]
    prefs = policy_preferences(model, tokenizer, rows, Rater(tau=1e-3), samples=4, max_new_tokens=8)
    assert 0 < len(prefs) <= 12
    for p in prefs:
        assert p["chosen"] != p["rejected"] and p["chosen"].strip() and p["rejected"].strip()
        assert p["family"] == "arithmetic" and p["prompt"] in {r["prompt"] for r in rows}
        # τ → 0: the rater follows the gold reward wherever it separates the two
        assert p["gold_chosen"] >= p["gold_rejected"]
    assert len(load_preferences(prefs)) == len(prefs)  # valid preference data for every stage
    with pytest.raises(ValueError, match="even"):
        policy_preferences(model, tokenizer, rows, Rater(), samples=3)


def test_kl_prompts_leave_room_for_a_whole_sample(tiny_folder):
    from tether.instruments.kl import kl_prompt_set

    tokenizer = load_tokenizer(tiny_folder)
    short = [format_prompt(f"What is {a} plus 1?") for a in range(4)]
    long = format_prompt(" ".join(f"What is {a} plus {a}?" for a in range(12)))
    records = load_preferences([{"prompt": p, "chosen": " a", "rejected": " b"} for p in [long, short[0], *short]])
    max_len = len(tokenizer(long).input_ids) + 8
    # the long prompt leaves 8 < 16 tokens; duplicates count once; at most n
    assert kl_prompt_set(records, tokenizer, 3, max_len, 16) == short[:3]
    assert kl_prompt_set(records, tokenizer, 10, max_len, 8) == [long, *short]
