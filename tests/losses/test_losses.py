"""tether.losses: closed-form values for every loss, GAE loop-vs-vectorised, KL estimator bias."""

from __future__ import annotations

import math

import pytest
import torch

from tether.losses import (
    AGGREGATIONS,
    PREFERENCE_LOSSES,
    bradley_terry_loss,
    dpo_loss,
    gae,
    grpo_advantages,
    grpo_loss,
    hinge_loss,
    ipo_loss,
    kl_estimate,
    kto_loss,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
    robust_dpo_loss,
    simpo_loss,
    whiten,
)
from tether.losses.policy import gae_reference

T = torch.tensor
SOFTPLUS_M1 = math.log1p(math.exp(-1.0))  # −log σ(1)
SOFTPLUS_1 = math.log1p(math.e)  # −log σ(−1)


def close(x: torch.Tensor, y: float | list, tol: float = 1e-6) -> None:
    torch.testing.assert_close(x.double(), torch.as_tensor(y, dtype=torch.float64), atol=tol, rtol=0)


# ---------------------------------------------------------------- KL estimators


def test_kl_estimators_closed_form():
    # π(y) = ½, π_ref(y) = ¼: log r = log ½; k1 = log 2, k2 = ½ log² 2, k3 = (½ − 1) + log 2
    logp, ref = T([math.log(0.5)]), T([math.log(0.25)])
    close(kl_estimate(logp, ref, "k1"), [math.log(2)])
    close(kl_estimate(logp, ref, "k2"), [0.5 * math.log(2) ** 2])
    close(kl_estimate(logp, ref, "k3"), [math.log(2) - 0.5])
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k4")


def test_kl_estimators_bias_on_known_categoricals():
    p = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    q = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)
    true_kl = float((p * (p / q).log()).sum())
    logp, logq = p.log(), q.log()
    # exact expectations over y ~ p: k1 and k3 are unbiased, k2 is not (it is ½E[log² r])
    exact = {k: float((p * kl_estimate(logp, logq, k)).sum()) for k in ("k1", "k2", "k3")}
    assert exact["k1"] == pytest.approx(true_kl, abs=1e-12)
    assert exact["k3"] == pytest.approx(true_kl, abs=1e-12)
    assert abs(exact["k2"] - true_kl) > 1e-3
    # Monte Carlo: 200k samples; means within 4 standard errors of the exact expectations
    y = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for kind in ("k1", "k2", "k3"):
        est = kl_estimate(logp[y], logq[y], kind)
        se = float(est.std()) / math.sqrt(len(y))
        assert abs(float(est.mean()) - exact[kind]) < 4 * se
    assert float(kl_estimate(logp[y], logq[y], "k3").min()) >= 0.0  # k3 is never negative
    assert float(kl_estimate(logp[y], logq[y], "k3").std()) < float(kl_estimate(logp[y], logq[y], "k1").std())


# ---------------------------------------------------------------- reward model and direct preference losses


def test_bradley_terry():
    out = bradley_terry_loss(T([2.0, 0.0]), T([1.0, 1.0]))
    # pair 1: −log σ(1); pair 2: −log σ(−1); accuracy ½
    close(out.losses, [SOFTPLUS_M1, SOFTPLUS_1])
    close(out.loss, (SOFTPLUS_M1 + SOFTPLUS_1) / 2)
    close(out.accuracy, 0.5)
    # margin 1 on pair 1: −log σ(1 − 1) = log 2
    close(bradley_terry_loss(T([2.0]), T([1.0]), margin=T([1.0])).loss, math.log(2))


def test_dpo_with_policy_equal_to_reference_is_log_2():
    logps = torch.randn(4, 8)
    for smoothing in (0.0, 0.2):
        out = dpo_loss(logps[0], logps[1], logps[0], logps[1], beta=0.1, label_smoothing=smoothing)
        close(out.loss, math.log(2))  # h = 0: −log σ(0) = log 2 whatever ε
        close(out.chosen_rewards, [0.0] * 8)


