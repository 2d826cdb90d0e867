"""ScMoE: the shortcut-connected MoE architecture, conversion of transformers models, and the
overlapped expert-parallel schedule (its collectives through moepatch.parallel).  See docs/scmoe.md.

    import moepatch
    from moepatch.scmoe import build_scmoe
    model = build_scmoe(arch="scmoe", position=2, combine="cg1", num_experts=8)
    out = model(input_ids, labels=input_ids)             # out.loss = LM loss + 0.01 * aux loss
    handle = moepatch.apply(model, capacity_factor=2.0)  # capacity on the shortcut MoE
"""

from .convert import ConvertReport, ShortcutMoeBlock, convert, perplexity
from .model import (
    ARCHS,
    COMBINES,
    POSITIONS,
    KVCache,
    ScMoEConfig,
    ScMoEForCausalLM,
    ScMoEOutput,
    active_parameters,
    build_scmoe,
)

__all__ = [
    "ARCHS", "COMBINES", "POSITIONS", "ConvertReport", "KVCache", "ScMoEConfig",
    "ScMoEForCausalLM", "ScMoEOutput", "ShortcutMoeBlock", "active_parameters", "build_scmoe",
    "convert", "perplexity",
]
