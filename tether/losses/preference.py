"""Preference losses: the reward model's Bradley–Terry loss and the direct-preference family.

Notation for the direct losses: with sequence log-probabilities (summed over response tokens)

    h = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)]      Shape: (B,)

and the implicit reward of a response r(y) = β · (log π(y) − log π_ref(y)) (Rafailov et al.
2023, Sec. 5). Every function returns a NamedTuple with the batch-mean loss, the per-example
losses (for callers that weight examples, e.g. the exact tabular harness) and the implicit
rewards (detached: they are metrics). Pick a paired variant by name from PREFERENCE_LOSSES.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


class RewardModelOutput(NamedTuple):
    """Result of :func:`bradley_terry_loss`.

    loss: () mean over the batch. losses: (B,) per pair. accuracy: () fraction of pairs with
    r_chosen > r_rejected (detached).
    """

    loss: torch.Tensor
    losses: torch.Tensor
    accuracy: torch.Tensor


class PreferenceOutput(NamedTuple):
    """Result of a paired direct-preference loss.

    loss: () mean over the batch. losses: (B,) per pair.
    chosen_rewards: (B,) β·(log π(y_w) − log π_ref(y_w)), detached.
    rejected_rewards: (B,) β·(log π(y_l) − log π_ref(y_l)), detached.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


class KTOOutput(NamedTuple):
    """Result of :func:`kto_loss`.

    loss: () mean over the batch. losses: (B,) per example.
    rewards: (B,) β·(log π(y) − log π_ref(y)), detached.
    chosen_rewards: (n_desirable,) rewards of the desirable examples.
    rejected_rewards: (n_undesirable,) rewards of the undesirable examples.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    rewards: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
) -> RewardModelOutput:
    """Reward-model loss L = −log σ(r_w − r_l − m), mean over pairs; with soft labels
    L = −[p · log σ(d) + (1 − p) · log σ(−d)], d = r_w − r_l − m.

    Ouyang et al. 2022 (InstructGPT), eq. 1 (without the 1/C(K,2) grouping); the margin m is
    Touvron et al. 2023 (Llama 2), eq. 2. m = 0 when ``margin`` is None. The soft label p is the
    labeller's probability that y_w ≻ y_l (an AI judge's, as Bai et al. 2022, "Constitutional
    AI", Sec. 4.1, train on); p = 1 when ``target`` is None, which is the hard-label loss.
    Shape: r_chosen (B,), r_rejected (B,), margin (B,) or None, target (B,) or None.
    """
    diff = r_chosen - r_rejected  # (B,)
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)  # (B,)
    if target is not None:
        losses = target * losses - (1.0 - target) * F.logsigmoid(-diff)  # (B,)
    accuracy = (r_chosen > r_rejected).float().mean().detach()
    return RewardModelOutput(losses.mean(), losses, accuracy)


def _log_ratio_margin(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected = policy_rejected_logps - ref_rejected_logps  # (B,)
    return chosen - rejected, chosen, rejected


def _output(losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> PreferenceOutput:
    return PreferenceOutput(losses.mean(), losses, (beta * chosen).detach(), (beta * rejected).detach())


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float | torch.Tensor = 0.0,
) -> PreferenceOutput:
    """DPO: L = −(1 − ε) log σ(β h) − ε log σ(−β h).

    ε = 0 is Rafailov et al. 2023, eq. 7. ε > 0 is conservative DPO (cDPO; Mitchell 2023,
    "A note on DPO with noisy preferences"): the label is assumed flipped with probability ε,
    so the loss is the expected cross-entropy against the soft label 1 − ε. Its optimum has
    σ(β h) = 1 − ε instead of pushing h to infinity. With policy = reference, h = 0 and L = log 2.
    Shape: every log-prob (B,); returns loss (), losses (B,), chosen/rejected rewards (B,).
    """
    if isinstance(label_smoothing, torch.Tensor):  # a soft label per pair: ε_i = 1 − P(chosen ≻ rejected)
        if not bool(((label_smoothing >= 0) & (label_smoothing <= 1)).all()):
            raise ValueError("per-pair label_smoothing must lie in [0, 1]")
    elif not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    h, chosen, rejected = _log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)  # (B,)
    return _output(losses, chosen, rejected, beta)


def robust_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceOutput:
    """Robust DPO: L = [(1 − ε)(−log σ(β h)) − ε(−log σ(−β h))] / (1 − 2ε).

    Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO" (rDPO, Sec. 3): an unbiased
    estimate of the clean-label DPO loss when labels flip with known rate ε. ε = 0 is DPO.
    Shape: every log-prob (B,); returns loss (), losses (B,), chosen/rejected rewards (B,).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    h, chosen, rejected = _log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    eps = label_smoothing
    losses = (-(1.0 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1.0 - 2.0 * eps)  # (B,)
    return _output(losses, chosen, rejected, beta)


def _no_smoothing(name: str, label_smoothing: float) -> None:
    if label_smoothing != 0.0:
        raise ValueError(f"{name} has no label smoothing; got label_smoothing={label_smoothing}")


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceOutput:
    """IPO: L = (h − 1/(2β))², with β playing the role of the paper's τ.

    Azar et al. 2024, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", eq. 17. h uses sequence log-probs summed over tokens (the paper's
    definition). Its population optimum is tether.theory.ipo_optimum.
    Shape: every log-prob (B,); returns loss (), losses (B,), chosen/rejected rewards (B,).
    """
    _no_smoothing("ipo", label_smoothing)
    h, chosen, rejected = _log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (h - 1.0 / (2.0 * beta)).square()  # (B,)
    return _output(losses, chosen, rejected, beta)


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceOutput:
    """Hinge (SLiC): L = max(0, 1 − β h).

    Zhao et al. 2023, "SLiC-HF", eq. 1 (calibration loss with margin δ = 1/β), written on the
    reference-normalised margin h as in Rafailov et al.'s and Liu et al. 2024's (RSO) comparisons.
    Shape: every log-prob (B,); returns loss (), losses (B,), chosen/rejected rewards (B,).
    """
    _no_smoothing("hinge", label_smoothing)
    h, chosen, rejected = _log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.relu(1.0 - beta * h)  # (B,)
    return _output(losses, chosen, rejected, beta)


PreferenceLoss = Callable[..., PreferenceOutput]

PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": dpo_loss,
    "ipo": ipo_loss,
    "robust": robust_dpo_loss,
    "hinge": hinge_loss,
}
"""Paired variants sharing the signature (policy_chosen, policy_rejected, ref_chosen,
ref_rejected, beta, label_smoothing=0.0) -> PreferenceOutput. "sigmoid" with label_smoothing > 0
is cDPO."""


