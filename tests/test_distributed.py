"""Past one machine: the stages at world size 2 (torchrun, gloo, 2 CPU processes) against world size 1.

One torchrun job runs SFT (DDP and FSDP2, through the command line), the reward model (DDP), DPO
(DDP and FSDP2), KTO (FSDP2), GRPO (DDP, FSDP2, FSDP2 with LoRA), RLOO and PPO (DDP and FSDP2; PPO-ptx) at world
size 2 on the same global batches as the world-size-1 runs in this process (tests/distributed_runner.py;
at world size 1 the strategy changes nothing, so each FSDP2 run is compared with its DDP twin's). Loss
curves must agree to a relative 1e-5 (what is left is the order of floating-point sums across ranks:
about 1e-7 to 1e-6 here), and checkpoints must move: written at world size 2 (whole-model for DDP,
torch.distributed.checkpoint for FSDP2) they resume at world size 1, and under the other strategy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tether import distributed
from tether.generation import make_backend

from tests import distributed_runner
from tests.conftest import CORPUS

RTOL = 1e-5
STAGES = ["sft_ddp", "sft_fsdp2", "rm_ddp", "dpo_ddp", "dpo_fsdp2", "kto_fsdp2", "grpo_ddp", "grpo_fsdp2",
          "grpo_lora_fsdp2", "rloo_ddp", "rloo_fsdp2", "ppo_ddp", "ppo_fsdp2", "ppo_ptx_ddp"]
# world size 2 only: a split batch, and checkpoints resumed under the other strategy (after the runs they cut)
ONLY_W2 = ["sft_split_ddp", "sft_ddp_to_fsdp2", "sft_fsdp2_to_ddp", "ppo_ddp_to_fsdp2", "ppo_fsdp2_to_ddp"]
COMPARED = ("train/loss", "train/grad_norm", "eval/loss", "eval/accuracy", "eval/reward", "eval/reward_margin",
            "eval/kl", "reward/mean", "kl/k1", "kl/beta", "loss/policy", "loss/value", "policy/clip_fraction",
            "policy/approx_kl", "loss/ptx")


def w1_twin(stage: str) -> str:
    """The world-size-1 run a world-size-2 ``stage`` is compared with (the strategy matters only under torchrun)."""
    return stage.split("_to_")[0].replace("fsdp2", "ddp")


def _write_data(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "sft.jsonl", "w") as f:
        for i, text in enumerate(CORPUS[:40]):  # completions of unequal length: a split micro-batch weighs by tokens
            prompt, completion = text.split("\n\nAssistant:")
            completion += f" {i} plus {i} is {2 * i}." * (i % 4)
            f.write(json.dumps({"prompt": prompt + "\n\nAssistant:", "completion": completion}) + "\n")
    question = "\n\nHuman: What is {} plus {}?\n\nAssistant:"
    with open(folder / "prefs.jsonl", "w") as f:
        for a in range(6):
            for b in range(5):
                f.write(json.dumps({"prompt": question.format(a, b), "chosen": f" {a} plus {b} is {a + b}. #### {a + b}",
                                    "rejected": f" It is {a + b + 3}."}) + "\n")
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": question.format(a, b)}) + "\n"
                                                  for a in range(4) for b in range(2)))
    (folder / "eval_prompts.jsonl").write_text("".join(json.dumps({"prompt": question.format(a, b)}) + "\n"
                                                       for a in range(2) for b in range(7, 9)))


@pytest.fixture(scope="module")
def runs(tiny_folder, tmp_path_factory):
    """(world-size-1 folder, world-size-2 folder, data folder), every stage run in both."""
    root = tmp_path_factory.mktemp("dist")
    data = root / "data"
    _write_data(data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TETHER_CACHE": str(root / "cache2"), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(distributed_runner.__file__)), str(tiny_folder), str(data), str(root / "w2"), *STAGES, *ONLY_W2]
    # stdout apart from stderr: the ranks' progress bars (stderr) would otherwise break the result lines
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    saved = os.environ.get("TETHER_CACHE")
    os.environ["TETHER_CACHE"] = str(root / "cache1")  # its own cache: the DPO reference is computed in both
    try:
        for stage in dict.fromkeys(w1_twin(s) for s in STAGES):  # meanwhile, world size 1 here
            distributed_runner.RUNS[stage](str(tiny_folder), data, root / "w1" / stage)
    finally:
        os.environ.pop("TETHER_CACHE") if saved is None else os.environ.__setitem__("TETHER_CACHE", saved)
    output, errors = job.communicate(timeout=600)
    assert job.returncode == 0, (output + errors)[-5000:]
    (root / "w2.log").write_text(output)
    return root / "w1", root / "w2", data


def _curves(folder: Path) -> dict[tuple[int, str], float]:
    rows = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], k): v for r in rows for k, v in r.items() if k in COMPARED}


@pytest.mark.slow
def test_a_command_under_torchrun_prints_its_result_once(runs):
    """Rank 0 alone speaks: each of the five SFT runs through the command line says where its model is once."""
    _, w2, _ = runs
    said = [line for line in (w2.parent / "w2.log").read_text().splitlines() if line.startswith("SFT model in ")]
    assert len(said) == 5 and len(set(said)) == 5


def _assert_same_weights(a: Path, b: Path) -> None:
    """Final weights equal up to the order of sums: Adam divides by √v, so an element whose gradient is ~0 can move
    by 1e-6 more on one side (weights are ~0.1, steps ~1e-3)."""
    final1, final2 = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert final1.keys() == final2.keys()
    for k in final1:
        assert torch.allclose(final1[k], final2[k], rtol=1e-4, atol=1e-5), k


def _assert_same_curves(a: Path, b: Path) -> None:
    ca, cb = _curves(a), _curves(b)
    assert ca.keys() == cb.keys() and len(ca) >= 4
    for key in ca:
        assert cb[key] == pytest.approx(ca[key], rel=RTOL, abs=1e-7), key


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_world_size_2_matches_world_size_1_at_the_same_global_batch(runs, stage):
    w1, w2, _ = runs
    one = w1 / w1_twin(stage)
    _assert_same_curves(one, w2 / stage)
    assert json.loads((w2 / stage / "tether.json").read_text())["world_size"] == 2
    # the final model is plain Hugging Face safetensors (LoRA merged), written once, equal to the single-process one
    _assert_same_weights(one, w2 / stage)
    final2 = load_file(str(w2 / stage / "model.safetensors"))
    initial = load_file(str(Path(json.loads((one / "tether.json").read_text())["config"]["model"])
                            / "model.safetensors"))
    moved = any(not torch.equal(initial[k], final2[k]) for k in initial if k in final2)
    assert moved or stage.startswith("rm")  # (an RM's head is new: its backbone keys are compared above)


@pytest.mark.slow
def test_sft_at_world_size_2_in_micro_batches_of_one_row_matches_one_process_in_one_batch(runs):
    """Rows of unequal length (tests/loop/test_accumulate.py splits them in one process): the step's loss is divided
    by its labelled tokens over every micro-batch and rank, so 4 x 1 rows on 2 ranks trains as 1 x 4 on one."""
    w1, w2, _ = runs
    _assert_same_curves(w1 / "sft_ddp", w2 / "sft_split_ddp")
    _assert_same_weights(w1 / "sft_ddp", w2 / "sft_split_ddp")


@pytest.mark.slow
def test_grpo_reward_and_kl_are_global_not_one_ranks(runs):
    """The logged reward is the mean over both ranks' groups: a rank alone would see half the prompts."""
    w1, w2, _ = runs
    rows = [json.loads(l) for l in (w2 / "grpo_ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all("reward/mean" in r and "kl/k1" in r for r in rows[1:])
    assert rows[-1]["kl/k1"] > 0  # the policy moved away from the reference


@pytest.mark.slow
def test_ppo_under_torchrun_writes_every_evaluation_sample_once(runs):
    """PPO's figures are those of the whole batch (compared above); every held-out sample is written once."""
    _, w2, data = runs
    rows = [json.loads(l) for l in (w2 / "ppo_ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["kl/beta"] != 0.05  # the adaptive controller moved β on the all-reduced KL
    assert any(r["policy/updates"] == 4 and r["loss/value"] > 0 for r in rows[1:])  # 2 epochs x 2 mini-batches
    samples = [json.loads(l) for l in (w2 / "ppo_ddp" / "samples.jsonl").read_text().splitlines()]
    eval_prompts = [json.loads(l)["prompt"] for l in (data / "eval_prompts.jsonl").read_text().splitlines()]
    for step in (0, 2, 3):  # evaluated every 2 iterations and at the end: 2 ranks, 4 prompts, each once
        assert sorted(s["prompt"] for s in samples if s["step"] == step) == sorted(eval_prompts)
    assert len(samples) == 3 * len(eval_prompts)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft_ddp", "sft_fsdp2"])
def test_a_checkpoint_saved_at_world_size_2_resumes_at_world_size_1(runs, stage, tmp_path):
    w1, w2, data = runs
    cut = tmp_path / stage
    shutil.copytree(w2 / stage, cut)
    shutil.rmtree(cut / "checkpoints" / "step-000004")  # as if the 2-process run died after step 2
    expected_format = "dcp" if stage.endswith("fsdp2") else "model.safetensors"
    assert (cut / "checkpoints" / "step-000002" / expected_format).exists()
    model = Path(json.loads((w1 / w1_twin(stage) / "tether.json").read_text())["config"]["model"])
    distributed_runner.sft(str(model), data, cut, stage.split("_")[1], resume=True)
    _assert_same_curves(w1 / w1_twin(stage), cut)  # steps 3 and 4 now run in one process
    _assert_same_weights(w1 / w1_twin(stage), cut)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft_ddp_to_fsdp2", "sft_fsdp2_to_ddp", "ppo_ddp_to_fsdp2", "ppo_fsdp2_to_ddp"])
def test_a_checkpoint_moves_between_ddp_and_fsdp2(runs, stage):
    """A world-size-2 run cut back to its first checkpoint and resumed under the other strategy
    (tests/distributed_runner.resumed) ends as the uninterrupted run: the whole-model checkpoint is cut into
    shards (model and Adam state), the sharded one is read whole through torch.distributed.checkpoint."""
    w1, w2, _ = runs
    ckpts = sorted((w2 / stage / "checkpoints").glob("step-*"))
    written, resumed = ("model.safetensors", "dcp") if "_ddp_to_" in stage else ("dcp", "model.safetensors")
    assert (ckpts[0] / written).exists() and (ckpts[-1] / resumed).exists()  # the format changed on the way
    _assert_same_curves(w1 / w1_twin(stage), w2 / stage)
    _assert_same_weights(w1 / w1_twin(stage), w2 / stage)


# --- fast: the pieces, in one process ----------------------------------------------------------


def test_every_rank_gets_its_share_of_a_global_step_and_together_they_are_the_step():
    micro = [[0, 1, 2, 3], [4, 5, 6, 7]]
    # grad_accum a multiple of the world: whole micro-batches, so every loss sees the rows it sees in one process
    assert distributed.step_pieces(micro, 0, 2) == [[0, 1, 2, 3]]
    assert distributed.step_pieces(micro, 1, 2) == [[4, 5, 6, 7]]
    # otherwise every micro-batch is cut, one block a rank, and nothing is lost or repeated (a rank may get
    # nothing: it then runs a zero-weight pass so that the ranks stay in step, tether.loop.accumulate)
    parts = [distributed.step_pieces(micro, r, 3) for r in range(3)]
    assert parts == [[[0, 1], [4, 5]], [[2, 3], [6, 7]], []]
    assert distributed.step_pieces(micro, 0, 1) == micro


def test_a_micro_batch_smaller_than_the_world_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match="--batch-size of at least 4, or --grad-accum a multiple of 4"):
        distributed.check_batch(2, 1, 4)
    distributed.check_batch(2, 4, 4)  # whole micro-batches: fine


def test_world_size_one_makes_every_helper_the_identity():
    assert not distributed.env().active
    x = torch.arange(5.0)
    assert torch.equal(distributed.gather(x), x) and torch.equal(distributed.all_reduce(x), x)
    assert distributed.reduce_metrics({"a": 1.5}) == {"a": 1.5}
    assert torch.equal(distributed.map_rows(lambda rows: torch.tensor(rows) * 2, [1, 2, 3]), torch.tensor([2, 4, 6]))
    assert distributed.shard_bounds(10, 1, 3) == (4, 8) and distributed.shard_bounds(10, 2, 3) == (8, 10)


def test_fsdp2_finds_the_decoder_blocks_of_a_hugging_face_model(tiny_folder):
    from tether.models import load_model

    blocks = distributed.decoder_blocks(load_model(tiny_folder))
    assert len(blocks) == 2 and {type(b).__name__ for b in blocks} == {"LlamaDecoderLayer"}
    with pytest.raises(ValueError, match="no decoder blocks.*--strategy ddp"):
        distributed.decoder_blocks(torch.nn.Linear(2, 2))


def test_whitening_with_a_total_is_whitening_of_the_whole_batch():
    """Two ranks holding the same half: summing each statistic over both equals whitening the whole."""
    from tether.losses import whiten

    half = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    whole = whiten(torch.cat([half, half]), torch.cat([mask, mask]))
    assert torch.allclose(whiten(half, mask, total=lambda t: 2 * t), whole[:3], atol=1e-6)
    assert not torch.allclose(whiten(half[:1], mask[:1]), whole[:1], atol=1e-3)  # one rank alone is not


def test_an_unknown_strategy_is_an_error():
    from tether.loop import TrainConfig

    with pytest.raises(ValueError, match="strategy must be one of"):
        TrainConfig(strategy="zero3").validate()


def test_the_default_generation_backend_is_tethers_sampler(tiny_folder):
    from tether.models import load_model, load_tokenizer
    from tether.rollout import sample

    model, tok = load_model(tiny_folder), load_tokenizer(tiny_folder)
    backend = make_backend("tether", model, tok)
    prompts = ["\n\nHuman: What is 1 plus 2?\n\nAssistant:"] * 3
    assert backend.sample(prompts, max_new_tokens=6, temperature=1.0, batch_size=2, seed=5) == \
        sample(model, tok, prompts, max_new_tokens=6, temperature=1.0, batch_size=2, seed=5)


def test_a_chunk_sample_does_not_depend_on_which_rank_generates_it(tiny_folder):
    """With index_offset, the rows [2, 4) sampled alone equal those rows of the whole batch."""
    from tether.models import load_model, load_tokenizer
    from tether.rollout import sample

    model, tok = load_model(tiny_folder), load_tokenizer(tiny_folder)
    prompts = [f"\n\nHuman: What is {a} plus 1?\n\nAssistant:" for a in range(4)]
    whole = sample(model, tok, prompts, max_new_tokens=8, batch_size=2, seed=3, index_offset=0)
    second = sample(model, tok, prompts[2:], max_new_tokens=8, batch_size=2, seed=3, index_offset=2)
    assert whole[2:] == second and whole[:2] != whole[2:]


def test_asking_for_vllm_without_it_names_the_extra(tiny_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if it were not installed (it is not, here)
    with pytest.raises(ImportError, match=r"pip install 'tether\[vllm\]'"):
        make_backend("vllm", torch.nn.Linear(1, 1), None, model_path=str(tiny_folder))
    with pytest.raises(ValueError, match="backend must be one of"):
        make_backend("sglang", torch.nn.Linear(1, 1), None)


def test_python_dash_m_tether_is_the_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tether", "sft", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--strategy" in out.stdout


def test_another_strategy_or_device_on_resume_is_not_a_change_of_what_is_learnt(tmp_path):
    """A run moves between DDP and FSDP2 (and devices) on --resume without --allow-resume-changes; a seed does not."""
    from tether.errors import ConfigError
    from tether.loop.checkpoints import resume_changes

    saved = {"train": {"strategy": "ddp", "device": "cuda", "seed": 0}}
    assert resume_changes(tmp_path, saved, {"train": {"strategy": "fsdp2", "device": "cpu", "seed": 0}}, False) == set()
    with pytest.raises(ConfigError, match="--seed 0 → 1"):
        resume_changes(tmp_path, saved, {"train": {"strategy": "fsdp2", "device": "cpu", "seed": 1}}, False)


def test_fsdp2_shards_an_actor_critics_policy_and_critic_as_units_of_their_own(tiny_folder):
    """PPO-ptx calls the policy alone, outside the root's forward: it must be a sharded unit of its own."""
    from tether.models import load_model
    from tether.models.value import ActorCritic, ValueModel

    policy = load_model(tiny_folder)
    ac = ActorCritic(policy, ValueModel(policy.model))
    blocks = distributed.decoder_blocks(ac)
    assert distributed._units_between(ac, blocks) == [ac.policy, ac.critic]
    assert distributed._units_between(policy, distributed.decoder_blocks(policy)) == []  # a HF model: blocks, root


def test_asking_for_the_world_joins_nothing_before_a_stage_chose_its_device(monkeypatch):
    """A config check reads the world size before the stage's --device is known: joining then would pick the
    default device's backend (nccl on a GPU machine, for a run asked to use the CPU)."""
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    e = distributed.env()
    assert (e.world_size, e.rank, e.main, e.active) == (2, 1, False, True)
    assert not dist.is_initialized()
