"""RLAIF and Constitutional AI: preferences and revisions from an AI judge that follows a written constitution.

constitution.py (the file format, the default, sampling), judge.py (the judge prompt, both orders,
a local causal LM as judge), http.py (an OpenAI-compatible endpoint as judge or writer), label.py
(``tether rlaif label``), revise.py (``tether rlaif revise``), train_judge.py (a judge trained in
the gold world, ``tether rlaif train-judge``).
"""

from tether.rlaif.constitution import Constitution, ConstitutionError, Principle, load_constitution, parse_constitution
from tether.rlaif.judge import Judgement, LMJudge, combine_orders, judge_pairs, judge_prompt, order_stats

__all__ = [
    "Constitution",
    "ConstitutionError",
    "Judgement",
    "LMJudge",
    "Principle",
    "combine_orders",
    "judge_pairs",
    "judge_prompt",
    "load_constitution",
    "order_stats",
    "parse_constitution",
]
