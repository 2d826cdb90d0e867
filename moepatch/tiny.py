"""Tiny randomly initialised models of every supported family, built from configs (no hub access).

Used by the tests, the demo and the benchmarks.  Router weights are scaled up so the tiny routers
are as imbalanced as trained ones (a random router at init routes almost uniformly).

Seven families have hand-written configs; every other MoE causal LM of the installed transformers
(``moe_model_types()``) gets one derived from its config class's defaults by name rules (``_shrink``).
"""

from __future__ import annotations

import torch

from .patch.registry import experts_modules, moe_model_types

# The families with a hand-written tiny config: the demo's default and the detailed patch tests' set.
HAND_FAMILIES = ("deepseek_v2", "deepseek_v3", "longcat_flash", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
_MLA = dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16,
            q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, intermediate_size=64,
            moe_intermediate_size=48)
_COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


# Types that cannot be built tiny from their config (model type -> why); tiny_config raises for them.
UNBUILDABLE: dict[str, str] = {}

# Defaults corrected before shrinking, where a config class's defaults are not a complete MoE model.
_DEFAULT_FIXES = {
    "dots1": dict(n_routed_experts=128, num_experts_per_tok=6, n_shared_experts=2),  # the defaults are None
    "gemma4_text": dict(enable_moe_block=True, num_experts=128, top_k_experts=8, moe_intermediate_size=704),
    "granitemoehybrid": dict(layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 8),  # default: all Mamba
    "lfm2_moe": dict(layer_types=["conv", "full_attention"] * 16),  # the default None breaks the model
    # The indexer of the indexed-attention layers is unset by default (already tiny values here).
    "qwen4_exp_text": dict(indexer_n_heads=4, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=4,
                           indexer_compress_ratio=2),
}
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
_TOP_KS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k", "top_k_experts")
_GROUPS = ("n_group", "num_expert_group")
_HIDDEN = ("hidden_size", "out_hidden_size", "adapter_in_dim", "adapter_out_dim", "adapter_input_size", "ple_embed_dim")
# Mamba mixers: 8 heads of 16 (expand 2 x hidden 64 = 128 wide), a 16-wide state.
_MAMBA = {"mamba_n_heads": 8, "mamba_num_heads": 8, "mamba_d_head": 16, "mamba_head_dim": 16, "mamba_d_state": 16,
          "ssm_state_size": 16}
_SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# Layer counts before the first layer of a kind (a MoE or an attention layer): the prefix kept must pass them.
_FIRST_OF_KIND = ("first_k_dense_replace", "num_dense_layers", "num_dense_blocks", "moe_layer_start_index",
                  "expert_layer_offset", "attn_layer_offset")


def _shrink_scalar(key: str, value, d: dict):
    """The tiny value of field ``key`` of config dict ``d`` (by its name), or ``value`` itself when it stays."""
    mla = "kv_lora_rank" in d and "qk_nope_head_dim" in d
    if isinstance(value, bool) or key in ("qk_head_dim", "num_hidden_layers"):
        return value
    if key in _SPECIAL_IDS and value is not None:
        ids = [i if i < 128 else _SPECIAL_IDS[key] for i in (value if isinstance(value, list) else [value])]
        return ids if isinstance(value, list) else ids[0]
    if key in _MAMBA and isinstance(value, int):
        return _MAMBA[key]
    if key.endswith("head_dim") and (value is not None or key == "head_dim"):
        if mla and key in ("qk_rope_head_dim", "qk_nope_head_dim"):
            return 8  # MLA query/key heads are nope + rope = 16 wide
        # MLA head_dim: the rope part (most) or the whole query/key head (Dots3-Note).
        return 8 if mla and key == "head_dim" and value == d.get("qk_rope_head_dim") else 16
    if not isinstance(value, int):
        return value
    if key in _EXPERT_COUNTS:
        return 8
    if key in _TOP_KS:
        return min(value, 2)
    if key in _GROUPS or key == "topk_group":
        return value if value <= 1 else (2 if key in _GROUPS else 1)
    if "vocab_size" in key:
        return 128
    if key in _HIDDEN:
        return 64
    if key.endswith(("intermediate_size", "ffn_hidden_size")) or key.endswith("_hidden_size") or "hidden_size_" in key:
        return min(value, 32)
    if "heads" in key:
        return 4 if mla and key == "num_key_value_heads" else min(value, 2 if "key" in key or "index" in key else 4)
    if key.endswith("rank"):
        return min(value, 16)
    if key == "depth":
        return 2
    if key == "index_topk":
        return 4
    return value


def _num_layers(d: dict) -> int:
    """The fewest leading layers (at least 2) holding every kind of layer of config dict ``d``."""
    total = d["num_hidden_layers"]
    n = 2
    for key, value in d.items():
        if key in _FIRST_OF_KIND and isinstance(value, int):
            n = max(n, value + 1)
        elif key == "decoder_sparse_step" and value:
            n = max(n, value)
        elif isinstance(value, list) and len(value) == total and value and isinstance(value[0], str):
            n = max(n, *(value.index(kind) + 1 for kind in set(value)))
        elif key.endswith("layers") and isinstance(value, list) and value and len(value) != total:
            plain = [i for i in range(total) if i not in value]
            n = max(n, min(value) + 1, (plain or [0])[0] + 1)
    return min(n, total)


