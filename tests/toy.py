"""What the tests share besides fixtures (those are in conftest.py): a toy reward a freshly initialised tiny
model can climb, arithmetic prompts, preference rows, and a toy regression for the training loop."""

from __future__ import annotations

import torch


def digits(prompts, responses) -> list[float]:
    """A dense toy reward: the share of the response's characters that are digits."""
    return [sum(c.isdigit() for c in r) / max(len(r), 1) for r in responses]


def digits_failing_at(call: int, error: Exception):
    """``digits``, except that its ``call``-th call raises ``error``: a run killed while scoring that iteration."""
    calls = []

    def reward(prompts, responses) -> list[float]:
        calls.append(1)
        if len(calls) == call:
            raise error
        return digits(prompts, responses)

    return reward


PROMPTS = [f"\n\nHuman: What is {a} plus {b}?\n\nAssistant:" for a in range(4) for b in range(4)]


def pref_rows(n: int | None = None) -> list[dict]:
    """Arithmetic preference rows: the right sum chosen, a wrong one (and doubt) rejected."""
    from tether.world import format_prompt

    rows = []
    for a in range(12):
        for b in range(12):
            right, wrong = a + b, a + b + 1 + (a % 3)
            rows.append({"prompt": format_prompt(f"What is {a} plus {b}?"), "chosen": f" {a} plus {b} is {right}. #### {right}",
                         "rejected": f" {a} plus {b} is {wrong}. I am not sure."})
    return rows[:n] if n else rows


# --- a toy regression for the training loop -------------------------------------------------

X = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
Y = X @ torch.arange(8.0) + 0.1 * torch.randn(64, generator=torch.Generator().manual_seed(1))


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1))


def collate(idx):
    return {"x": X[idx], "y": Y[idx]}


def mse(model, batch):
    """The squared error summed over the micro-batch's rows (the loop divides by the step's rows)."""
    return {"rows": ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).sum()}, {}


def loop_cfg(**kw):
    from tether.loop import TrainConfig

    base = dict(steps=8, batch_size=8, lr=1e-2, warmup_steps=2, eval_every=0, save_every=3, device="cpu")
    return TrainConfig(**{**base, **kw})


class FakeRun:
    """Stands in for tether.loop.Run in an update: keeps the gradient of each optimiser step, then steps
    ``optimizer`` (when given) and clears the gradients."""

    def __init__(self, model, optimizer=None):
        self.model, self.optimizer, self.grads = model, optimizer, []

    def optimizer_step(self, confirm=True, first=True):
        self.grads.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in self.model.parameters()])
        if self.optimizer is not None:
            self.optimizer.step()
        self.model.zero_grad(set_to_none=True)
        return 0.0
