"""Stage 2: a Bradley–Terry reward model. L = −E[log σ(R(x, y_w) − R(x, y_l) − m)] (+ centring).

The backbone comes from an SFT folder (or any Hugging Face model) with a new scalar head read at
the last non-pad token. Chosen and rejected go through one forward pass (2B rows). After
training, rewards are normalised so that SFT samples on the training prompts score mean 0 and
standard deviation 1 (Ziegler et al. 2019), and the RM is evaluated on held-out pairs
(tether.instruments.rm_eval). ``--ensemble K`` trains K members that differ by seed (and, with
``--bootstrap``, by a resample of the pairs) into ``out/member-k``; ``tether.rewards`` serves them
as one reward with mean, min or uwo aggregation (Coste et al. 2023).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tether.config import check, group, opt, to_dict
from tether.data import DataError, chat_tokenizer, fingerprint, load_preferences, split_eval
from tether.data.collate import OVERFLOW_CHOICES, EncodedPair, encode_pairs, nothing_left, pad_pairs, prompt_ids
from tether.instruments.rm_eval import rm_report
from tether import distributed
from tether.distributed import map_rows
from tether.errors import ConfigError
from tether.io import write_json
from tether.loop import TrainConfig, train
from tether.losses import bradley_terry_loss, reward_centering
from tether.models import load_model, load_tokenizer
from tether.models.reward import load_reward_model, mark_trained, raw_scores, set_normalisation
from tether.rewards import AGGREGATIONS
from tether.trainers.artifact import check_output, data_info, finish_output, prepare_output, versions, write_artifact

log = logging.getLogger("tether.rm")


def _rm_defaults() -> TrainConfig:
    return TrainConfig(steps=300, batch_size=16, lr=1e-4, warmup_steps=20, eval_every=100, save_every=100)


@dataclass
class RMConfig:
    model: str = opt("", "backbone: an SFT folder, a local path or a hub name")
    data: str = opt("", "preference data (prompt/chosen/rejected, HH-style transcripts, or conversations)")
    eval_data: str = opt("", "held-out preference data (empty: hold out eval_fraction of data)")
    eval_fraction: float = opt(0.1, "fraction of pairs held out when eval_data is empty")
    out: str = opt("runs/rm", "output folder")
    max_len: int = opt(256, "longest prompt + response in tokens")
    skip_invalid: bool = opt(False, "skip (and count) invalid records instead of stopping at the first")
    chat_template: bool = opt(True, "render records with the model's chat template when it has one (HH-RLHF "
                                    "transcripts become its turns); --no-chat-template: strings as given")
    overflow: str = opt("truncate", "longer pairs: truncate | drop | error (always counted in the log)")
    margin_field: str = opt("", "column holding a per-pair margin m (empty: no margin)")
    label_field: str = opt("", "column holding a soft label P(chosen ≻ rejected) in [0, 1], e.g. label_prob of "
                               "`tether rlaif label` (empty: hard labels)")
    center_coef: float = opt(0.0, "reward-centring regulariser η·E[(r_w + r_l)²] (Eisenstein et al. 2023)")
    norm_prompts: int = opt(128, "training prompts sampled from the SFT policy to normalise rewards (0: no normalisation)")
    norm_max_new_tokens: int = opt(64, "longest SFT sample for normalisation")
    ensemble: int = opt(1, "members of an ensemble (1: a single reward model)")
    bootstrap: bool = opt(False, "train each ensemble member on a bootstrap resample of the pairs")
    aggregation: str = opt("mean", "how an ensemble combines its members by default: mean | min | uwo")
    resume: bool = opt(False, "continue from the latest checkpoint in out")
    overwrite: bool = opt(False, "replace the run tether wrote in out, once the new one is complete")
    train: TrainConfig = group(_rm_defaults)

    def validate(self) -> None:
        if not self.model or not self.data:
            raise ConfigError("--model and --data are required")
        if self.overflow not in OVERFLOW_CHOICES:
            raise ConfigError(f"overflow must be one of {OVERFLOW_CHOICES}, got {self.overflow!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        check("eval_fraction", self.eval_fraction, ge=0, lt=1)
        check("max_len", self.max_len, ge=2, integer=True)
        check("center_coef", self.center_coef, ge=0)
        check("norm_prompts", self.norm_prompts, ge=0, integer=True, note="0: no normalisation")
        check("norm_max_new_tokens", self.norm_max_new_tokens, ge=1, integer=True)
        if self.norm_prompts and self.norm_max_new_tokens >= self.max_len:
            raise ConfigError(f"--norm-max-new-tokens ({self.norm_max_new_tokens}) must be below --max-len "
                              f"({self.max_len}): each normalisation sample follows its prompt within max_len")
        check("ensemble", self.ensemble, ge=1, integer=True)
        self.train.validate()


def nonempty_responses(records: list, skip: bool, end_of_turn: str | None = None) -> list:
    """A reward model cannot learn from an empty response: an error, or a counted skip with ``skip``.

    A response rendered by a chat template that holds nothing but its ``end_of_turn`` (the EOS
    text, e.g. "<|im_end|>\\n") is empty too. (HH-RLHF's published test set has four pairs whose
    chosen reply is a lone space.)
    """
    def text(response: str) -> str:
        return (response.replace(end_of_turn, "") if end_of_turn else response).strip()

    kept = []
    for rec in records:
        empty = next((side for side in ("chosen", "rejected") if not text(getattr(rec, side))), None)
        if empty is None:
            kept.append(rec)
        elif not skip:
            source, _, line = rec.where.rpartition(":")
            raise DataError(source, line, empty, "empty response: a reward model needs text to score "
                            "(pass --skip-invalid to skip and count such pairs)")
    if len(kept) < len(records):
        log.warning("skipped %d pair(s) with an empty response", len(records) - len(kept))
    return kept


def pair_scores(model, pairs: list[EncodedPair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw rewards of chosen and rejected, one forward pass a batch. Shape: (2B, T) -> (B,), (B,)."""
    batch = pad_pairs(pairs, pad_id)
    device = next(model.parameters()).device
    r = raw_scores(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                   batch["prompt_lengths"].tolist())  # (2B,)
    return r[: len(pairs)], r[len(pairs) :]


