"""tunemesh cookbook: small post-training recipes written against the public SDK.

Run one with `python -m cookbook.<recipe> --help` (sft, rl, dpo, distill).
"""
