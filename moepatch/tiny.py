"""Tiny randomly initialised models of every supported family, built from configs (no hub access).

Used by the tests, the demo and the benchmarks.  Router weights are scaled up so the tiny routers
are as imbalanced as trained ones (a random router at init routes almost uniformly).
"""

from __future__ import annotations

import torch

_MLA = dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16,
            q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, intermediate_size=64,
            moe_intermediate_size=48)
_COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_config(model_type: str, **overrides):
    """A transformers config of ``model_type`` with hidden size 32 (LongCat-Flash: 64), 2 layers and 8 experts."""
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
        from .patch.registry import supported_model_types

        raise ValueError(f"no tiny config for {model_type!r}; accepted: {', '.join(supported_model_types())}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(model_type: str, seed: int = 0, router_scale: float = 8.0, dtype=torch.float32, **overrides):
    """A tiny ``*ForCausalLM`` of ``model_type`` in eval mode with imbalanced random routers."""
    import transformers as tf

    cfg = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():
        for module in model.modules():
            # The routers: (E, D) weights with E > 1 (Qwen2's shared-expert gate is (1, D)); LongCat's
            # router keeps its weight in a `classifier` Linear.
            if not type(module).__name__.endswith(("Router", "TopkRouter")):
                continue
            weight = module.classifier.weight if hasattr(module, "classifier") else module.weight
            if weight.shape[0] > 1:
                weight.normal_(0.0, router_scale / cfg.hidden_size**0.5)
                if hasattr(module, "e_score_correction_bias"):
                    module.e_score_correction_bias.normal_(0.0, 0.05)
    return model.eval()
