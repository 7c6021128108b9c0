"""The RL loop: PPO, GRPO and RLOO plug their rollout -> score -> update into it.

One iteration (``--steps`` counts iterations):

1. ``stage.rollout(it)``: this rank's share of the iteration's prompts, sampled from the current policy
   (prompts and seeds are functions of (seed, iteration), so a resumed run equals an uninterrupted one);
2. ``stage.score(batch)``: rewards, reference log-probs, advantages, without gradient. The checkpoint
   pending from the iteration before is written first, its weights having sampled soundly
   (tether.loop.checkpoints.Checkpoints); a non-finite score then stops the run and sets that
   checkpoint aside (``diverged-step-N``), its weights having failed;
3. ``stage.update(batch, scored, run)``: optimiser steps, each accumulated by sums and counts
   (tether.loop.accumulate) and taken through :meth:`Run.optimizer_step`;

then the schedule steps once (warm-up and decay count iterations), the stage reacts
(``after_update``: adaptive β, the generation backend's weights), the held-out evaluation runs when
due (:func:`evaluate_policy`: reward, KL to the reference, gold reward where the gold world knows
the prompts, length, every sample to ``samples.jsonl``), and the metrics and checkpoint are
written (the stage's ``state()`` travels in it). Step 0 of ``metrics.jsonl`` is the starting policy.

The policy runs in eval mode throughout (no dropout), in sampling, scoring and the update alike: the
log-probs of a sample are a function of the weights, so the ratio π/π_old is exactly 1 at the first
update of every iteration and the reference with LoRA adapters off is the base model exactly.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Protocol

import torch

from tether import distributed
from tether.errors import TetherError
from tether.loop.guards import TrainingDiverged
from tether.loop.pieces import TrainConfig, logged_until
from tether.loop.run import Run
from tether.rollout import SamplingConfig, rollout

log = logging.getLogger("tether.rl")


class RLStage(Protocol):
    """What an RL trainer gives the loop (trainers/ppo.py, grpo.py, rloo.py)."""

    name: str

    def rollout(self, iteration: int): ...

    def score(self, batch) -> tuple[object, dict[str, float], bool]:
        """(scored, metrics, finite): what the update needs, metrics of the rollout, whether all is finite."""

    def update(self, batch, scored, run: Run) -> dict[str, float]: ...

    def after_update(self, metrics: dict[str, float]) -> None: ...

    def load_state(self, extra: dict, start: int) -> None:
        """Take back what ``state()`` stored in the checkpoint resumed from (at iteration ``start``)."""

    def evaluate(self, step: int) -> dict[str, float]: ...

    def state(self) -> dict: ...


def train_rl(stage: RLStage, net: distributed.Trainable, cfg: TrainConfig, out: Path, *, resume: bool,
             run_config: dict, n_samples: int) -> dict[str, float]:
    """Run ``cfg.steps`` iterations of ``stage`` on ``net.module`` (what the optimiser holds: the policy, or
    policy and critic; DDP-wrapped or FSDP2-sharded under torchrun) and return the final metrics.
    ``net.plain`` (the whole model the stage samples and scores with) is synced from the shards after every
    update and after a resume (FSDP2: gather for generation), then checked finite. ``n_samples``: responses
    sampled per iteration (all ranks), for the throughput figure."""
    trained, model = net.module, net.plain
    run = Run(trained, cfg, out, resume=resume, run_config=run_config, desc=stage.name)
    if run.start:
        net.sync()  # the checkpoint went into the trained module
    stage.load_state(run.extra, run.start)
    t_start = time.perf_counter()
    try:
        if run.start == 0 and (first := stage.evaluate(0)):  # the starting point of every curve
            run.log.log(0, first)
        for it in range(run.start, cfg.steps):
            t0 = time.perf_counter()
            batch = stage.rollout(it)
            t1 = time.perf_counter()
            run.ckpts.confirm(trained, run.optimizer, run.scheduler)  # these weights (finite) just sampled soundly
            scored, metrics, finite = stage.score(batch)
            if not distributed.all_reduce(torch.tensor(float(finite)), "min").item():  # every rank stops together
                raise run.diverged("the policy's log-probabilities or values of its own samples are not finite",
                                   it + 1, failed=it)
            t2 = time.perf_counter()
            try:
                metrics.update(stage.update(batch, scored, run))
            except TrainingDiverged as err:  # before any step: the weights this iteration's checkpoint holds failed
                raise run.diverged(str(err), it + 1, failed=it if err.from_start else None) from None
            net.sync()
            run.check_weights(model, it + 1)
            metrics["train/lr"] = run.lr
            run.scheduler.step()
            stage.after_update(metrics)
            t3 = time.perf_counter()
            metrics.update({"time/rollout_s": t1 - t0, "time/score_s": t2 - t1, "time/update_s": t3 - t2,
                            "perf/samples_per_s": n_samples / (t3 - t0)})
            done = it + 1
            evaluated = stage.evaluate(done) if run.eval_due(done) else {}
            run.record(done, metrics, evaluated, extra=stage.state(), reward=f"{metrics['reward/mean']:.3f}",
                       **({"kl": f"{metrics['kl/k1']:.2f}"} if "kl/k1" in metrics else {}))
    finally:
        run.close()
    return {**run.train_metrics, **run.eval_metrics, "time/seconds": time.perf_counter() - t_start}


class NoLearningSignal(TetherError, RuntimeError):
    """Iteration after iteration, the rewards gave the update nothing to learn from (``--no-signal-stop``)."""


def no_signal(name: str, streak: int, limit: int, metrics: dict[str, float], what: str, max_new_tokens: int) -> None:
    """Warn at the third iteration in a row without a learning signal, stop at the ``limit``-th (0: never),
    saying what the samples looked like: ``what`` (why there was no signal), how many ended, their length and
    every reward term (a GRPO run once ran 45 minutes with every reward 0 and a zero gradient, silently)."""
    if not streak or not limit or streak not in (min(3, limit), limit):
        return
    why = (f"{what} (reward {metrics['reward/mean']:.3g} on average); {metrics['rollout/ended']:.0%} of the samples "
           f"ended (EOS or a stop string), {metrics['rollout/length']:.1f} tokens long on average (--max-new-tokens "
           f"{max_new_tokens})" + "".join(f"; {k} {v:.3g}" for k, v in metrics.items()
                                         if k.startswith("reward/") and k != "reward/mean"))
    if streak < limit:
        log.warning("%s: %d iterations in a row without a learning signal: %s", name.upper(), streak, why)
        return
    raise NoLearningSignal(f"{name.upper()}: {limit} iterations in a row carried no learning signal (--no-signal-stop "
                           f"{limit}): {why}; stopped. Read a few samples against the reward, raise --max-new-tokens "
                           "if they are cut short, or start from a policy that earns the reward some of the time")


# --- the held-out evaluation every RL stage logs ----------------------------------------------


def gold_known(prompts: list[str]) -> bool:
    """Whether the gold world can score these prompts (every one is one of its questions)."""
    from tether.world import parse_question, question_of

    return bool(prompts) and all(parse_question(question_of(p))[0] != "other" for p in prompts)


def gold_metric(batch) -> dict[str, float]:
    """``reward/gold``: the mean gold reward of a rollout's samples (for prompts the gold world knows)."""
    from tether.world import gold_rewards

    return {"reward/gold": sum(gold_rewards(batch.prompts, batch.responses)) / len(batch.prompts)}


