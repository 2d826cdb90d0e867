"""The families with a hand-written tiny config, which the detailed patch tests cover; every other MoE type of
the installed transformers is covered by tests/patch/test_all_families.py."""

from moepatch.tiny import HAND_FAMILIES as HAND  # noqa: F401