@torch.no_grad()
def evaluate_rm(model, pairs: list[EncodedPair], records: list, pad_id: int, batch_size: int = 32) -> dict[str, float]:
    """rm_report on held-out pairs; gold metrics when the records carry gold_chosen / gold_rejected.

    Under torchrun each rank scores its block of pairs and the scores are gathered.
    """
    def score(part: list[EncodedPair]) -> torch.Tensor:  # (k, 2): chosen and rejected rewards
        out = [torch.stack(pair_scores(model, part[i : i + batch_size], pad_id), -1) for i in range(0, len(part), batch_size)]
        return torch.cat(out).cpu()

    both = map_rows(score, pairs)  # (N, 2)
    rc, rr = both[:, 0].contiguous(), both[:, 1].contiguous()
    gold = [r.extra for r in records]
    has_gold = all("gold_chosen" in g and "gold_rejected" in g for g in gold)
    return rm_report(
        rc, rr, [len(p.chosen) - p.prompt_len for p in pairs], [len(p.rejected) - p.prompt_len for p in pairs],
        [g["gold_chosen"] for g in gold] if has_gold else None, [g["gold_rejected"] for g in gold] if has_gold else None,
    )


def normalisation_prompts(prompts: list[str], tokenizer, cfg: RMConfig) -> list[str]:
    """The first ``norm_prompts`` training prompts that leave room for a whole SFT sample.

    A sample is scored on prompt + response cut to ``max_len`` tokens, so a prompt longer than
    ``max_len − norm_max_new_tokens`` would be scored on a cut-off response (or on the prompt
    alone): such prompts are passed over, and counted in the log.
    """
    if not cfg.norm_prompts:
        return []
    room = cfg.max_len - cfg.norm_max_new_tokens
    fits = [p for p in prompts if len(prompt_ids(tokenizer, p)) <= room]
    if not fits:
        raise ValueError(f"no training prompt is short enough to normalise on: each needs at most max_len − "
                         f"norm_max_new_tokens = {room} tokens (raise --max-len, lower --norm-max-new-tokens, "
                         f"or pass --norm-prompts 0)")
    if len(fits) < len(prompts):
        log.info("normalisation: %d of %d training prompts are longer than %d tokens and are passed over",
                 len(prompts) - len(fits), len(prompts), room)
    return fits[: cfg.norm_prompts]


