"""tether: RLHF you can measure.

The InstructGPT pipeline (pretrain -> SFT -> reward model -> PPO with a KL penalty to the SFT
policy), its variants, and the instruments that tell whether a run worked.
"""

__version__ = "0.1.0"