def test_dpo_closed_form_and_cdpo():
    # chosen log-ratio +1, rejected −1, β = ½: h = 2, βh = 1
    args = (T([0.0]), T([-2.0]), T([-1.0]), T([-1.0]))
    out = dpo_loss(*args, beta=0.5)
    close(out.loss, SOFTPLUS_M1)  # −log σ(1)
    close(out.chosen_rewards, [0.5])
    close(out.rejected_rewards, [-0.5])
    # cDPO, ε = 0.1: 0.9·(−log σ(1)) + 0.1·(−log σ(−1))
    close(dpo_loss(*args, beta=0.5, label_smoothing=0.1).loss, 0.9 * SOFTPLUS_M1 + 0.1 * SOFTPLUS_1)
    # rDPO, ε = 0.1: (0.9·(−log σ(1)) − 0.1·(−log σ(−1))) / 0.8
    close(robust_dpo_loss(*args, beta=0.5, label_smoothing=0.1).loss, (0.9 * SOFTPLUS_M1 - 0.1 * SOFTPLUS_1) / 0.8)
    close(robust_dpo_loss(*args, beta=0.5).loss, SOFTPLUS_M1)  # ε = 0 is DPO
    with pytest.raises(ValueError):
        dpo_loss(*args, beta=0.5, label_smoothing=0.5)
    # a soft label per pair (ε_i = 1 − p_i): pair 1 with p = 0.9 is the cDPO value above, pair 2 with p = 0.3
    two = (T([0.0, 0.0]), T([-2.0, -2.0]), T([-1.0, -1.0]), T([-1.0, -1.0]))
    per_pair = dpo_loss(*two, beta=0.5, label_smoothing=1 - T([0.9, 0.3])).losses
    close(per_pair, [0.9 * SOFTPLUS_M1 + 0.1 * SOFTPLUS_1, 0.3 * SOFTPLUS_M1 + 0.7 * SOFTPLUS_1])
    with pytest.raises(ValueError):
        dpo_loss(*two, beta=0.5, label_smoothing=T([0.1, 1.5]))


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = T([-3.0], requires_grad=True), T([-3.0], requires_grad=True)
    dpo_loss(chosen, rejected, T([-3.0]), T([-3.0]), beta=0.1).loss.backward()
    # dL/dπ_c = −β·σ(−βh) = −0.05 at h = 0
    close(chosen.grad, [-0.05])
    close(rejected.grad, [0.05])


def test_ipo_and_hinge_closed_form():
    # h = 2, β = ½: IPO (2 − 1/(2·½))² = (2 − 1)² = 1; hinge max(0, 1 − ½·2) = 0
    args = (T([0.0]), T([-2.0]), T([-1.0]), T([-1.0]))
    close(ipo_loss(*args, beta=0.5).loss, 1.0)
    close(hinge_loss(*args, beta=0.5).loss, 0.0)
    # h = 1: IPO (1 − 1)² = 0; hinge 1 − ½ = ½.   h = −2: hinge 1 + 1 = 2
    close(ipo_loss(T([0.0]), T([-1.0]), T([0.0]), T([0.0]), beta=0.5).loss, 0.0)
    close(hinge_loss(T([0.0]), T([-1.0]), T([0.0]), T([0.0]), beta=0.5).loss, 0.5)
    close(hinge_loss(T([-2.0]), T([0.0]), T([0.0]), T([0.0]), beta=0.5).loss, 2.0)
    with pytest.raises(ValueError):
        ipo_loss(*args, beta=0.5, label_smoothing=0.1)


def test_preference_table_shares_one_signature():
    assert set(PREFERENCE_LOSSES) == {"sigmoid", "ipo", "robust", "hinge"}
    logps = [torch.randn(5) for _ in range(4)]
    for name, fn in PREFERENCE_LOSSES.items():
        out = fn(*logps, 0.1)
        assert out.loss.shape == () and out.losses.shape == (5,), name
        assert out.chosen_rewards.shape == (5,) and not out.chosen_rewards.requires_grad


