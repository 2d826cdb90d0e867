"""moepatch.ops.reference against a hand-written per-token loop."""

import pytest
import torch
import torch.nn.functional as F

from moepatch.ops.reference import expert_mlp, reference_experts, sum_slots


def _weights(E, D, I, dtype, seed=0):  # noqa: E741
    g = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(E, 2 * I, D, generator=g) / D ** 0.5).to(dtype)
    down = (torch.randn(E, D, I, generator=g) / I ** 0.5).to(dtype)
    return gate_up, down


def _by_hand(x_TD, ids_TW, w_TW, gate_up, down, act=F.silu):
    E = gate_up.shape[0]
    out = torch.zeros(x_TD.shape, dtype=torch.float32)
    for t in range(x_TD.shape[0]):
        for j in range(ids_TW.shape[1]):
            e = int(ids_TW[t, j])
            if not 0 <= e < E:
                continue
            gate, up = (gate_up[e] @ x_TD[t]).chunk(2)
            y = down[e] @ (act(gate) * up)
            out[t] += (y * w_TW[t, j]).to(x_TD.dtype).float()
    return out.to(x_TD.dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("T", [0, 1, 13])
def test_matches_per_token_loop(dtype, tol, T):
    E, D, I, W = 5, 8, 6, 3  # noqa: E741
    gate_up, down = _weights(E, D, I, dtype)
    g = torch.Generator().manual_seed(1)
    x_TD = torch.randn(T, D, generator=g).to(dtype)
    ids_TW = torch.randint(0, E - 1, (T, W), generator=g)  # expert E-1 stays empty
    if T:
        ids_TW[0] = torch.tensor([E, 2, E])  # sentinel (dropped) slots
        ids_TW[-1] = torch.tensor([1, 1, 3])  # one expert twice for a token
    w_TW = torch.rand(T, W, generator=g)
    got = reference_experts(x_TD, ids_TW, w_TW, gate_up, down)
    assert got.shape == (T, D) and got.dtype == dtype
    torch.testing.assert_close(got, _by_hand(x_TD, ids_TW, w_TW, gate_up, down), rtol=tol, atol=tol)


def test_all_dropped_and_negative_ids_give_zero():
    gate_up, down = _weights(3, 4, 2, torch.float32)
    x_TD = torch.randn(4, 4)
    ids_TW = torch.tensor([[3, 3], [-1, 3], [3, 7], [3, 3]])
    got = reference_experts(x_TD, ids_TW, torch.ones(4, 2), gate_up, down)
    assert torch.equal(got, torch.zeros(4, 4))


def test_apply_gate_and_act():
    E, D, I = 3, 6, 4  # noqa: E741
    gate_up, down = _weights(E, D, I, torch.float32)
    x_RD = torch.randn(7, D)
    ref = expert_mlp(x_RD, gate_up[1], down[1], act=F.gelu)
    torch.testing.assert_close(ref, _by_hand(x_RD, torch.ones(7, 1, dtype=torch.long), torch.ones(7, 1),
                                             gate_up, down, act=F.gelu))

    def glu(h_RX):
        gate, up = h_RX.chunk(2, dim=-1)
        return F.gelu(gate) * up

    assert torch.equal(expert_mlp(x_RD, gate_up[1], down[1], apply_gate=glu), ref)
    ids_TW = torch.tensor([[1], [2], [0], [1], [2], [0], [1]])
    torch.testing.assert_close(reference_experts(x_RD, ids_TW, torch.ones(7, 1), gate_up, down, apply_gate=glu),
                               _by_hand(x_RD, ids_TW, torch.ones(7, 1), gate_up, down, act=F.gelu))


def test_sum_slots_is_float32_in_slot_order():
    y_TWD = torch.tensor([[[1.0], [2.0 ** -8], [2.0 ** -8]]], dtype=torch.bfloat16)
    # bf16 accumulation would round 1 + 2^-8 back to 1 twice; float32 keeps 1 + 2^-7.
    assert sum_slots(y_TWD).item() == 1.0 + 2.0 ** -7
    assert sum_slots(y_TWD, torch.float32).dtype == torch.float32