def normalise_on_sft_samples(rm, cfg: RMConfig, tokenizer, prompts: list[str]) -> dict[str, float]:
    """Sample the SFT policy on training prompts, then store gain and bias in the RM."""
    from tether.rewards import LearnedReward
    from tether.rollout import generate

    policy = load_model(cfg.model, device=next(rm.parameters()).device)
    responses = generate(policy, tokenizer, prompts, max_new_tokens=cfg.norm_max_new_tokens, seed=cfg.train.seed)
    raw = LearnedReward(rm, tokenizer, normalise=False, max_len=cfg.max_len)(prompts, responses)
    gain, bias = set_normalisation(rm, raw)
    return {"rm/norm_gain": gain, "rm/norm_bias": bias}


def train_one(cfg: RMConfig, tokenizer, pairs: list[EncodedPair], eval_pairs: list[EncodedPair], eval_records: list,
              prompts: list[str], out: Path, model=None) -> tuple[dict[str, float], torch.nn.Module]:
    """Train, normalise (on SFT samples of ``prompts``; none: no normalisation) and evaluate one reward
    model (checkpoints in ``out``; ``model``: one already loaded from ``cfg.model``); returns metrics and model."""
    if model is None:  # with --resume the checkpoint then restores its weights
        model = load_reward_model(cfg.model, tokenizer)
    pad_id = tokenizer.pad_token_id

    def collate(idx: list[int]) -> dict:
        batch = pad_pairs([pairs[i] for i in idx], pad_id)
        batch["margin"] = torch.tensor([pairs[i].margin for i in idx])
        if cfg.label_field:
            batch["target"] = torch.tensor([pairs[i].label for i in idx])
        return batch

    def loss_fn(m, batch):
        r = raw_scores(m, batch["input_ids"], batch["attention_mask"], batch["prompt_lengths"].tolist())  # (2B,)
        r_w, r_l = r.chunk(2)
        bt = bradley_terry_loss(r_w, r_l, batch["margin"], batch.get("target"))
        total = bt.losses.sum()  # over pairs (the step divides by all of them); centring is a mean over pairs too
        if cfg.center_coef:
            total = total + cfg.center_coef * reward_centering(r_w, r_l) * len(r_w)
        return {"pairs": total}, {"accuracy": bt.accuracy.item(), "margin": (r_w - r_l).mean().item(),
                      "tokens": float(batch["attention_mask"].sum())}

    def eval_fn(m) -> dict[str, float]:
        return {f"eval/{k}": v for k, v in evaluate_rm(m, eval_pairs, eval_records, pad_id, cfg.train.score_rows()).items()}

    result = train(model, len(pairs), collate, loss_fn, cfg.train, out, count=lambda b: {"pairs": len(b["input_ids"]) / 2},
                   lengths=[p.width for p in pairs],
                   eval_fn=eval_fn if eval_pairs else None,
                   resume=cfg.resume, desc=f"rm {out.name}", run_config=to_dict(cfg))
    model.eval()
    mark_trained(model)  # saved in config.json: the head is trained, normalised or not
    metrics = {**result.train, **result.eval, "time/seconds": result.seconds}  # eval on the raw (trained) scale
    if prompts:
        metrics.update(normalise_on_sft_samples(model, cfg, tokenizer, prompts))
    return metrics, model


