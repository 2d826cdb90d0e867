"""Experts backends (who computes a patched model's experts: "hf", "triton", "ep"), plugged into
transformers' experts interface; :func:`select` switches a model's configs, undone by its handle.
"ep" lives in moepatch.parallel and is registered by the package root (patch/ never imports it).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..errors import ModelStateError
from .registry import experts_modules

TRITON = "moepatch_triton"  # fused experts, replayed from CUDA graphs where that pays
TRITON_EAGER = "moepatch_triton_eager"  # the same kernels, never from a graph (cuda_graphs=False)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_USERS: dict = {}  # experts-function name -> handles that registered it and are not removed yet


def _interface():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ALL_EXPERTS_FUNCTIONS


def register(name: str, fn) -> None:
    """Make ``name`` an experts implementation, process-wide (idempotent): ``fn(experts_module,
    hidden_states (T, H), top_k_index (T, W), top_k_weights (T, W)) -> (T, H)``."""
    interface = _interface()
    if name not in interface:
        interface.register(name, fn)


def _unregister(name: str) -> None:
    type(_interface())._global_mapping.pop(name, None)


def experts_configs(model: torch.nn.Module, blocks) -> list:
    """Every distinct config whose experts implementation a switch may change."""
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


class SelectHandle:
    """Undoes :func:`select`; a function registered for it leaves the interface with its last user."""

    def __init__(self, saved: list, name: str | None):
        self._saved, self._name = saved, name

    def remove(self) -> None:
        saved, self._saved = self._saved, None
        if saved is None:
            return
        for cfg, previous in reversed(saved):
            cfg._experts_implementation_internal = previous
        if self._name is not None:
            _USERS[self._name] -= 1
            if _USERS[self._name] == 0:
                _unregister(self._name)


def select(model: torch.nn.Module, blocks, name: str, fn=None) -> SelectHandle:
    """Switch ``model`` (its configs, sub-configs and each block's experts config) to ``name``; with
    ``fn``, ``name`` is registered while some selection uses it, without, it must be registered already."""
    saved = [(cfg, cfg._experts_implementation_internal) for cfg in experts_configs(model, blocks)]
    if fn is not None:
        if not _USERS.get(name):
            _interface().register(name, fn)
        _USERS[name] = _USERS.get(name, 0) + 1
    handle = SelectHandle(saved, name if fn is not None else None)
    try:
        if hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation(name)
        # Experts modules dispatch on their own config; set any the model-level switch did not reach.
        for b in blocks:
            cfg = getattr(b.experts, "config", None)
            if cfg is None:
                raise ModelStateError(f"{type(b.experts).__name__} has no config to select the experts implementation")
            if cfg._experts_implementation != name:
                cfg._experts_implementation_internal = name
    except BaseException:
        handle.remove()
        raise
    return handle


def layout_problem(name: str, m: torch.nn.Module) -> str | None:
    """Why the fused kernel cannot run experts module ``m`` (None: it can): it computes
    SiLU(gate) * up from gate_up_proj (E, 2I, H) as [gate; up] and down_proj (E, H, I), no bias."""
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
    if gu.dtype not in _DTYPES or dn.dtype != gu.dtype:
        return f"{name}: expert weights in {gu.dtype} / {dn.dtype} (supported: float16, bfloat16, float32)"
    if gu.device != dn.device:
        return f"{name}: gate_up_proj and down_proj are on different devices"
    return None


def triton_problem(model: torch.nn.Module) -> str | None:
    """None when the Triton backend can run ``model``, else a short reason: triton importable, every
    fused experts module in the kernel's layout and on CUDA (or under TRITON_INTERPRET=1, the CPU
    interpreter the tests use)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    modules = experts_modules(model)
    if not modules:
        return "no fused experts module (transformers' @use_experts_implementation) in this model"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    for name, m in modules:
        dev = next(m.parameters()).device
        if dev.type != "cuda" and not interpret:
            return f"{name}: experts are on {dev.type}, the Triton kernels need CUDA (or TRITON_INTERPRET=1)"
    return uncovered_layout(model)


def uncovered_layout(model: torch.nn.Module) -> str | None:
    """The first experts module of ``model`` in a form the fused kernel does not compute, None if all are."""
    for name, m in experts_modules(model):
        problem = layout_problem(name, m)
        if problem:
            return problem
    return None


def _triton_forward(graphs: bool):
    def forward(self, hidden_states, top_k_index, top_k_weights):
        """(T, H), (T, W) ids (sentinels >= E skipped), (T, W) weights -> (T, H)."""
        from ..ops.experts import moe_experts

        kw = {} if graphs else {"graphs": False}
        return moe_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, **kw)

    return forward


_TRITON_FORWARDS = {TRITON: _triton_forward(True), TRITON_EAGER: _triton_forward(False)}


class Backend:
    """Who computes a patched model's experts.  ``prepare`` validates first, returns (config, this rank under
    real EP or None); ``install`` returns undo handles; ``device_route``: use moepatch.ops' routing on CUDA."""

    name = "hf"
    device_route = False

    def prepare(self, model, cfg):
        return cfg, None

    def install(self, model, blocks, cfg) -> list:
        return []


class TritonBackend(Backend):
    name = "triton"
    device_route = True

    def install(self, model, blocks, cfg) -> list:
        name = TRITON if cfg.cuda_graphs else TRITON_EAGER
        return [select(model, blocks, name, _TRITON_FORWARDS[name])]


_LOADERS = {"hf": Backend, "triton": TritonBackend}  # backend key -> () -> backend object


def register_backend(key: str, loader) -> None:
    """Make backend ``key`` available; ``loader()`` returns it (called when first needed)."""
    _LOADERS[key] = loader


def get_backend(key: str) -> Backend:
    loader = _LOADERS.get(key)
    if loader is None:
        raise ModelStateError(f"experts backend {key!r} is not registered (import moepatch registers 'ep'); "
                              f"available: {', '.join(_LOADERS)}")
    return loader()
