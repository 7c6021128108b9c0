"""Instruments: measurements that say whether an RLHF run worked."""