def run_rm(cfg: RMConfig) -> Path:
    """Train a reward model (or an ensemble) on ``cfg.data``; returns the output folder."""
    cfg.validate()
    torch.manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    chat = chat_tokenizer(tokenizer, cfg)

    def pairs_of(source: str) -> list:
        records = load_preferences(source, tokenizer=chat, skip_invalid=cfg.skip_invalid)
        return nonempty_responses(records, cfg.skip_invalid, tokenizer.eos_token if chat else None)

    records = pairs_of(cfg.data)
    if cfg.eval_data:
        eval_records = pairs_of(cfg.eval_data)
        train_records = records
    else:
        train_records, eval_records = split_eval(records, cfg.eval_fraction, cfg.train.seed)
    pairs, overflow = encode_pairs(train_records, tokenizer, cfg.max_len, cfg.overflow, cfg.margin_field,
                                   cfg.label_field)
    eval_pairs, _ = encode_pairs(eval_records, tokenizer, cfg.max_len, "truncate")
    if not pairs:
        raise nothing_left(cfg.data, "pairs", len(train_records), overflow, cfg.max_len, cfg.overflow,
                           held_out=0 if cfg.eval_data else len(eval_records))
    prompts = list(dict.fromkeys(r.prompt for r in train_records))
    random.Random(cfg.train.seed).shuffle(prompts)
    prompts = normalisation_prompts(prompts, tokenizer, cfg)  # checked before anything is written

    check_output(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite)
    first = load_reward_model(cfg.model, tokenizer)  # member 0's: a bad --model fails before anything is written
    out = prepare_output(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite)
    data = {"train": data_info(cfg.data, train_records, fingerprint(train_records))}
    if eval_records:
        data["eval"] = data_info(cfg.eval_data or f"{cfg.data} (held out)", eval_records, fingerprint(eval_records))
    if cfg.ensemble == 1:
        metrics, model = train_one(cfg, tokenizer, pairs, eval_pairs, eval_records, prompts, out, first)
        metrics.update({"data/truncated": overflow.truncated, "data/dropped": overflow.dropped})
        return write_artifact(out, stage="rm", cfg=cfg, model=model, tokenizer=tokenizer, data=data, metrics=metrics)

    if distributed.env().main:  # present again only once every member is complete
        (out / "tether.json").unlink(missing_ok=True)
    members, all_metrics = [], {}
    for k in range(cfg.ensemble):
        member_cfg = replace(cfg, train=replace(cfg.train, seed=cfg.train.seed + k))
        idx = list(range(len(pairs)))
        if cfg.bootstrap:
            rng = random.Random(cfg.train.seed + 1000 + k)
            idx = [rng.randrange(len(pairs)) for _ in pairs]
        folder = out / f"member-{k}"
        metrics, model = train_one(member_cfg, tokenizer, [pairs[i] for i in idx], eval_pairs, eval_records,
                                   prompts, folder, first if k == 0 else None)
        write_artifact(folder, stage="rm", cfg=member_cfg, model=model, tokenizer=tokenizer, data=data, metrics=metrics,
                       finish=False)
        members.append(folder.name)
        all_metrics[folder.name] = metrics
    ensemble_metrics = evaluate_ensemble([out / m for m in members], eval_records) if eval_records else {}
    if distributed.env().main:
        write_json(out / "tether.json", {"stage": "rm-ensemble", "members": members, "config": to_dict(cfg), "data": data,
                                         "metrics": {**ensemble_metrics, "members": all_metrics},
                                         "versions": versions()})
    return finish_output(out)


def evaluate_ensemble(folders: list[Path], records: list) -> dict[str, float]:
    """Held-out accuracy of the ensemble under each aggregation, with normalised member rewards."""
    from tether.instruments.rm_eval import accuracy
    from tether.rewards import EnsembleReward, LearnedReward

    ensemble = EnsembleReward([LearnedReward.from_folder(f) for f in folders])
    prompts = [r.prompt for r in records]
    chosen = ensemble.member_scores(prompts, [r.chosen for r in records])  # (K, N)
    rejected = ensemble.member_scores(prompts, [r.rejected for r in records])
    from tether.rewards import aggregate

    return {f"eval/ensemble_{how}_accuracy": accuracy(aggregate(chosen, how), aggregate(rejected, how))
            for how in AGGREGATIONS}