def test_simpo_closed_form():
    # avg log-probs −1 and −2, β = 2, γ = ½: −log σ(2·(−1) − 2·(−2) − ½) = −log σ(1.5)
    out = simpo_loss(T([-1.0]), T([-2.0]), beta=2.0, gamma=0.5)
    close(out.loss, math.log1p(math.exp(-1.5)))
    close(out.chosen_rewards, [-2.0])
    close(out.rejected_rewards, [-4.0])


def test_kto_closed_form():
    # desirable: r = 1, z0 = ½, β = 2 → 1 − σ(2·½) = 1 − σ(1)
    # undesirable: r = −½, z0 = ½, β = 2, λ_U = 2 → 2·(1 − σ(2·1)) = 2(1 − σ(2))
    policy = T([0.0, -1.5], requires_grad=True)
    ref = T([-1.0, -1.0])
    z0 = T(0.5, requires_grad=True)
    out = kto_loss(policy, ref, T([True, False]), z0, beta=2.0, undesirable_weight=2.0)
    sig = torch.sigmoid
    close(out.losses, [1 - float(sig(T(1.0))), 2 * (1 - float(sig(T(2.0))))])
    close(out.loss, out.losses.mean().item())
    close(out.chosen_rewards, [2.0])
    close(out.rejected_rewards, [-1.0])
    out.loss.backward()
    assert z0.grad is None  # the reference point is not back-propagated through
    assert policy.grad[0] < 0 < policy.grad[1]  # push desirable up, undesirable down
    # a negative reference point is clamped to 0: desirable r = 1 → 1 − σ(2)
    close(kto_loss(T([0.0]), T([-1.0]), T([True]), -3.0, beta=2.0).loss, 1 - float(sig(T(2.0))))


# ---------------------------------------------------------------- PPO


