"""How a run that goes wrong is stopped: the error, the rising-loss rule and the finite-weights check."""

from __future__ import annotations

import torch

from tether import distributed
from tether.errors import TetherError

class TrainingDiverged(TetherError, RuntimeError):
    """The loss, gradient or weights became NaN or infinite, or the loss blew up (:class:`LossGuard`);
    the last good checkpoint is left in place and the message names it.

    ``from_start`` (an RL update, raised inside it): whether it went wrong before the iteration's
    first optimiser step, that is with the very weights the iteration started from.
    """

    def __init__(self, message: str, from_start: bool = True):
        super().__init__(message)
        self.from_start = from_start


class LossGuard:
    """Stops a run whose loss blows up without ever becoming NaN (``--divergence-factor``).

    On the training loss L_t of each optimiser step (the mean over the whole global batch):

        S_t = 0.9 · S_{t-1} + 0.1 · L_t,   S_1 = L_1     smoothed: one odd batch moves it a tenth of the way
        B_t = min(S_1, ..., S_t)                         the running best
        scale_t = max(|B_t|, |S_1|)                      the loss's own size
        diverged  <=>  S_t - B_t > factor · scale_t

    Why this form. Losses may be negative (robust DPO, a custom loss) or tend to 0 (a fitted
    reward model, a DPO loss on its training pairs), so a ratio S_t / B_t means nothing and a rise
    measured against |B_t| alone would stop a run that has reached ~0 at its first noisy batch.
    The rise is therefore measured in units of the larger of the best and the starting size: a
    positive loss may wander up to ``factor`` starting losses above its best before the run stops.
    With the default 10 no healthy run comes near (an SFT loss starts near ln V and falls; the DPO
    family starts at ln 2, 1 or (1/2β)²), while a blow-up passes it at once (SFT at lr 1e3 goes
    5.7 -> 8e4 in one step; IPO at lr 1e2 goes 25 -> 5e8). What it cannot see is a collapse that
    climbs back no further than the starting loss (a DPO policy that forgets everything returns to
    ln 2): that is no blow-up of the loss, and the evaluation shows it. The state travels in every
    checkpoint, so a resumed run judges its loss as an uninterrupted one would.
    """

    ALPHA = 0.1

    def __init__(self, factor: float, state: dict | None = None):
        self.factor = factor
        self.smoothed: float | None = None
        self.best: float | None = None
        self.start: float | None = None
        keys = ("smoothed", "best", "start")
        if isinstance(state, dict) and all(isinstance(state.get(k), (int, float)) for k in keys):
            self.smoothed, self.best, self.start = (float(state[k]) for k in keys)  # else: judged afresh

    def state(self) -> dict:
        return {"smoothed": self.smoothed, "best": self.best, "start": self.start}

    def update(self, loss: float) -> str | None:
        """Take one step's loss; returns what blew up (for the message) or None."""
        if self.smoothed is None:
            self.smoothed = self.best = self.start = loss
        else:
            self.smoothed = (1 - self.ALPHA) * self.smoothed + self.ALPHA * loss
            self.best = min(self.best, self.smoothed)
        scale = max(abs(self.best), abs(self.start))
        if self.factor and scale > 0 and self.smoothed - self.best > self.factor * scale:
            return (f"the loss blew up: smoothed {self.smoothed:.4g} against a best of {self.best:.4g} (more than "
                    f"--divergence-factor {self.factor:g} x {scale:.4g} above it; this step's loss {loss:.4g})")
        return None


def nonfinite_weights(model: torch.nn.Module) -> str | None:
    """The name of a parameter holding NaN or ±inf (None when all are finite), the same on every rank.

    Under FSDP2 each rank checks its shard and the answer is reduced over ranks.
    """
    bad = ""
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if local.numel() and not bool(torch.isfinite(local).all()):
                bad = name
                break
    if distributed.env().active:
        flag = distributed.all_reduce(torch.tensor(float(bool(bad))), "max")
        if flag.item() and not bad:
            bad = "(a parameter on another rank)"
    return bad or None
