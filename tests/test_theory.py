"""tether.theory: worked examples, limits, properties (hypothesis) and the optimal-policy command."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tether import theory
from tether.cli import main

# ---------------------------------------------------------------- worked examples (DESIGN.md)


def test_two_response_example():
    # numerators 0.6·e² = 4.4334 and 0.4·e⁰ = 0.4; Z = 4.8334; π* = (0.9172, 0.0828)
    star = theory.optimal_policy([0.6, 0.4], [1.0, 0.0], 0.5)
    np.testing.assert_allclose(star, [0.917, 0.083], atol=5e-4)
    assert math.isclose(math.exp(theory.log_partition([0.6, 0.4], [1.0, 0.0], 0.5)), 0.6 * math.e**2 + 0.4)


def test_three_response_example():
    pi, r = np.array([0.5, 0.3, 0.2]), np.array([1.0, 0.5, -1.0])
    numerators = pi * np.exp(r / 0.5)  # 0.5·e², 0.3·e¹, 0.2·e⁻²
    np.testing.assert_allclose(numerators, [3.6945, 0.8155, 0.0271], atol=5e-5)
    z = math.exp(theory.log_partition(pi, r, 0.5))
    assert z == pytest.approx(4.5371, abs=5e-5)
    np.testing.assert_allclose(theory.optimal_policy(pi, r, 0.5), [0.8143, 0.1797, 0.0060], atol=5e-5)


def test_limits_in_beta():
    pi, r = [0.5, 0.3, 0.2], [1.0, 0.5, -1.0]
    for beta in (0.0, 1e-12, 1e-320):  # no overflow however small
        np.testing.assert_allclose(theory.optimal_policy(pi, r, beta), [1, 0, 0], atol=1e-12)
    for beta in (math.inf, 1e300, 1e12):
        np.testing.assert_allclose(theory.optimal_policy(pi, r, beta), pi, atol=1e-10)
    assert theory.log_partition(pi, r, math.inf) == 0.0
    assert theory.log_partition(pi, r, 0.0) == math.inf


def test_ties_share_the_argmax_in_proportion_to_pi_ref():
    # responses 0 and 1 tie at the top: the β → 0 limit keeps their 5:3 ratio
    for beta in (0.0, 1e-9):
        np.testing.assert_allclose(theory.optimal_policy([0.5, 0.3, 0.2], [1.0, 1.0, 0.0], beta), [0.625, 0.375, 0.0])


def test_zero_reference_mass_stays_zero_and_batches_work():
    star = theory.optimal_policy([[0.0, 1.0], [0.5, 0.5]], [[100.0, 0.0], [0.0, 0.0]], 0.1)
    np.testing.assert_allclose(star, [[0.0, 1.0], [0.5, 0.5]])


def test_bad_inputs():
    with pytest.raises(ValueError):
        theory.optimal_policy([0.5, 0.6], [0, 0], 1.0)
    with pytest.raises(ValueError):
        theory.optimal_policy([0.5, 0.5], [0, 0, 0], 1.0)
    with pytest.raises(ValueError):
        theory.optimal_policy([0.5, 0.5], [0, 0], -1.0)


def test_kl_and_expected_reward():
    # KL((½, ½) || (¼, ¾)) = ½ log 2 + ½ log(2/3)
    assert theory.kl_divergence([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert theory.kl_divergence([1.0, 0.0], [0.5, 0.5]) == pytest.approx(math.log(2))
    assert theory.kl_divergence([0.5, 0.5], [1.0, 0.0]) == math.inf
    assert theory.expected_reward([0.25, 0.75], [4.0, -4.0]) == pytest.approx(-2.0)


def test_optimal_objective_is_beta_log_z():
    # J(π*) = E_π*[R] − β·KL(π*||π_ref) = β·log Z (Rafailov et al. 2023, Appendix A.1)
    pi, r, beta = np.array([0.5, 0.3, 0.2]), np.array([1.0, 0.5, -1.0]), 0.5
    star = theory.optimal_policy(pi, r, beta)
    j = theory.expected_reward(star, r) - beta * theory.kl_divergence(star, pi)
    assert j == pytest.approx(beta * theory.log_partition(pi, r, beta))


# ---------------------------------------------------------------- best-of-n


def _bon_brute_force(pi: list[float], r: list[float], n: int) -> np.ndarray:
    """Enumerate all n-tuples; keep the first sample of highest reward."""
    out = np.zeros(len(pi))
    for tup in itertools.product(range(len(pi)), repeat=n):
        prob = np.prod([pi[i] for i in tup])
        best = max(range(n), key=lambda s: (r[tup[s]], -s))
        out[tup[best]] += prob
    return out


@pytest.mark.parametrize("r", [[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 1.0, 2.0], [1.0, 1.0, 1.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_bon_distribution_matches_enumeration_with_ties(r, n):
    pi = [0.1, 0.2, 0.3, 0.4]
    np.testing.assert_allclose(theory.bon_distribution(pi, r, n), _bon_brute_force(pi, r, n), atol=1e-12)


def test_bon_kl_formula_and_bound():
    assert theory.bon_kl(1) == 0.0
    assert theory.bon_kl(4) == pytest.approx(math.log(4) - 0.75)
    # many distinct responses under a uniform π_ref: the exact KL approaches log n − (n−1)/n
    k = 20000
    pi, r = np.full(k, 1 / k), np.arange(k, dtype=float)
    for n in (2, 4, 16):
        exact = theory.kl_divergence(theory.bon_distribution(pi, r, n), pi)
        assert exact <= theory.bon_kl(n) + 1e-12
        assert exact == pytest.approx(theory.bon_kl(n), abs=2e-3)
    # with ties the exact KL is strictly below the bound (Beirami et al. 2024)
    tied = theory.bon_distribution([0.25] * 4, [0.0, 1.0, 1.0, 1.0], 4)
    assert theory.kl_divergence(tied, [0.25] * 4) < theory.bon_kl(4) - 0.1


# ---------------------------------------------------------------- IPO and GRPO fixed points


def test_ipo_optimum_is_stationary_for_the_population_ipo_loss():
    rng = np.random.default_rng(0)
    pi = rng.dirichlet(np.ones(4))
    pref = theory.bt_preferences(rng.normal(size=4))
    beta = 0.3
    g = np.log(theory.ipo_optimum(pi, pref, beta) / pi)
    # L(g) = Σ_{i,j} μ_i μ_j P_ij (g_i − g_j − 1/(2β))²; its gradient in g must vanish
    h = g[:, None] - g[None, :] - 1 / (2 * beta)  # (K, K)
    w = pi[:, None] * pi[None, :] * pref
    grad = 2 * (w * h).sum(1) - 2 * (w * h).sum(0)
    np.testing.assert_allclose(grad, 0.0, atol=1e-12)


def test_grpo_k3_optimum_solves_its_stationarity_condition():
    pi, r, beta, g = np.array([0.5, 0.3, 0.2]), np.array([1.0, 0.5, -1.0]), 0.5, 8
    q = theory.grpo_k3_optimum(pi, r, beta, g)
    c = 1 - 1 / g
    # c·π_k(R_k − E_π R) = β(π_k − π_ref,k)   (logit-space gradient of c·E_π R − β·KL(π_ref||π))
    np.testing.assert_allclose(c * q * (r - q @ r), beta * (q - pi), atol=1e-10)
    assert theory.total_variation(q, theory.optimal_policy(pi, r, beta)) > 0.03  # not π*


def test_kto_tabular_limit():
    np.testing.assert_allclose(theory.kto_tabular_limit([0.4, 0.3, 0.2, 0.1], [True, False, True, False]),
                               [2 / 3, 0, 1 / 3, 0])


# ---------------------------------------------------------------- properties


@st.composite
def problems(draw):
    k = draw(st.integers(2, 6))
    weights = np.array(draw(st.lists(st.floats(0.01, 1.0), min_size=k, max_size=k)))
    rewards = np.array(draw(st.lists(st.floats(-3.0, 3.0), min_size=k, max_size=k)))
    return weights / weights.sum(), rewards


@settings(max_examples=100, deadline=None)
@given(problems(), st.floats(0.05, 20.0))
def test_optimal_policy_is_a_distribution(problem, beta):
    pi, r = problem
    star = theory.optimal_policy(pi, r, beta)
    assert star.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.all(star >= 0)


@settings(max_examples=100, deadline=None)
@given(problems(), st.floats(0.05, 20.0), st.integers(0, 2**31 - 1))
def test_optimal_policy_maximises_the_objective(problem, beta, seed):
    pi, r = problem
    star = theory.optimal_policy(pi, r, beta)

    def objective(p):
        return theory.expected_reward(p, r) - beta * theory.kl_divergence(p, pi)

    best = objective(star)
    rng = np.random.default_rng(seed)
    for scale in (1e-3, 1e-1, 1.0):
        logits = np.log(star) + scale * rng.normal(size=len(pi))
        other = np.exp(logits - logits.max())
        assert objective(other / other.sum()) <= best + 1e-10
    mixture = 0.9 * star + 0.1 * rng.dirichlet(np.ones(len(pi)))
    assert objective(mixture) <= best + 1e-10


@settings(max_examples=100, deadline=None)
@given(problems(), st.floats(0.05, 10.0), st.floats(1.01, 10.0))
def test_kl_falls_as_beta_rises(problem, beta, factor):
    pi, r = problem
    kl_low = theory.kl_divergence(theory.optimal_policy(pi, r, beta), pi)
    kl_high = theory.kl_divergence(theory.optimal_policy(pi, r, beta * factor), pi)
    assert kl_high <= kl_low + 1e-12


# ---------------------------------------------------------------- the command


def test_cli_table():
    res = CliRunner().invoke(main, ["optimal-policy", "--sft", "0.6,0.4", "--reward", "1,0", "--beta", "0.5"])
    assert res.exit_code == 0, res.output
    assert "0.9172" in res.output and "0.0828" in res.output and "4.4334" in res.output
    assert "Z = 4.8334" in res.output


def test_cli_three_responses_and_sweep():
    res = CliRunner().invoke(main, ["optimal-policy", "--sft", "0.5,0.3,0.2", "--reward", "1,0.5,-1",
                                    "--beta", "0.5", "--sweep", "0.1,0.5,1,2"])
    assert res.exit_code == 0, res.output
    for text in ("3.6945", "0.8155", "0.0271", "Z = 4.5371", "0.8143", "0.1797", "0.0060", "KL(π*||π_SFT)"):
        assert text in res.output
    sweep = res.output.split("E[R]")[-1].strip().splitlines()[1:]
    assert [line.split()[0] for line in sweep] == ["0.1", "0.5", "1", "2"]


@pytest.mark.parametrize("args, message", [
    (["--sft", "0.6,0.4", "--reward", "1,0,2", "--beta", "1"], "2 values"),
    (["--sft", "0.6,0.6", "--reward", "1,0", "--beta", "1"], "sum to 1"),
    (["--sft", "0.6,0.4", "--reward", "1,0", "--beta", "-1"], "β must be >= 0"),
    (["--sft", "0.6,0.4", "--reward", "1,0", "--sweep", "1,-2"], "β must be >= 0"),
    (["--sft", "0.6,x", "--reward", "1,0", "--beta", "1"], "comma-separated"),
    (["--sft", "0.6,0.4", "--reward", "1,0"], "--beta, --sweep"),
])
def test_cli_errors(args, message):
    res = CliRunner().invoke(main, ["optimal-policy", *args])
    assert res.exit_code == 2
    assert message in res.output
