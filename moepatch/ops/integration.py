"""The Triton experts backend as moepatch's patch core sees it (``kernel="triton"``).

The core (moepatch/patch/core.py) calls three functions:

- :func:`unavailable_reason` decides whether the backend can run a model;
- :func:`route_fn` gives the routing function its router hooks call (sync-free, same pairs as the
  reference);
- :func:`install` plugs the fused kernel into transformers' ``ExpertsInterface`` under the name
  ``"moepatch_triton"`` and switches the model to it; the handles it returns undo exactly that.

Nothing here imports triton at module import time, so a missing triton is reported as a reason
instead of an ImportError from deep inside.
"""

from __future__ import annotations

import importlib.util
import os

import torch

IMPL_NAME = "moepatch_triton"
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Models currently switched to IMPL_NAME; the function stays registered while any is.
_registered_users = 0


def _experts_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Modules decorated by transformers' ``use_experts_implementation`` (they carry ``has_gate``)."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "has_gate") and hasattr(m, "num_experts")]


def _layout_problem(name: str, m: torch.nn.Module) -> str | None:
    from transformers.activations import SiLUActivation

    flags = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
             "has_post_expert_norm": False, "_is_expert_parallel": False}
    for attr, want in flags.items():
        got = getattr(m, attr, want)
        if bool(got) != want:
            return f"{name}: {attr}={got!r} (the fused kernel needs {attr}={want})"
    act = getattr(m, "act_fn", None)
    if not isinstance(act, (SiLUActivation, torch.nn.SiLU)):
        return f"{name}: activation {type(act).__name__} (the fused kernel computes SiLU(gate) * up)"
    gu, dn = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(dn, torch.Tensor):
        return f"{name}: no fused gate_up_proj / down_proj tensors"
    E, two_i, H = gu.shape
    if two_i % 2 or tuple(dn.shape) != (E, H, two_i // 2) or E != m.num_experts:
        return f"{name}: gate_up_proj {tuple(gu.shape)} / down_proj {tuple(dn.shape)} are not (E, 2I, H) / (E, H, I)"
    if gu.dtype not in _SUPPORTED_DTYPES or dn.dtype != gu.dtype:
        return f"{name}: expert weights in {gu.dtype} / {dn.dtype} (supported: float16, bfloat16, float32)"
    if gu.device != dn.device:
        return f"{name}: gate_up_proj and down_proj are on different devices"
    return None


def unavailable_reason(model: torch.nn.Module) -> str | None:
    """None when the Triton backend can run ``model``, else a short reason.

    Needs: triton importable; every fused experts module on CUDA (or TRITON_INTERPRET=1, the CPU
    interpreter used by tests); gated SiLU experts in transformers' default layout (gate_up_proj
    (E, 2I, H) as [gate; up], down_proj (E, H, I), no bias, not transposed, no post-expert norm).
    """
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    modules = _experts_modules(model)
    if not modules:
        return "no fused experts module (transformers' @use_experts_implementation) in this model"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    for name, m in modules:
        problem = _layout_problem(name, m)
        if problem:
            return problem
        dev = m.gate_up_proj.device
        if dev.type != "cuda" and not interpret:
            return f"{name}: experts are on {dev.type}, the Triton kernels need CUDA (or TRITON_INTERPRET=1)"
    return None


def route_fn():
    """The routing function for patched layers: :func:`moepatch.ops.routing.route_sync_free`, replayed
    from CUDA graphs for the strategies that route with many small kernels (:mod:`moepatch.ops.route_graphs`)."""
    from .route_graphs import route_graphed

    return route_graphed


def triton_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers experts function: (T, H), (T, W) ids (sentinels >= E skipped), (T, W) weights -> (T, H)."""
    from .experts import moe_experts

    return moe_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj)


def _interface():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ALL_EXPERTS_FUNCTIONS


def _configs(model: torch.nn.Module, blocks) -> list:
    """Every distinct transformers config whose experts implementation the switch may change."""
    seen, out = set(), []

    def add(cfg):
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "_experts_implementation_internal"):
            return
        seen.add(id(cfg))
        out.append(cfg)
        for key in getattr(cfg, "sub_configs", {}) or {}:
            add(getattr(cfg, key, None))

    add(getattr(model, "config", None))
    for m in model.modules():
        add(getattr(m, "config", None))
    for b in blocks:
        add(getattr(b.experts, "config", None))
    return out


class ExpertsImplementationHandle:
    """Undoes :func:`install`: restores every config's experts implementation, unregisters when unused."""

    def __init__(self, saved: list):
        self._saved = saved
        self._removed = False

    def remove(self) -> None:
        global _registered_users
        if self._removed:
            return
        self._removed = True
        for cfg, previous in reversed(self._saved):
            cfg._experts_implementation_internal = previous
        _registered_users -= 1
        if _registered_users == 0:
            type(_interface())._global_mapping.pop(IMPL_NAME, None)


def install(model: torch.nn.Module, blocks) -> list:
    """Register the fused experts function and switch ``model`` to it.

    Args:
        model: the transformers model being patched.
        blocks: its MoE blocks (each with ``.gate`` and a fused ``.experts`` module).
    Returns:
        [handle]; ``handle.remove()`` restores the previous implementation exactly.
    """
    global _registered_users
    configs = _configs(model, blocks)
    saved = [(cfg, cfg._experts_implementation_internal) for cfg in configs]
    interface = _interface()
    if _registered_users == 0:
        interface.register(IMPL_NAME, triton_experts_forward)
    _registered_users += 1
    handle = ExpertsImplementationHandle(saved)
    try:
        if hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation(IMPL_NAME)
        # Experts modules dispatch on their own config; set any the model-level switch did not reach.
        for b in blocks:
            cfg = getattr(b.experts, "config", None)
            if cfg is None:
                raise RuntimeError(f"{type(b.experts).__name__} has no config to select the experts implementation")
            if cfg._experts_implementation != IMPL_NAME:
                cfg._experts_implementation_internal = IMPL_NAME
    except BaseException:
        handle.remove()
        raise
    return [handle]
