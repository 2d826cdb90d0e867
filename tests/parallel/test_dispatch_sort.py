"""The dispatcher's two slot sorts agree: moepatch.ops' counting-sort kernels (CUDA default; here
the Triton interpreter) and the torch stable sort (CPU default)."""

import pytest
import torch

from moepatch.parallel.dispatch import LocalDispatcher, weigh_and_sum


def _round(sort_with_kernel: bool, x_TH, ids_TW, E, header_slots):
    disp = LocalDispatcher(header_slots=header_slots, kernel_sort=sort_with_kernel)
    return disp.dispatch(x_TH, ids_TW, num_experts=E, tag=3)


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
    # Every slot's row among the sent rows (-1: not sent), and the kernel combine reading it.
    want_pos = torch.full((T * W,), -1, dtype=torch.long)
    want_pos[got.sel_P] = torch.arange(got.sel_P.numel())
    assert torch.equal(got.pos_P, want_pos) and ref.pos_P is None
    torch.testing.assert_close(weigh_and_sum(y_PH, got, w_TW, kernel=True), want, rtol=1e-6, atol=1e-6)
    # The ids of a kept slot, in send order, are sorted (grouped by expert) with token order inside.
    kept_ids = ids_TW.reshape(-1)[got.sel_P]
    assert (kept_ids[1:] >= kept_ids[:-1]).all()


@pytest.mark.parametrize("E,D", [(7, 3), (8, 2), (5, 1)])
def test_ep_prepare_builds_the_header_of_every_destination(E, D):
    """One kernel: header rows (fixed values, then pairs per destination's local expert, zeros where
    a rank hosts fewer experts), pairs per destination, invalid slots, each row's pair and token."""
    from moepatch.ops.experts import dispatch, ep_prepare
    from moepatch.routing.capacity import expert_devices

    T, W = 300, 3
    g = torch.Generator().manual_seed(E * 10 + D)
    ids_TW = torch.randint(0, E, (T, W), generator=g)
    ids_TW[torch.rand(T, W, generator=g) < 0.2] = E
    ids_TW[torch.rand(T, W, generator=g) < 0.05] = -1  # invalid: never sent, counted
    dev_E = expert_devices(E, D)
    first_D = torch.searchsorted(dev_E, torch.arange(D))
    local_E = torch.arange(E) - first_D[dev_E]
    M = int(local_E.max()) + 2  # one header slot more than any rank needs
    fixed = torch.tensor([1, 4, 2, 64])
    layout = dispatch(ids_TW, E, 1, fuse=False)
    header, meta, order_P, tok_P, pos_P = ep_prepare(ids_TW, layout, dev_E, local_E, fixed, D, M)
    count_E = torch.bincount(ids_TW[(ids_TW >= 0) & (ids_TW < E)], minlength=E)
    want = torch.zeros(D, 4 + M, dtype=torch.long)
    want[:, :4] = fixed
    want[dev_E, 4 + local_E] = count_E
    assert torch.equal(header, want)
    per_rank = torch.zeros(D, dtype=torch.long).index_add_(0, dev_E, count_E)
    assert meta.tolist() == per_rank.tolist() + [int((ids_TW < 0).sum())]
    kept = int(count_E.sum())
    assert torch.equal(order_P[:kept], layout.sorted_pairs_R[:kept].long()) and (order_P[kept:] == T * W).all()
    assert torch.equal(tok_P, order_P // W)
    want_pos = torch.full((T * W,), -1, dtype=torch.long)
    want_pos[order_P[:kept]] = torch.arange(kept)
    assert torch.equal(pos_P, want_pos)


@pytest.mark.parametrize("T,W,E,D", [(1, 1, 2, 2), (37, 2, 5, 2), (100, 3, 8, 3), (64, 1, 4, 4), (50, 2, 3, 4)])
def test_padded_send_kernel_equals_torch(T, W, E, D):
    """The fixed-size exchange's send buffers: the one-kernel fill (Triton interpreter here) equals
    the torch stable-sort path, and both put every kept slot's token row and local expert id in
    its expert's rank block, packed at the block's start in (expert, pair) order; dropped, invalid
    and negative ids send nothing (-1).  Includes ties, a token with every slot dropped, and more
    ranks than experts (a rank with none)."""
    from moepatch.parallel.dispatch import Dispatcher

    g = torch.Generator().manual_seed(T * 7 + D)
    x_TH = torch.randn(T, 24, generator=g)
    ids_TW = torch.randint(0, E, (T, W), generator=g)
    ids_TW[torch.rand(T, W, generator=g) < 0.3] = E
    ids_TW[torch.rand(T, W, generator=g) < 0.05] = -1
    ids_TW[torch.rand(T, W, generator=g) < 0.05] = E + 2
    ids_TW[0] = E
    if T > 2:
        ids_TW[1:T // 2, 0] = 1  # ties
    M = -(-E // D)
    Q = T * W
    out = {}
    for kernel in (False, True):
        disp = Dispatcher(0, D, M, kernel_sort=kernel)  # the send side only: no exchange
        out[kernel] = disp._padded_send(x_TH, ids_TW, E, Q)
    (send_t, local_t, dest_t), (send_k, local_k, dest_k) = out[False], out[True]
    assert send_t.shape == send_k.shape == (D * Q, 24) and local_t.shape == local_k.shape == (D * Q, 1)
    assert torch.equal(dest_k, dest_t) and torch.equal(local_k, local_t)
    used = local_t[:, 0] < M
    assert torch.equal(send_k[used], send_t[used])
    flat = ids_TW.reshape(-1)
    kept = (flat >= 0) & (flat < E)
    assert torch.equal(dest_t >= 0, kept)
    dev_E, local_E, _ = disp.placement(E, torch.device("cpu"))
    p = kept.nonzero()[:, 0]
    assert torch.equal(dest_t[p] // Q, dev_E[flat[p]])
    assert torch.equal(send_t[dest_t[p]], x_TH[p // W]) and torch.equal(local_t[dest_t[p], 0], local_E[flat[p]])
    assert int(used.sum()) == p.numel()
    for d in range(D):  # packed at the block's start, sorted by expert, pair order inside
        mine = p[dev_E[flat[p]] == d]
        assert sorted((dest_t[mine] - d * Q).tolist()) == list(range(mine.numel()))
        by_row = mine[torch.argsort(dest_t[mine])]
        assert by_row.tolist() == sorted(by_row.tolist(), key=lambda q: (int(flat[q]), q))