def test_ppo_policy_loss_clipping():
    # token 1: ratio e, A = 1 → clipped to 1.2, loss −1.2 (clipped)
    # token 2: ratio e, A = −1 → min(−e, −1.2) = −e, loss +e (not clipped: pessimistic side)
    # token 3: ratio 1/e, A = 1 → min(1/e, 0.8) = 1/e, loss −1/e (not clipped)
    # token 4: masked out (garbage)
    logp = T([[1.0, 1.0, -1.0, 50.0]])
    old = torch.zeros(1, 4)
    adv = T([[1.0, -1.0, 1.0, 7.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    out = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    close(out.loss, (-1.2 + math.e - math.exp(-1)) / 3)
    close(out.clip_fraction, 1 / 3)
    # approx KL is k3 of π_old vs π: r = π/π_old; (e − 1 − 1), (e − 2), (1/e − 1 + 1)
    close(out.approx_kl, (2 * (math.e - 2) + math.exp(-1)) / 3)
    # clip-higher: ε_high = 0.28 → token 1 gives −1.28
    single = ppo_policy_loss(T([[1.0]]), T([[0.0]]), T([[1.0]]), T([[1.0]]), 0.2, 0.28)
    close(single.loss, -1.28)


def test_ppo_value_loss():
    # V = 2, V_old = 1, G = 0: clipped V = 1.2; max(4, 1.44) = 4 → ½·4 = 2
    # V = 0.5, V_old = 1, G = 0: clipped V = 0.8; max(0.25, 0.64) = 0.64 → 0.32 (clip active)
    out = ppo_value_loss(T([[2.0, 0.5, 9.0]]), T([[1.0, 1.0, 0.0]]), T([[0.0, 0.0, 0.0]]), T([[1.0, 1.0, 0.0]]), clip=0.2)
    close(out.loss, (2.0 + 0.32) / 2)
    close(out.clip_fraction, 0.5)


def test_gae_by_hand():
    # γ = 1, λ = ½: δ_1 = 1 − 0.8 = 0.2, Â_1 = 0.2; δ_0 = 0.8 − 0.5 = 0.3, Â_0 = 0.3 + ½·0.2 = 0.4
    out = gae(T([[0.0, 1.0, 0.0]]), T([[0.5, 0.8, 9.0]]), T([[1.0, 1.0, 0.0]]), gamma=1.0, lam=0.5)
    close(out.advantages, [[0.4, 0.2, 0.0]])
    close(out.returns, [[0.9, 1.0, 0.0]])


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_vectorised_gae_equals_plain_loop(gamma, lam):
    gen = torch.Generator().manual_seed(1)
    B, L = 8, 12
    rewards = torch.randn(B, L, generator=gen, dtype=torch.float64)
    values = torch.randn(B, L, generator=gen, dtype=torch.float64)
    mask = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):  # a contiguous response span with prompt on the left and padding on the right
        start = int(torch.randint(0, L // 2, (1,), generator=gen))
        end = int(torch.randint(start + 1, L + 1, (1,), generator=gen))
        mask[b, start:end] = 1
    fast = gae(rewards, values, mask, gamma, lam)
    slow = gae_reference(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(fast.advantages, slow.advantages)
    torch.testing.assert_close(fast.returns, slow.returns)
    assert torch.all(fast.advantages[mask == 0] == 0)


def test_whiten():
    # masked mean 2, variance ⅔ → (x − 2)/√⅔
    x, mask = T([[1.0, 2.0, 3.0, 100.0]]), T([[1.0, 1.0, 1.0, 0.0]])
    s = math.sqrt(1.5)
    close(whiten(x, mask), [[-s, 0.0, s, 0.0]], tol=1e-5)
    close(whiten(x, mask, shift_mean=False), [[2 - s, 2.0, 2 + s, 0.0]], tol=1e-5)


# ---------------------------------------------------------------- GRPO and RLOO


def test_grpo_advantages_by_hand():
    r = T([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean ¼, unbiased std √((0.75² + 3·0.25²)/3) = ½ → (1.5, −0.5, −0.5, −0.5); group 2: all 0
    close(grpo_advantages(r, 4), [1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0], tol=1e-5)
    close(grpo_advantages(r, 4, "none"), [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    batch_std = float(r.std())
    close(grpo_advantages(r, 4, "batch"), [x / batch_std for x in (0.75, -0.25, -0.25, -0.25)] + [0] * 4, tol=1e-5)
    with pytest.raises(ValueError):
        grpo_advantages(r, 3)
    with pytest.raises(ValueError):
        grpo_advantages(r, 4, "median")


def test_rloo_advantages_by_hand():
    # k = 4: baseline for sample 1 is mean(0, 0, 0) = 0 → 1; for the others mean(1, 0, 0) = ⅓ → −⅓
    close(rloo_advantages(T([1.0, 0.0, 0.0, 0.0]), 4), [1.0, -1 / 3, -1 / 3, -1 / 3])
    close(rloo_advantages(T([3.0, 1.0, 5.0, 5.0]), 2), [2.0, -2.0, 0.0, 0.0])


def test_grpo_loss_closed_form():
    # one token, ratio 1, A = 1, π = π_ref: loss −1.  ratio e, A = 1: clipped to −1.2
    one = T([[1.0]])
    close(grpo_loss(T([[0.0]]), T([[0.0]]), T([[0.0]]), T([1.0]), one).loss, -1.0)
    close(grpo_loss(T([[1.0]]), T([[0.0]]), T([[1.0]]), T([1.0]), one).loss, -1.2)
    # π = 2π_ref: log r = −log 2, k3 = ½ − 1 + log 2; loss −1 + 0.04·k3
    out = grpo_loss(T([[0.0]]), T([[0.0]]), T([[-math.log(2)]]), T([1.0]), one, beta=0.04)
    close(out.loss, -1 + 0.04 * (math.log(2) - 0.5))
    close(out.kl, math.log(2) - 0.5)


def test_grpo_aggregations():
    # sequence 1 has 1 token with A = 1 (per-token −1); sequence 2 has 3 tokens with A = −1 (per-token +1)
    # sequence: (−1 + 1)/2 = 0;  token: (−1 + 3)/4 = ½;  constant (max_tokens 4): (−1 + 3)/(2·4) = ¼
    logp = torch.zeros(2, 4)
    mask = T([[1.0, 0, 0, 0], [1.0, 1, 1, 0]])
    adv = T([1.0, -1.0])
    expected = {"sequence": 0.0, "token": 0.5, "constant": 0.25}
    assert set(AGGREGATIONS) == set(expected)
    for name, value in expected.items():
        close(grpo_loss(logp, logp, logp, adv, mask, beta=0.0, aggregation=name, max_tokens=4).loss, value)
    with pytest.raises(ValueError):
        grpo_loss(logp, logp, logp, adv, mask, aggregation="constant")
    with pytest.raises(ValueError):
        grpo_loss(logp, logp, logp, adv, mask, aggregation="mean")


def test_bradley_terry_soft_labels_by_hand():
    import math

    r_w, r_l = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    out = bradley_terry_loss(r_w, r_l, target=torch.tensor([0.8, 1.0]))
    # d = 1: −[0.8·log σ(1) + 0.2·log σ(−1)] = 0.8·0.31326 + 0.2·1.31326 = 0.51326; d = 0, p = 1: log 2
    assert out.losses[0].item() == pytest.approx(0.8 * math.log1p(math.exp(-1)) + 0.2 * math.log1p(math.exp(1)), rel=1e-6)
    assert out.losses[1].item() == pytest.approx(math.log(2), rel=1e-6)
    hard = bradley_terry_loss(r_w, r_l)
    assert torch.allclose(bradley_terry_loss(r_w, r_l, target=torch.ones(2)).losses, hard.losses)
    # the optimum of a soft label p sits at σ(d) = p, not at d → ∞
    d = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([d], lr=1.0)
    for _ in range(500):
        opt.zero_grad()
        bradley_terry_loss(d, torch.zeros(1), target=torch.tensor([0.75])).loss.backward()
        opt.step()
    assert torch.sigmoid(d).item() == pytest.approx(0.75, abs=1e-4)


@pytest.mark.parametrize("chunk", [1, 3, 1000])
@pytest.mark.parametrize("case", ["trained", "frozen", "summed", "summed-uneven", "bias"])
def test_output_logprobs_equal_token_logprobs_of_the_output_layers_logits_forward_and_backward(chunk, case):
    """Scored a chunk of labelled positions at a time from the hidden states (no B x T x V logits), the gradient
    formed in the same pass: the same log-probs, entropies, and gradients for the hidden states and the output
    layer, whatever the chunk; for a frozen output layer (LoRA), and with ``summed`` (SFT: every upstream
    gradient equal; and if they are not after all, still exact)."""
    from tether.losses.lm import IGNORE_INDEX, output_logprobs, token_entropy, token_logprobs

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 6, 8, generator=g, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=case == "bias")
    head.requires_grad_(case != "frozen")
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[2, :] = IGNORE_INDEX  # a row with nothing labelled
    upstream = torch.full((3, 5), -0.3) if case == "summed" else torch.randn(3, 5, generator=g)

    def grads(logp):
        hidden.grad = head.weight.grad = None
        if head.bias is not None:
            head.bias.grad = None
        (logp * upstream).sum().backward()
        return [x.grad.clone() for x in (hidden, head.weight, head.bias) if x is not None and x.requires_grad]

    expected = token_logprobs(head(hidden), labels, temperature=0.7)
    entropy = torch.zeros(3, 5)
    got = output_logprobs(hidden, head, labels, temperature=0.7, chunk=chunk, entropy=entropy,
                          summed=case.startswith("summed"))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert not got[2].any() and not got[0, :3].any()
    labelled = labels[:, 1:] != IGNORE_INDEX
    torch.testing.assert_close(entropy, token_entropy(head(hidden)[:, :-1], 0.7) * labelled)
    with torch.no_grad():  # without gradient: the same log-probs and entropies
        plain_entropy = torch.zeros(3, 5)
        plain = output_logprobs(hidden, head, labels, temperature=0.7, chunk=chunk, entropy=plain_entropy)
    torch.testing.assert_close(plain, expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(plain_entropy, entropy)
    ours, theirs = grads(got), grads(token_logprobs(head(hidden), labels, temperature=0.7))
    assert len(ours) == (1 if case == "frozen" else 3 if case == "bias" else 2)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
