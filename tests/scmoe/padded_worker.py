"""One rank of the 2-process test of the fixed-size (padded) exchange against a float64 reference.

Usage: padded_worker.py OUT_JSON, with RANK, WORLD_SIZE, MASTER_ADDR/PORT set (scmoe_launch.run_ranks).
Every routing case goes through ``begin_padded`` (in flight, then waited for) and, for comparison,
through the header-and-counts ``dispatch``; the "experts" are y = x * (e + 1) + e for global expert
e, so every row's result says which expert computed it.  Each rank checks its own combined output
against the sum it computes locally.
"""

from __future__ import annotations

import json
import sys

import torch

from moepatch.parallel import init_distributed
from moepatch.parallel.collectives import AsyncAllToAllDispatcher

E, H = 5, 6  # 5 experts over 2 ranks: 3 and 2


def _fake_experts(x_NH, local_N, first):
    e_N = (local_N + first).to(x_NH.dtype)[:, None]
    return x_NH * (e_N + 1) + e_N


def _reference(x_TH, ids_TW, w_TW):
    kept = (ids_TW >= 0) & (ids_TW < E)
    e = ids_TW.clamp(0, E - 1).to(x_TH.dtype)[..., None]
    y = x_TH[:, None, :] * (e + 1) + e
    return (torch.where(kept[..., None], y, 0) * w_TW[..., None]).sum(1)


def _cases(rank: int, g: torch.Generator):
    T = 7 + 3 * rank
    yield "random", torch.randint(0, E, (T, 2), generator=g)
    yield "one expert (ties, the rest empty)", torch.zeros(T, 1, dtype=torch.long)
    yield "all dropped", torch.full((T, 2), E)
    mixed = torch.randint(-1, E + 1, (T, 3), generator=g)
    yield "dropped and negative ids among kept ones", mixed
    yield "no tokens on rank 1", torch.randint(0, E, (0 if rank == 1 else T, 2), generator=g)


def main(out_path: str) -> None:
    rank, world, device = init_distributed("gloo")
    torch.set_num_threads(1)
    disp = AsyncAllToAllDispatcher(header_slots=-(-E // world))
    first = disp.local_experts(E).start
    g = torch.Generator().manual_seed(10 + rank)
    res = {}
    for name, ids_TW in _cases(rank, g):
        T, W = ids_TW.shape
        x_TH = torch.randn(T, H, generator=g, dtype=torch.float64)
        w_TW = torch.rand(T, W, generator=g, dtype=torch.float64)
        q = int(disp.reduce_max([float(T * W)])[0])
        with disp.in_flight():
            r = disp.begin_padded(x_TH, ids_TW, num_experts=E, tag=0, slots_per_peer=q)
        disp.take_pending().wait()
        y_NH = torch.where((r.local_N < E)[:, None], _fake_experts(r.x_NH, r.local_N, first), 0)
        from moepatch.parallel.dispatch import weigh_padded

        padded = weigh_padded(disp.return_padded(y_NH, r), r, w_TW)
        # The counts path: sentinel E for every slot it must not send (it rejects negative ids).
        d = disp.dispatch(x_TH, torch.where((ids_TW >= 0) & (ids_TW < E), ids_TW, E), num_experts=E, tag=0)
        local_R = torch.cat([torch.arange(len(c)).repeat_interleave(torch.tensor(c)) for c in d.counts_SM])
        counts = disp.combine(_fake_experts(d.x_RH, local_R, first), d, w_TW)
        ref = _reference(x_TH, ids_TW, w_TW)
        res[name] = dict(padded=float((padded - ref).abs().max()) if T else 0.0,
                         counts=float((counts - ref).abs().max()) if T else 0.0,
                         rows=list(r.x_NH.shape), q=q, finite=bool(torch.isfinite(padded).all()),
                         shape_ok=tuple(padded.shape) == (T, H), ref_max=float(ref.abs().max()) if T else 0.0)
    with open(out_path, "w") as f:
        json.dump(res, f)
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
