"""Every loss and estimator in tether as a pure function of tensors.

Each function's docstring states its equation, its source and the shapes it takes. Trainers
gather inputs and call these; nothing here touches a model or an optimiser.
"""

from tether.losses.lm import (
    Summed,
    labelled_tokens,
    output_logprobs,
    sequence_logprobs,
    sequence_sum,
    sft_nll,
    summed_nll,
    token_entropy,
    token_logprobs,
)

__all__ = ["Summed", "labelled_tokens", "output_logprobs", "sequence_logprobs", "sequence_sum", "sft_nll",
           "summed_nll", "token_entropy", "token_logprobs"]
from tether.losses.kl import KL_ESTIMATORS, adaptive_kl_coef, kl_estimate
from tether.losses.policy import (
    AGGREGATIONS,
    aggregation_count,
    GAEOutput,
    GRPOOutput,
    PolicyLossOutput,
    ValueLossOutput,
    explained_variance,
    last_token,
    shaped_rewards,
    gae,
    grpo_advantages,
    grpo_loss,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
    whiten,
)
from tether.losses.preference import (
    PREFERENCE_LOSSES,
    KTOOutput,
    PreferenceOutput,
    RewardModelOutput,
    bradley_terry_loss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    reward_centering,
    robust_dpo_loss,
    simpo_loss,
)

__all__ += [
    "AGGREGATIONS", "aggregation_count", "GAEOutput", "adaptive_kl_coef", "GRPOOutput", "KL_ESTIMATORS", "KTOOutput", "PREFERENCE_LOSSES",
    "PolicyLossOutput", "PreferenceOutput", "explained_variance", "last_token", "shaped_rewards", "RewardModelOutput", "ValueLossOutput", "bradley_terry_loss",
    "dpo_loss", "gae", "grpo_advantages", "grpo_loss", "hinge_loss", "ipo_loss", "kl_estimate", "kto_loss", "reward_centering",
    "masked_mean", "ppo_policy_loss", "ppo_value_loss", "rloo_advantages", "robust_dpo_loss", "simpo_loss",
    "whiten",
]
