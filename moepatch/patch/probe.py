"""The check at ``apply`` that a model has what its family spec reads (every attribute on every block),
and the reading of each router: run on random rows, it must return distinct ids in range and weights
that are the family's scores of those ids times one factor per token.  Where the spec gives no scoring,
the reading is derived here: softmax or sigmoid of the logits, renormalised over the picks or not
(``norm_topk_prob`` where the router has it), times the router's ``routed_scaling_factor`` (else 1).
Legend: T probe rows, D hidden, E routed experts, Z zero-computation experts, K top-k.
"""

from __future__ import annotations

import operator

import torch

from ..errors import UnsupportedModelError
from ..routing.scores import FamilyScoring
from ..versions import tested_range
from .spec import FamilySpec, router_layout, split_router_output

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
            if spec.scoring is not None:
                spec.scoring(spec.router(block))
            spec.num_zero_experts(block)
            spec.num_expert_ids(block)
            spec.pair_fn(block)
        except AttributeError as exc:
            raise _unsupported(spec, f"its MoE block {name} ({type(block).__name__}): {exc}") from None


def _probe_input(model: torch.nn.Module, router: torch.nn.Module, block: torch.nn.Module) -> torch.Tensor:
    # The hidden states' dtype is the experts' (a router may keep float32 weights in a bf16 model).
    experts = getattr(block, "experts", None)
    param = next(experts.parameters(), None) if isinstance(experts, torch.nn.Module) else None
    param = param if param is not None else next(router.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    if device.type == "meta":  # offloaded by accelerate: its hook loads the weights on the execution device
        device = torch.device(getattr(getattr(router, "_hf_hook", None), "execution_device", None) or "cpu")
    D = int(model.config.get_text_config().hidden_size)
    gen = torch.Generator().manual_seed(0)  # a private generator: the caller's RNG state is not consumed
    return torch.randn(1, _ROWS, D, generator=gen).to(device=device, dtype=dtype)


def _mismatch(scoring: FamilyScoring, logits_TE, ids_TK, got_TK) -> float:
    """Largest relative deviation of the router's weights from ``scoring``'s reading of its logits."""
    scores_TE = scoring.scores(logits_TE)
    want_TK = scores_TE.gather(1, ids_TK) * scoring.factor(scores_TE, ids_TK, got_TK)[:, None]
    return float(((got_TK - want_TK).abs() / (want_TK.abs() + 1e-2)).max())


def _candidates(router: torch.nn.Module):
    """Readings a router without a spec may have, from what it says about itself."""
    normalize = (bool(router.norm_topk_prob),) if hasattr(router, "norm_topk_prob") else (True, False)
    scale = getattr(router, "routed_scaling_factor", None)
    scale = 1.0 if scale is None else float(scale)
    exact = [FamilyScoring(kind=k, normalize=n, scale=scale) for k in ("softmax", "sigmoid") for n in normalize]
    if hasattr(router, "norm_topk_prob") or hasattr(router, "routed_scaling_factor"):
        return exact  # the router says what its factor is: its weights must match it
    # A router that says nothing about its factor: weights proportional to the scores with a factor per
    # token (e.g. normalised over shared experts too), read from the native weights at each call.
    return exact + [FamilyScoring(kind=k, per_token=True) for k in ("softmax", "sigmoid")]


def _router_output(spec: FamilySpec, block, router, x_BSD):
    """(output, input) of the router called by its own block on x_BSD (as it is called in a forward:
    flattened or not, with the extra arguments some blocks pass); called alone where the block fails."""
    captured = []
    handle = router.register_forward_hook(lambda module, args, output: captured.append((output, args[0])))
    try:
        block.forward(x_BSD)
    except Exception:  # noqa: S110 (the router alone is tried next)
        captured.clear()
    finally:
        handle.remove()
    if captured:
        return captured[0]
    failures = []
    for x in (x_BSD[0], x_BSD):
        try:
            return router.forward(x), x  # forward, not __call__: no hooks of anyone's run
        except Exception as exc:  # any failure here is the model's structure, reported as such
            failures.append(f"{type(exc).__name__}: {exc}")
    raise _unsupported(spec, f"its router {type(router).__name__} fails called by its block and alone on "
                             f"({_ROWS}, D) or (1, {_ROWS}, D) inputs: {failures[-1]}")


@torch.no_grad()
def read_router(spec: FamilySpec, model: torch.nn.Module, block: torch.nn.Module) -> tuple[FamilyScoring, tuple]:
    """(scoring, layout) of the block's router: the spec's scoring or a derived one, checked against the router on
    a few random rows, and where its output holds (logits, weights, ids) (``spec.router_layout``)."""
    router = spec.router(block)
    x_BSD = _probe_input(model, router, block)
    output, x_in = _router_output(spec, block, router, x_BSD)
    if not isinstance(output, tuple) or len(output) < 2:
        raise _unsupported(spec, f"its router {type(router).__name__} returns {type(output).__name__} "
                                 f"of {len(output) if isinstance(output, tuple) else 1} value(s); "
                                 "moepatch reads (logits, weights, ids, ...) or (weights, ids)")
    layout = router_layout(output)
    if layout[1] is None:
        raise _unsupported(spec, f"its router returns no weights of its ids' shape {tuple(output[layout[2]].shape)}")
    logits_TE, weights_TK, ids_TK = split_router_output(output, layout)
    E, Z = spec.num_experts(block), spec.num_zero_experts(block)
    if (not isinstance(ids_TK, torch.Tensor) or ids_TK.dim() != 2 or ids_TK.shape[0] != _ROWS
            or ids_TK.dtype not in (torch.int64, torch.int32)):
        shape = tuple(ids_TK.shape) if isinstance(ids_TK, torch.Tensor) else type(ids_TK).__name__
        raise _unsupported(spec, f"its router returns ids of shape {shape} and dtype "
                                 f"{getattr(ids_TK, 'dtype', None)}; moepatch expects ({_ROWS}, top_k) integers")
    K = ids_TK.shape[1]
    if not isinstance(weights_TK, torch.Tensor) or tuple(weights_TK.shape) != (_ROWS, K):
        raise _unsupported(spec, f"its router returns weights of shape {tuple(getattr(weights_TK, 'shape', ()))}; "
                                 f"moepatch expects ({_ROWS}, {K}) like its ids")
    ids_TK = ids_TK.long()
    if bool((ids_TK < 0).any() | (ids_TK >= E + Z).any()) or bool(  # NOTE: host sync (once, at apply)
            (ids_TK.sort(1).values.diff(dim=1) == 0).any()):
        raise _unsupported(spec, f"its router picks ids outside [0, {E + Z}) or the same expert twice")
    if logits_TE is None and spec.router_logits is not None:
        logits_TE = spec.router_logits(router, x_in)
    if logits_TE is None:
        raise _unsupported(spec, "its router returns no logits (weights, ids), and the family has no way to "
                                 "recompute them")
    if tuple(logits_TE.shape) != (_ROWS, E + Z):
        raise _unsupported(spec, f"its router returns logits of shape {tuple(logits_TE.shape)}; moepatch expects "
                                 f"({_ROWS}, {E + Z}) for {E} routed and {Z} zero-computation experts")
    got_TK = weights_TK.float()
    # Weights computed in low precision may be returned in float32: the looser of the two dtypes decides.
    rtol = max(_RTOL.get(weights_TK.dtype, _RTOL_LOW), _RTOL.get(x_BSD.dtype, _RTOL_LOW))
    options = [spec.scoring(router)] if spec.scoring is not None else _candidates(router)
    errors = [_mismatch(s, logits_TE, ids_TK, got_TK) for s in options]
    # The first reading within the tolerance (exact ones before per-token ones), else the closest one.
    passing = [i for i, e in enumerate(errors) if e <= rtol and not options[i].per_token]
    passing = passing or [i for i, e in enumerate(errors) if e <= rtol]
    best = min(passing, key=errors.__getitem__) if passing else min(range(len(options)), key=errors.__getitem__)
    if errors[best] > rtol:
        if spec.scoring is not None:
            s = options[0]
            what = f"{s.kind} scores, renormalised={s.normalize}, scale={s.scale:g}"
        else:
            normalized = "/".join(sorted({str(s.normalize) for s in options if not s.per_token}))
            what = f"softmax or sigmoid scores of its logits, renormalised={normalized}, scale={options[0].scale:g}"
        raise _unsupported(spec, f"its router's weights differ from moepatch's reading ({what}) by up to "
                                 f"{errors[best]:.3g} (relative): the router computes something else than this "
                                 "release of moepatch reads")
    return options[best], layout
