"""The families with a hand-written tiny config (moepatch.tiny), which the detailed patch tests cover; every
other MoE type of the installed transformers is covered by tests/patch/test_all_families.py."""

HAND = ("deepseek_v2", "deepseek_v3", "longcat_flash", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
