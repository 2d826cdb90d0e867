"""Which models moepatch patches: any whose MoE blocks run their experts through transformers' experts
interface, found from the model's own modules; hand-written specs only where that cannot be derived."""

from __future__ import annotations

import functools
import pathlib

import torch

from ..errors import UnsupportedModelError
from ..versions import tested_range
from . import longcat
from .spec import FamilySpec

_SPECS = {longcat.SPEC.model_type: longcat.SPEC}  # families with what the modules do not tell
_ROUTER_NAMES = ("gate", "router")
# MoE types whose routing moepatch cannot read yet, and why (apply says so before anything else).
UNSUPPORTED = {
    "deepseek_v4": "its hash-routed layers pick experts from the token ids, not from scores of the hidden states",
    "gemma4": "its router weighs each expert by a learned per-expert scale, not by a factor per token",
    "gemma4_text": "its router weighs each expert by a learned per-expert scale, not by a factor per token",
    "phimoe": "its router's sparsemixer weights are masked softmaxes, not the scores times a factor per token",
    "zaya": "its router maps its skip expert onto expert 0 with weight 0, which capacity would count as load",
}
# The same, for releases before the one named (their modules changed since).
_UNSUPPORTED_BEFORE = {
    "jamba": ("5.25.0", "its router is a plain Linear returning logits, the block takes the top-k itself"),
}


@functools.cache
def unsupported() -> dict[str, str]:
    """Model type -> why moepatch cannot patch it, for the installed transformers."""
    from ..versions import installed_transformers

    def release(text):
        return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())

    installed = release(installed_transformers())
    before = {t: why for t, (first, why) in _UNSUPPORTED_BEFORE.items() if installed < release(first)}
    return {**UNSUPPORTED, **before}


@functools.cache
def moe_model_types() -> tuple[str, ...]:
    """The causal-LM model types of the installed transformers whose modeling code uses its experts
    interface (``use_experts_implementation``)."""
    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    models = pathlib.Path(transformers.__file__).parent / "models"
    found = []
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        sources = (models / model_type_to_module_name(model_type)).glob("modeling_*.py")
        if any("use_experts_implementation" in path.read_text(encoding="utf-8") for path in sources):
            found.append(model_type)
    return tuple(found)


def supported_model_types() -> tuple[str, ...]:
    """What moepatch patches on the installed transformers: the experts-interface types it can read and the
    hand-specified families."""
    return tuple(sorted((set(moe_model_types()) - set(unsupported())) | set(_SPECS)))


def experts_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Modules decorated by transformers' ``use_experts_implementation`` (they carry ``has_gate``)."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "has_gate") and hasattr(m, "num_experts")]


def _router_attr(block: torch.nn.Module, name: str) -> str:
    """The child of ``block`` that routes: a ``*Router`` module, else one named gate / router."""
    kids = [(n, m) for n, m in block.named_children() if m is not getattr(block, "experts", None)]
    routers = [n for n, m in kids if "router" in type(m).__name__.lower()]
    if len(routers) == 1:
        return routers[0]
    named = [n for n in _ROUTER_NAMES if n in dict(kids)]
    if named:
        return named[0]
    raise UnsupportedModelError(
        f"its MoE block {name} ({type(block).__name__}) has experts but no router module (a *Router child, "
        f"or one named {' / '.join(_ROUTER_NAMES)}); children: {', '.join(n for n, _ in kids) or 'none'}")


def derive_spec(model: torch.nn.Module, model_type: str) -> FamilySpec:
    """The family of a model from its modules: each experts module's parent is an MoE block, whose router
    is its routing child (patch/probe.py reads how it scores at apply)."""
    found = experts_modules(model)
    if not found:
        raise UnsupportedModelError(
            f"moepatch cannot patch model_type {model_type!r}: it has no MoE experts module behind transformers' "
            "experts interface (@use_experts_implementation), so it is not a Mixture-of-Experts model moepatch "
            f"patches; {tested_range()}; supported model types: {', '.join(supported_model_types())}")
    modules = dict(model.named_modules())
    classes, attrs = [], {}
    for name, _ in found:
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        block = modules[parent]
        if getattr(block, "experts", None) is not modules[name]:
            raise UnsupportedModelError(f"moepatch cannot patch this {model_type} model: its experts module {name} "
                                        "is not the `experts` attribute of an MoE block")
        try:
            attrs[type(block).__name__] = _router_attr(block, parent)
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"moepatch cannot patch this {model_type} model: {exc}") from None
        classes.append(type(block).__name__)
    if len(set(attrs.values())) > 1:
        raise UnsupportedModelError(f"moepatch cannot patch this {model_type} model: its MoE blocks keep their "
                                    f"routers under different names ({attrs})")
    return FamilySpec(model_type=model_type, block_classes=tuple(dict.fromkeys(classes)),
                      router_attr=next(iter(attrs.values())))


def family_for(model: torch.nn.Module) -> FamilySpec:
    """The family of a loaded transformers model; UnsupportedModelError when it has none."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise UnsupportedModelError(f"moepatch cannot patch {type(model).__name__} (no transformers config); "
                                    f"supported model types: {', '.join(supported_model_types())}")
    if model_type in unsupported():
        raise UnsupportedModelError(f"moepatch cannot patch {model_type} models yet: {unsupported()[model_type]}; "
                                    f"{tested_range()}")
    if model_type in _SPECS:
        return _SPECS[model_type]
    return derive_spec(model, model_type)


def moe_blocks(model: torch.nn.Module, spec: FamilySpec) -> list[tuple[str, torch.nn.Module]]:
    """(qualified name, block) of every MoE block of ``spec`` in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ in spec.block_classes]
