"""Every MoE causal-LM type of the installed transformers, from a tiny model of its own config, through the
public API only: each is patched, or refused with the reason moepatch gives, or listed as unbuildable tiny."""

import math
import warnings

import pytest
import torch

import moepatch
from moepatch.patch.registry import experts_modules, family_for, moe_blocks, unsupported
from moepatch.tiny import UNBUILDABLE, moe_model_types, tiny_model

TYPES = moe_model_types()
GAMMA = 0.5


@pytest.fixture(scope="module", params=TYPES)
def model(request):
    model_type = request.param
    if model_type in UNBUILDABLE:
        pytest.skip(f"{model_type} cannot be built tiny: {UNBUILDABLE[model_type]}")  # counted in the test below
    return tiny_model(model_type)


def _ids(model, batch=2, seq=8):
    return torch.randint(3, model.config.get_text_config().vocab_size, (batch, seq),
                         generator=torch.Generator().manual_seed(0))


def _refused(model) -> bool:
    """A known unsupported type fails at apply with its reason, the model untouched; True for those."""
    model_type = model.config.model_type
    if model_type not in unsupported():
        return False
    with pytest.raises(moepatch.UnsupportedModelError, match=f"{model_type}.*{unsupported()[model_type][:30]}"):
        moepatch.apply(model, capacity_factor=GAMMA)
    assert not moepatch.is_patched(model)
    return True


def test_the_census():
    """Each type is buildable tiny or listed with a reason; patched or listed with a reason."""
    built = [t for t in TYPES if t not in UNBUILDABLE]
    assert all(UNBUILDABLE[t] for t in TYPES if t in UNBUILDABLE)
    assert not set(unsupported()) & set(moepatch.supported_model_types())
    if len(TYPES) >= 53:  # transformers 5.25 and later
        assert len(built) >= 43, sorted(set(TYPES) - set(built))


@torch.no_grad()
def test_no_capacity_is_bit_identical_and_remove_exact(model):
    x = _ids(model)
    base = model(x).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if _refused(model):
        return
    with moepatch.patched(model, capacity_factor=None):
        assert torch.equal(model(x).logits, base)
    handle = moepatch.apply(model, capacity_factor=GAMMA)
    model(x)
    handle.remove()
    assert torch.equal(model(x).logits, base)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


@torch.no_grad()
def test_drops_what_a_hand_count_predicts(model):
    """γ=0.5, token drop: per layer call, N_e native pairs per expert and C = ceil(γ·T·k/E); min(N_e, C)
    pairs of expert e are kept and Σ max(0, N_e - C) dropped."""
    if _refused(model):
        return
    spec = family_for(model)
    native = []
    # Registered before the patch's, these hooks see the routers' own outputs.
    def record(module, args, output):  # the ids: the router's integer output
        ids = next(t for t in output if isinstance(t, torch.Tensor) and not t.is_floating_point())
        native.append(ids.reshape(-1, ids.shape[-1]))

    hooks = [spec.router(b).register_forward_hook(record) for _, b in moe_blocks(model, spec)]
    x = _ids(model)
    try:
        with moepatch.patched(model, capacity_factor=GAMMA, kernel="torch") as handle:
            native.clear()
            model(x)
            records = handle.stats().records
    finally:
        for h in hooks:
            h.remove()
    assert len(records) == len(native) > 0
    for r, ids_TK in zip(records, native):
        T, K = ids_TK.shape
        E = r.num_experts
        load = torch.bincount(ids_TK.reshape(-1), minlength=E)[:E]
        C = math.ceil(GAMMA * T * K / E - 1e-9)
        assert r.load_before == load.tolist()
        assert r.dropped_pairs == int((load - C).clamp_min(0).sum())
        assert r.load_after == load.clamp_max(C).tolist()


@torch.no_grad()
def test_bf16_padding_rows_give_no_nan(model):
    if model.config.model_type in unsupported():
        pytest.skip("refused at apply (test_no_capacity_is_bit_identical_and_remove_exact checks how)")
    bf16 = tiny_model(model.config.model_type, dtype=torch.bfloat16)
    x = _ids(bf16)
    mask = torch.ones_like(x)
    mask[1] = 0  # a row of padding only
    base = bf16(x, attention_mask=mask).logits
    with moepatch.patched(bf16, capacity_factor=GAMMA):
        out = bf16(x, attention_mask=mask).logits
    assert not (out.isnan() & ~base.isnan()).any()
    assert torch.isfinite(out[0]).all()


@torch.no_grad()
def test_triton_equals_the_torch_path(model):
    """kernel='triton' (the CPU interpreter here) on every form the kernels cover (backend.layout_problem),
    checked to have run for every experts call, without a fallback warning; other forms fall back to
    transformers' experts with a warning, and give the torch path's result."""
    if _refused(model):
        return
    from moepatch.patch import backend

    if not family_for(model).experts_interface:  # LongCat-Flash: its spec keeps its own experts path
        with pytest.raises(moepatch.ModelStateError, match="kernel='triton' is not available"):
            moepatch.apply(model, capacity_factor=GAMMA, kernel="triton")
        return
    x = _ids(model, seq=4)
    with moepatch.patched(model, capacity_factor=GAMMA, kernel="torch"):
        want = model(x).logits
    covered = backend.uncovered_layout(model) is None
    calls = []
    original = backend._TRITON_FORWARDS[backend.TRITON]

    def counting(*args):
        calls.append(1)
        return original(*args)

    backend._TRITON_FORWARDS[backend.TRITON] = counting
    experts_calls, hooks = [], []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            handle = moepatch.apply(model, capacity_factor=GAMMA, kernel="triton")
        fallback = [w for w in caught if "do not cover" in str(w.message)]
        assert len(fallback) == (0 if covered else 1), [str(w.message) for w in fallback]
        assert ("triton experts backend" if covered else "hf experts backend") in repr(handle)
        calls.clear()  # only the model's forward below (apply may probe modules)
        hooks = [m.register_forward_hook(lambda *a: experts_calls.append(1)) for _, m in experts_modules(model)]
        got = model(x).logits
        handle.remove()
    finally:
        backend._TRITON_FORWARDS[backend.TRITON] = original
        for h in hooks:
            h.remove()
    assert experts_calls and len(calls) == (len(experts_calls) if covered else 0)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)