def reward_terms(reward_fn, prompts: list[str], responses: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reward (N,) and, for a combined reward (tether.rewards.CombinedReward), each term's (N,)."""
    from tether.rewards import CombinedReward

    if isinstance(reward_fn, CombinedReward):
        return reward_fn.with_components(prompts, responses)
    return torch.as_tensor(reward_fn(prompts, responses), dtype=torch.float32), {}


def term_name(spec: str) -> str:
    return spec.split("(")[0]


def term_metrics(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """``reward/<term>``: each term of a combined reward (:func:`reward_terms`), averaged over every rank's samples."""
    return {f"reward/{term_name(k)}": distributed.gather(v.float()).mean().item() for k, v in terms.items()}


def clear_samples(out: Path, step: int) -> Path:
    """``out/samples.jsonl`` keeping only what a run resumed at ``step`` had written (nothing at step 0)."""
    path = out / "samples.jsonl"
    if path.exists() and distributed.env().main:
        path.write_text("".join(line + "\n" for line in logged_until(path, step)))
    return path


@torch.no_grad()
def evaluate_policy(policy, tokenizer, prompts: list[str], reward_fn, reference, sampling: SamplingConfig, *,
                    samples: int, seed: int, step: int, gold: bool, samples_path: Path | None,
                    precision: str = "fp32") -> dict[str, float]:
    """The policy on held-out prompts, ``samples`` responses each (plain temperature sampling, a fixed seed):

        eval/reward   mean reward (and eval/<term> for each term of a combined reward)
        eval/kl       mean Σ_t log π(y_t) − log π_ref(y_t) per response (k1; its mean is KL(π‖π_ref))
        eval/gold     mean gold reward, when the gold world knows every prompt
        eval/length   mean response length in tokens

    Each rank samples an equal block of the rows (seeded by global position) and the figures are
    gathered; every sample, with its scores, is appended to ``samples_path`` (rank 0).
    """
    from tether.scoring import response_logprobs

    e = distributed.env()
    repeated = [p for p in prompts for _ in range(samples)]
    n = len(repeated)
    per = -(-n // e.world_size)
    offset = e.rank * per  # chunks seeded by global position: the same samples at any world size
    mine = [repeated[min(i, n - 1)] for i in range(offset, offset + per)]  # copies past the end are dropped
    batch = rollout(policy, tokenizer, mine, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                    batch_size=sampling.gen_batch_size, seed=seed, index_offset=offset)
    rewards, terms = reward_terms(reward_fn, batch.prompts, batch.responses)
    columns = {"reward": rewards.float(), "length": batch.mask.sum(-1).float()}
    if reference is not None:
        logp = response_logprobs(policy, batch, sampling.temperature, batch_size=sampling.gen_batch_size,
                                 precision=precision)
        ref = reference.response_logprobs(batch, sampling.temperature, batch_size=sampling.gen_batch_size,
                                          precision=precision)
        columns["kl"] = ((logp - ref) * batch.mask).sum(-1).float().cpu()
    columns.update({term_name(k): v.float() for k, v in terms.items()})
    rows = [{"step": step, "prompt": p, "response": r, **{k: float(v[i]) for k, v in columns.items()}}
            for i, (p, r) in enumerate(zip(batch.prompts, batch.responses))]
    rows = distributed.gather_objects(rows)[:n]
    if gold:
        from tether.world import gold_rewards

        for row, g in zip(rows, gold_rewards([r["prompt"] for r in rows], [r["response"] for r in rows])):
            row["gold"] = g
    names = [k for k in rows[0] if k not in ("step", "prompt", "response")] if rows else []
    out = {f"eval/{k}": sum(r[k] for r in rows) / len(rows) for k in names}
    if e.main and samples_path is not None:
        with open(samples_path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return out