def simpo_loss(
    avg_chosen_logps: torch.Tensor, avg_rejected_logps: torch.Tensor, beta: float, gamma: float
) -> PreferenceOutput:
    """SimPO: L = −log σ(β·avg log π(y_w) − β·avg log π(y_l) − γ).

    Meng, Xia & Chen 2024, "SimPO", eq. 6. ``avg_*_logps`` are log-probs averaged over the
    response tokens (sequence_logprobs(..., average=True)); no reference model; γ is the
    target reward margin (absolute, not γ/β). The implicit rewards are β·avg log π.
    Shape: avg_chosen_logps (B,), avg_rejected_logps (B,); returns loss (), losses (B,), rewards (B,).
    """
    chosen = beta * avg_chosen_logps  # (B,)
    rejected = beta * avg_rejected_logps  # (B,)
    losses = -F.logsigmoid(chosen - rejected - gamma)  # (B,)
    return PreferenceOutput(losses.mean(), losses, chosen.detach(), rejected.detach())


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl_ref_point: torch.Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOOutput:
    """KTO: L = E[λ_y − v(x, y)], Ethayarajh et al. 2024, eq. 8.

        r = log π(y|x) − log π_ref(y|x),   z0 = max(0, kl_ref_point) (detached)
        v = λ_D σ(β(r − z0))  if y is desirable,   λ_U σ(β(z0 − r))  if undesirable
        per-example loss = λ_D (1 − σ(β(r − z0)))  or  λ_U (1 − σ(β(z0 − r)))

    z0 is the reference point KL(π || π_ref); the paper estimates it from mismatched
    (prompt, completion) pairs in the batch, clamps it at 0 and does not back-propagate
    through it, which is done here (pass a tensor per example or a scalar).
    Shape: policy_logps (B,), ref_logps (B,), labels (B,) bool (True = desirable),
    kl_ref_point () or (B,); returns loss (), losses (B,), rewards (B,).
    """
    labels = labels.bool()
    z0 = torch.as_tensor(kl_ref_point, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    log_ratio = policy_logps - ref_logps  # (B,)
    desirable = desirable_weight * (1.0 - torch.sigmoid(beta * (log_ratio - z0)))  # (B,)
    undesirable = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - log_ratio)))  # (B,)
    losses = torch.where(labels, desirable, undesirable)  # (B,)
    rewards = (beta * log_ratio).detach()  # (B,)
    return KTOOutput(losses.mean(), losses, rewards, rewards[labels], rewards[~labels])


def reward_centering(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Reward-centring regulariser E[(r_w + r_l)²], added as η · E[(r_w + r_l)²] to the RM loss.

    Eisenstein et al. 2023 ("Helping or Herding?"), section 3: the Bradley–Terry loss fixes only
    differences, so this term pins the mean reward near zero. Shape: (B,), (B,) -> ().
    """
    return ((r_chosen + r_rejected) ** 2).mean()
