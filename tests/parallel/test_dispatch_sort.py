"""The dispatcher's two slot sorts agree: moepatch.ops' counting-sort kernels (CUDA default; here
the Triton interpreter) and the torch stable sort (CPU default)."""

import pytest
import torch

from moepatch.parallel import dispatch as dispatch_mod
from moepatch.parallel.dispatch import LocalDispatcher, weigh_and_sum


def _round(sort_with_kernel: bool, x_TH, ids_TW, E, header_slots):
    old = dispatch_mod.USE_KERNEL_SORT
    dispatch_mod.USE_KERNEL_SORT = sort_with_kernel
    try:
        disp = LocalDispatcher(header_slots=header_slots)
        return disp.dispatch(x_TH, ids_TW, num_experts=E, tag=3)
    finally:
        dispatch_mod.USE_KERNEL_SORT = old


@pytest.mark.parametrize("T,W,E,extra_slots", [(1, 1, 2, 0), (7, 2, 5, 0), (100, 2, 8, 3), (70, 3, 4, 1)])
def test_kernel_sort_equals_torch_sort(T, W, E, extra_slots):
    g = torch.Generator().manual_seed(T * 31 + W)
    x_TH = torch.randn(T, 16, generator=g)
    ids_TW = torch.randint(0, E, (T, W), generator=g)
    ids_TW[torch.rand(T, W, generator=g) < 0.3] = E  # dropped slots (the sentinel)
    ids_TW[0] = E  # a token with every slot dropped
    ids_TW[torch.rand(T, W, generator=g) < 0.05] = E + 2  # invalid ids: counted, never sent
    ids_TW[(ids_TW == 1).nonzero()[:, 0], 0] = 1  # ties: many slots of expert 1
    w_TW = torch.where(ids_TW < E, torch.rand(T, W, generator=g), 0.0)
    ref = _round(False, x_TH, ids_TW, E, E + extra_slots)
    got = _round(True, x_TH, ids_TW, E, E + extra_slots)
    assert got.counts_SM == ref.counts_SM and got.send_splits == ref.send_splits
    assert got.invalid_pairs == ref.invalid_pairs == int((ids_TW > E).sum())
    assert torch.equal(got.sel_P, ref.sel_P) and torch.equal(got.tok_P, ref.tok_P)
    assert torch.equal(got.x_RH, ref.x_RH) and torch.equal(got.x_RH, x_TH[ref.tok_P])
    assert got.col_P is None and ref.width <= got.width == W  # the kernel path leaves col_P to the combine
    y_PH = got.x_RH * 2
    want = weigh_and_sum(y_PH, ref, w_TW, kernel=False)
    assert torch.equal(weigh_and_sum(y_PH, got, w_TW, kernel=False), want)
    assert torch.equal(want[0], torch.zeros(16))
    # The ids of a kept slot, in send order, are sorted (grouped by expert) with token order inside.
    kept_ids = ids_TW.reshape(-1)[got.sel_P]
    assert (kept_ids[1:] >= kept_ids[:-1]).all()
