"""One rank of the 2-process ScMoE expert-parallel test; writes its measurements as JSON.

Usage: ep_worker.py OUT_JSON [--cuda], with RANK, WORLD_SIZE, MASTER_ADDR/PORT set (scmoe_launch.run_ranks).
gloo on the CPU, or with --cuda NCCL with one GPU per rank (the overlapped schedule's side stream).
Every rank builds the same model from the same seed and the same full batch; it runs its own
contiguous chunk under expert parallelism and compares with the single-process forward of the
full batch, computed in this process (ranks exchange nothing but the traffic under test).
"""

from __future__ import annotations

import json
import sys

import torch

import moepatch
from moepatch.parallel import init_distributed
from moepatch.scmoe import build_scmoe
from moepatch.scmoe.schedule import ShortcutEP

VARIANTS = {
    "scmoe-pos2-cg1": dict(arch="scmoe", position=2, combine="cg1"),
    "scmoe-pos3-cg2": dict(arch="scmoe", position=3, combine="cg2"),
    "scmoe2-every-pos1": dict(arch="scmoe2", position=1, combine="add", moe_every_layer=True),
    "top2": dict(arch="top2"),
}
DIMS = dict(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=48, num_experts=5)


def _diff(a, b) -> float:
    return float((a - b).abs().max())


def _variant(model, exchange, ids_BS, mask_BS, mine, rank, world, with_capacity) -> dict:
    ep = ShortcutEP(model, exchange=exchange)
    with torch.no_grad():
        ref = model(ids_BS, attention_mask=mask_BS).logits[mine]
        seq = ep(ids_BS[mine], mask_BS[mine], schedule="sequential")
        ov = ep(ids_BS[mine], mask_BS[mine], schedule="overlap")
        timings = ep.calibrate(ids_BS[mine], mask_BS[mine], iters=2)
        ov_cal = ep(ids_BS[mine], mask_BS[mine], schedule="overlap")
        # Where the host launches the dispatch among the window's ops (0: first; 99: after all of
        # them) must not change the output (on NCCL; gloo has one path).
        orders = []
        for after in (0, 99, 1):
            ep.dispatch_after_ops = after
            orders.append(bool(torch.equal(seq, ep(ids_BS[mine], mask_BS[mine], schedule="overlap"))))
        # Ranks with different batches (rank 0 runs both of its sequences, the others one): the
        # exchanges still agree on their sizes.
        n = max(1, 2 - rank)
        uneven = ep(ids_BS[mine][:n], mask_BS[mine][:n], schedule="overlap")
        r = dict(ref_vs_seq=_diff(ref, seq), seq_equals_overlap=bool(torch.equal(seq, ov)), launch_orders=orders,
                 seq_equals_calibrated=bool(torch.equal(seq, ov_cal)), ref_max=float(ref.abs().max()),
                 uneven_vs_ref=_diff(uneven, ref[:n]), finite=bool(torch.isfinite(seq).all()),
                 slots={str(u): t.slot for u, t in timings.items()},
                 ops={str(u): list(t.ops) for u, t in timings.items()})
        if exchange == "padded" and ids_BS.is_cuda:  # CUDA graphs: eager, capture, replays = the eager unit
            gep = ShortcutEP(model, exchange="padded", graphs=True)
            r["graphs_equal"] = [bool(torch.equal(gep(ids_BS[mine], mask_BS[mine], schedule=sch), want))
                                 for sch, want in (("sequential", seq), ("overlap", ov)) for _ in range(3)]
        if with_capacity:
            handle = moepatch.apply(model, 1.0, ep_size=world)
            sim = model(ids_BS, attention_mask=mask_BS).logits[mine]  # ep_size=world simulation
            handle.reset_stats()
            cseq = ep(ids_BS[mine], mask_BS[mine], schedule="sequential")
            cov = ep(ids_BS[mine], mask_BS[mine], schedule="overlap")
            st = handle.stats().totals()
            r.update(cap_sim_vs_seq=_diff(sim, cseq), cap_seq_equals_overlap=bool(torch.equal(cseq, cov)),
                     cap_dropped=st["dropped_fraction"], cap_changes_output=_diff(cseq, seq))
            handle.remove()
    return r


def main(out_path: str, cuda: bool = False) -> None:
    rank, world, device = init_distributed("nccl" if cuda else "gloo")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    ids_BS = torch.randint(0, 64, (2 * world, 9), generator=g).to(device)
    mask_BS = torch.ones_like(ids_BS)
    mask_BS[1, -3:] = 0  # right padding in rank 0's chunk: neither attended nor routed under capacity
    mine = slice(2 * rank, 2 * rank + 2)
    res = {}
    for name, kw in VARIANTS.items():
        for exchange in ("counts", "padded"):
            torch.manual_seed(0)
            model = build_scmoe(**kw, **DIMS).eval().to(device)
            res[f"{name}/{exchange}"] = _variant(model, exchange, ids_BS, mask_BS, mine, rank, world,
                                                 name == "scmoe-pos2-cg1")
    with open(out_path, "w") as f:
        json.dump(res, f)
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], cuda="--cuda" in sys.argv[2:])
