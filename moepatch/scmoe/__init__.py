"""ScMoE: the shortcut-connected MoE architecture, conversion of transformers models, and the
overlapped expert-parallel schedule.  See docs/scmoe.md.

    from moepatch.scmoe import build_scmoe, apply_capacity
    model = build_scmoe(arch="scmoe", position=2, combine="cg1", num_experts=8)
    out = model(input_ids, labels=input_ids)             # out.loss = LM loss + 0.01 * aux loss
    handle = apply_capacity(model, capacity_factor=2.0)  # moepatch.routing.route on the shortcut MoE

Nothing here imports torch.distributed except ``schedule`` (through ``moepatch.parallel``).
"""

from .capacity import CapacityHandle, apply_capacity
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
    "ARCHS", "COMBINES", "POSITIONS", "CapacityHandle", "ConvertReport", "KVCache", "ScMoEConfig",
    "ScMoEForCausalLM", "ScMoEOutput", "ShortcutMoeBlock", "active_parameters", "apply_capacity", "build_scmoe",
    "convert", "perplexity",
]
