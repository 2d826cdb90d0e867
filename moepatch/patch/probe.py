"""The check at ``apply`` that a model has what its family spec reads (every attribute on every block)
and that its first router, run on random rows, returns what moepatch's reading of it predicts.
Legend: T probe rows, D hidden, E routed experts, Z zero-computation experts, K top-k.
"""

from __future__ import annotations

import operator

import torch

from ..errors import UnsupportedModelError
from ..versions import tested_range
from .spec import FamilySpec

_ROWS = 16
# Router weights may be computed in the model's dtype; the probe compares in float32 with room for
# a bf16/fp16 rounding of the weights (a changed computation moves them by far more).
_RTOL = {torch.float32: 1e-4, torch.float64: 1e-6}
_RTOL_LOW = 3e-2


def _unsupported(spec: FamilySpec, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"moepatch cannot patch this {spec.model_type} model: {what}; {tested_range()}; install a tested "
        "transformers release (see docs/usage.md, 'Tested versions') and the model is left untouched")


def check_structure(spec: FamilySpec, blocks: list[tuple[str, torch.nn.Module]]) -> None:
    """Every attribute the patch reads, on every block; every derived quantity computable."""
    for name, block in blocks:
        for path in spec.required():
            try:
                operator.attrgetter(path)(block)
            except AttributeError:
                raise _unsupported(spec, f"its MoE block {name} ({type(block).__name__}) has no `{path}`") from None
        try:
            spec.scoring(spec.router(block))
            spec.num_zero_experts(block)
            spec.num_expert_ids(block)
            spec.pair_fn(block)
        except AttributeError as exc:
            raise _unsupported(spec, f"its MoE block {name} ({type(block).__name__}): {exc}") from None


def _probe_input(model: torch.nn.Module, router: torch.nn.Module) -> torch.Tensor:
    param = next(router.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    if device.type == "meta":  # offloaded by accelerate: its hook loads the weights on the execution device
        device = torch.device(getattr(getattr(router, "_hf_hook", None), "execution_device", None) or "cpu")
    D = int(model.config.hidden_size)
    gen = torch.Generator().manual_seed(0)  # a private generator: the caller's RNG state is not consumed
    return torch.randn(1, _ROWS, D, generator=gen).to(device=device, dtype=dtype)


@torch.no_grad()
def check_router(spec: FamilySpec, model: torch.nn.Module, block: torch.nn.Module) -> None:
    """The block's router on a few random rows agrees with moepatch's reading of it."""
    router = spec.router(block)
    x_BSD = _probe_input(model, router)
    try:
        output = router.forward(x_BSD)  # forward, not __call__: no hooks of anyone's run
    except Exception as exc:  # any failure here is the model's structure, reported as such
        raise _unsupported(spec, f"its router {type(router).__name__} fails on a (1, {_ROWS}, D) input: "
                                 f"{type(exc).__name__}: {exc}") from None
    if not isinstance(output, tuple) or len(output) not in (2, 3):
        raise _unsupported(spec, f"its router {type(router).__name__} returns {type(output).__name__} "
                                 f"of {len(output) if isinstance(output, tuple) else 1} value(s); "
                                 "moepatch reads (logits, weights, ids) or (weights, ids)")
    weights_TK, ids_TK = output[-2], output[-1]
    E, K, Z = int(router.num_experts), int(router.top_k), spec.num_zero_experts(block)
    if ids_TK.shape != (_ROWS, K) or ids_TK.dtype not in (torch.int64, torch.int32):
        raise _unsupported(spec, f"its router returns ids of shape {tuple(ids_TK.shape)} and dtype {ids_TK.dtype}; "
                                 f"moepatch expects ({_ROWS}, top_k={K}) integers")
    ids_TK = ids_TK.long()
    if bool((ids_TK < 0).any() | (ids_TK >= E + Z).any()) or bool(  # NOTE: host sync (once, at apply)
            (ids_TK.sort(1).values.diff(dim=1) == 0).any()):
        raise _unsupported(spec, f"its router picks ids outside [0, {E + Z}) or the same expert twice")
    if len(output) == 3:
        logits_TE = output[0]
    elif spec.router_logits is not None:
        logits_TE = spec.router_logits(router, x_BSD)
    else:
        raise _unsupported(spec, "its router returns no logits (weights, ids), and the family has no way to "
                                 "recompute them")
    if tuple(logits_TE.shape) != (_ROWS, E + Z):
        raise _unsupported(spec, f"its router returns logits of shape {tuple(logits_TE.shape)}; moepatch expects "
                                 f"({_ROWS}, {E + Z}) for {E} routed and {Z} zero-computation experts")
    scoring = spec.scoring(router)
    scores_TE = scoring.scores(logits_TE)
    want_TK = scores_TE.gather(1, ids_TK) * scoring.factor(scores_TE, ids_TK)[:, None]
    got_TK = weights_TK.float()
    rtol = _RTOL.get(weights_TK.dtype, _RTOL_LOW)
    if not torch.allclose(got_TK, want_TK, rtol=rtol, atol=rtol * 1e-2):
        worst = float((got_TK - want_TK).abs().max())
        raise _unsupported(spec, f"its router's weights differ from moepatch's reading ({scoring.kind} scores, "
                                 f"renormalised={scoring.normalize}, scale={scoring.scale:g}) by up to {worst:.3g}: "
                                 "the router computes something else than this release of moepatch expects")
