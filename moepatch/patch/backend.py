"""Experts backends (who computes a patched model's experts: "hf", "triton", "ep"), plugged into
transformers' experts interface; :func:`select` switches a model's configs, undone by its handle.
"ep" lives in moepatch.parallel and is registered by the package root (patch/ never imports it).
"""

from __future__ import annotations

import importlib.util
import os
import weakref

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


_PROBE_ROWS = 8


def _numbers(m: torch.nn.Module, names: tuple) -> list:
    return [float(v) for v in (getattr(m, n, None) for n in names) if isinstance(v, (int, float))]


def _candidate_forms(m: torch.nn.Module):
    """The kernel forms a module of these flags may compute, the plain SiLU form first; limits and alphas
    from the module's attributes (gpt-oss: limit / alpha, MiniMax-M3: swiglu_limit / swiglu_alpha)."""
    from ..ops.experts import ExpertForm

    if not getattr(m, "has_gate", True):
        yield from (ExpertForm(gated=False, act=a) for a in range(4))
        return
    inter = not getattr(m, "is_concatenated", True)
    limits = sorted(set(_numbers(m, ("limit", "swiglu_limit"))))
    alphas = sorted(set(_numbers(m, ("alpha", "swiglu_alpha")))) or [1.0]
    for clamp in (0, 1, 2):
        for limit in ([0.0] if clamp == 0 else limits):
            for act in range(5):
                for alpha in (alphas if act == 4 else [1.0]):
                    yield ExpertForm(True, act, inter, clamp, limit, alpha)


def expert_form(m: torch.nn.Module, inter: int):
    """The :class:`~moepatch.ops.experts.ExpertForm` experts module ``m`` computes, None if none: its
    ``_apply_gate`` (gated) or ``act_fn`` (not) on a probe of ``inter`` columns (2I or I), matched with
    each candidate form (a derived form: overridden gates such as gpt-oss's clamped SwiGLU included)."""
    gated = getattr(m, "has_gate", True)
    fn = m._apply_gate if gated else getattr(m, "act_fn", None)
    if not callable(fn):
        return None
    limit = max(_numbers(m, ("limit", "swiglu_limit")) + [4.0])
    probe = torch.randn(_PROBE_ROWS, inter, generator=torch.Generator().manual_seed(0)) * (1.5 * limit)
    try:
        with torch.no_grad():
            got = fn(probe.clone())
    except Exception:  # noqa: BLE001  (a gate that cannot run on a probe is not a form the kernel knows)
        return None
    for form in _candidate_forms(m):
        want = form.apply_gate(probe)
        if isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got, want, 1e-5, 1e-5):
            return form
    return None


def fused_weights(m: torch.nn.Module) -> tuple:
    """(gate_up (E, 2I or I, H), down (E, H, I), gate_up_bias or None, down_bias or None) of experts module
    ``m`` as the kernels take them: transposed layouts as strided views, biases where ``has_bias``."""
    gated = getattr(m, "has_gate", True)
    gu, dn = getattr(m, "gate_up_proj" if gated else "up_proj", None), getattr(m, "down_proj", None)
    if getattr(m, "is_transposed", False) and isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor):
        gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)
    bias = getattr(m, "has_bias", False)
    b1 = getattr(m, "gate_up_proj_bias" if gated else "up_proj_bias", None) if bias else None
    b2 = getattr(m, "down_proj_bias", None) if bias else None
    return gu, dn, b1, b2


def layout_problem(name: str, m: torch.nn.Module) -> str | None:
    """Why the fused kernel cannot run experts module ``m`` (None: it can).  It computes every form of
    transformers' experts interface but a post-expert norm and expert parallelism: gated or not, [gate; up]
    or interleaved, plain or transposed, with or without biases, the activations of ExpertForm (probed)."""
    from ..ops.experts import ACT_NAMES

    for attr in ("has_post_expert_norm", "_is_expert_parallel"):
        got = getattr(m, attr, False)
        if got:
            return f"{name}: {attr}={got!r} (the fused kernel needs {attr}=False)"
    gated = getattr(m, "has_gate", True)
    gu, dn, b1, b2 = fused_weights(m)
    first = "gate_up_proj" if gated else "up_proj"
    if not isinstance(gu, torch.Tensor) or not isinstance(dn, torch.Tensor):
        return f"{name}: no fused {first} / down_proj tensors"
    E, x, H = gu.shape
    I = x // 2 if gated else x  # noqa: E741
    if (gated and x % 2) or tuple(dn.shape) != (E, H, I) or E != m.num_experts:
        return (f"{name}: {first} {tuple(getattr(m, first).shape)} / down_proj {tuple(m.down_proj.shape)} do not "
                f"match (E, {'2I' if gated else 'I'}, H) / (E, H, I) "
                f"(is_transposed={getattr(m, 'is_transposed', False)})")
    if getattr(m, "has_bias", False):
        for attr, b, shape in ((f"{first}_bias", b1, (E, x)), ("down_proj_bias", b2, (E, H))):
            if not isinstance(b, torch.Tensor) or tuple(b.shape) != shape:
                return f"{name}: has_bias=True but no {attr} tensor of shape {shape}"
    weights = [t for t in (gu, dn, b1, b2) if t is not None]
    if gu.dtype not in _DTYPES or any(t.dtype != gu.dtype for t in weights):
        return f"{name}: expert weights in {', '.join(str(t.dtype) for t in weights)} (supported: float16, " \
               f"bfloat16, float32, all alike)"
    if any(t.device != gu.device for t in weights):
        return f"{name}: the expert weights are on different devices"
    if expert_form(m, x) is None:
        what = f"{type(m).__name__}._apply_gate" if gated else "act_fn"
        return (f"{name}: activation {type(getattr(m, 'act_fn', None)).__name__} ({what}) is none of the fused "
                f"kernel's forms ({', '.join(ACT_NAMES)}; gated or not, clamped at the module's limit or not)")
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


# experts module -> its ExpertForm, found once (at install, or at a first call) by probing the module.
_FORMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _form_of(m: torch.nn.Module):
    form = _FORMS.get(m)
    if form is None:
        gu = fused_weights(m)[0]
        form = _FORMS[m] = expert_form(m, gu.shape[1])
    return form


def _triton_forward(graphs: bool):
    def forward(self, hidden_states, top_k_index, top_k_weights):
        """(T, H), (T, W) ids (sentinels >= E skipped), (T, W) weights -> (T, H)."""
        from ..ops.experts import PLAIN, moe_experts

        kw = {} if graphs else {"graphs": False}
        gu, dn, b1, b2 = fused_weights(self)
        form = _form_of(self)
        if b1 is not None or b2 is not None or form != PLAIN:
            kw.update(gate_up_bias=b1, down_bias=b2, form=form)
        return moe_experts(hidden_states, top_k_index, top_k_weights, gu, dn, **kw)

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
        for _, m in experts_modules(model):  # each module's form, probed now (never inside a graph capture)
            _FORMS.pop(m, None)
            _form_of(m)
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
