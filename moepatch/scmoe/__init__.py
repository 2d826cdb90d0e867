"""ScMoE: the shortcut-connected MoE architecture (model), conversion of transformers models (convert) and
the overlapped expert-parallel schedule (schedule, its collectives through moepatch.parallel); docs/scmoe.md."""

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
