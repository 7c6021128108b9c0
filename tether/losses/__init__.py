"""Every loss and estimator in tether as a pure function of tensors.

Each function's docstring states its equation, its source and the shapes it takes. Trainers
gather inputs and call these; nothing here touches a model or an optimiser.
"""

from tether.losses.lm import sequence_logprobs, sft_nll, token_logprobs

__all__ = ["sequence_logprobs", "sft_nll", "token_logprobs"]