def _shrink(d: dict) -> dict:
    """Constructor keywords of a tiny version of config dict ``d`` (sub-configs shrunk recursively)."""
    fixes = _DEFAULT_FIXES.get(d.get("model_type"), {})
    d = dict(d, **fixes)
    total = d.get("num_hidden_layers")
    n = _num_layers(d) if isinstance(total, int) else None
    kwargs = dict(fixes) if n is None else dict(fixes, num_hidden_layers=n)
    for key, value in d.items():
        if isinstance(value, dict) and "model_type" in value:
            kwargs[key] = dict(value, **_shrink(value))
        elif key == "per_layer_config" and value:
            kwargs[key] = {i: dict(v, **_shrink(v)) for i, v in value.items() if int(i) < n}
        elif n is not None and isinstance(value, list) and len(value) == total:
            kwargs[key] = [_shrink_scalar(key, v, d) for v in value[:n]]
        elif n is not None and key.endswith("layers") and isinstance(value, list):
            kwargs[key] = [i for i in value if i < n]
        elif (small := _shrink_scalar(key, value, d)) != value:
            kwargs[key] = small
    return kwargs


def _generic_config(model_type: str, overrides: dict):
    """A tiny config of any type of ``moe_model_types()``, derived from its class's defaults."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type in UNBUILDABLE:
        raise ValueError(f"no tiny config for {model_type!r}: {UNBUILDABLE[model_type]}")
    if model_type not in moe_model_types():
        raise ValueError(f"no tiny config for {model_type!r}; accepted: {', '.join(moe_model_types())}")
    cls = CONFIG_MAPPING[model_type]
    return cls(**dict(_shrink(cls().to_dict()), **overrides))


def tiny_config(model_type: str, **overrides):
    """A transformers config of ``model_type`` with 8 experts, top-k 2 and a few layers.

    The seven hand-written families have hidden size 32 (LongCat-Flash: 64) and 2 layers, and take
    ``overrides`` as attributes set afterwards; the others are derived from the defaults (hidden size 64)
    and take ``overrides`` as constructor keywords.  Raises ValueError for ``UNBUILDABLE`` types."""
    import transformers as tf

    if model_type == "mixtral":
        cfg = tf.MixtralConfig(**_COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
    elif model_type == "olmoe":
        cfg = tf.OlmoeConfig(**_COMMON, intermediate_size=48, num_experts=8, num_experts_per_tok=2)
    elif model_type == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**_COMMON, intermediate_size=64, moe_intermediate_size=48,
                                shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                                norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[])
    elif model_type == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**_COMMON, intermediate_size=64, moe_intermediate_size=48, num_experts=8,
                                num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                                mlp_only_layers=[], head_dim=8)
    elif model_type == "deepseek_v2":
        # MLA attention has as many key/value heads as query heads.
        cfg = tf.DeepseekV2Config(**dict(_COMMON, num_key_value_heads=4), **_MLA, routed_scaling_factor=1.5,
                                  topk_method="greedy", n_group=1, topk_group=1)
    elif model_type == "deepseek_v3":
        # first_k_dense_replace, n_group and topk_group must be set: the defaults make every tiny layer dense.
        cfg = tf.DeepseekV3Config(**dict(_COMMON, num_key_value_heads=4), **_MLA, routed_scaling_factor=2.5,
                                  n_group=2, topk_group=1, norm_topk_prob=True)
    elif model_type == "longcat_flash":
        # `num_layers` decoder layers; num_hidden_layers (2 attention sublayers each) derives from it.
        common = {k: v for k, v in _COMMON.items() if k != "num_hidden_layers"}
        cfg = tf.LongcatFlashConfig(**dict(common, hidden_size=64, num_key_value_heads=4), num_layers=2,
                                    ffn_hidden_size=64, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                                    qk_rope_head_dim=8, head_dim=8, v_head_dim=8, moe_topk=2, n_routed_experts=8,
                                    zero_expert_num=2, expert_ffn_hidden_size=48, routed_scaling_factor=2.0)
    else:
        return _generic_config(model_type, overrides)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(model_type: str, seed: int = 0, router_scale: float = 8.0, dtype=torch.float32, **overrides):
    """A tiny ``*ForCausalLM`` of ``model_type`` in eval mode with imbalanced random routers."""
    import transformers as tf

    cfg = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    routers = set(_routers(model))
    with torch.no_grad():
        for module in model.modules():
            if module not in routers:
                continue
            weight = _router_weight(module)
            if weight is not None and weight.shape[0] > 1:
                weight.normal_(0.0, router_scale / weight.shape[-1] ** 0.5)
                if hasattr(module, "e_score_correction_bias"):
                    module.e_score_correction_bias.normal_(0.0, 0.05)
    return model.eval()


def _routers(model: torch.nn.Module):
    """The router of each MoE block: the experts' sibling named ``gate`` or ``router``, else the sibling
    whose (E, D) weight has a row per expert; and the modules named ``*Router`` (LongCat-Flash's experts
    carry no marks on transformers 5.17)."""
    yield from (m for m in model.modules() if type(m).__name__.endswith("Router"))
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    for _, experts in experts_modules(model):
        siblings = dict(parents[id(experts)].named_children())
        named = [siblings[name] for name in ("gate", "router") if name in siblings]
        by_shape = [m for m in siblings.values() if m is not experts and _router_weight(m) is not None
                    and _router_weight(m).shape[0] == experts.num_experts]
        yield from (named or by_shape)[:1]


def _router_weight(router: torch.nn.Module):
    """A router's (E, D) weight: its own ``weight``, else its last matrix (the layer scoring the experts:
    LongCat-Flash's ``classifier``, Zaya's MLP ``out_proj``)."""
    weight = getattr(router, "weight", None)
    if weight is None:
        weight = next(reversed([p for p in router.parameters() if p.dim() == 2]), None)
    return weight if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None
