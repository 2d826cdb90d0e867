"""One rank of the 2-process LongCat-Flash shortcut-schedule test; writes its measurements as JSON.

Usage: longcat_ep_worker.py OUT_JSON, with RANK, WORLD_SIZE, MASTER_ADDR/PORT set (scmoe_launch.run_ranks).
Every rank builds the same tiny LongcatFlashForCausalLM from the same seed and the same full batch;
it runs its own contiguous chunk under expert parallelism and compares with transformers' own
forward of the full batch in this process.
"""

from __future__ import annotations

import json
import sys

import torch

import moepatch
from moepatch.parallel import init_distributed
from moepatch.scmoe.schedule import ShortcutEP
from moepatch.tiny import tiny_model


def _diff(a, b) -> float:
    return float((a - b).abs().max())


def main(out_path: str) -> None:
    rank, world, _ = init_distributed()
    torch.set_num_threads(1)
    ids_BS = torch.randint(3, 128, (2 * world, 9), generator=torch.Generator().manual_seed(1))
    mask_BS = torch.ones_like(ids_BS)
    mask_BS[1, :3] = 0  # left padding in rank 0's chunk
    mine = slice(2 * rank, 2 * rank + 2)
    model = tiny_model("longcat_flash")
    res = {}
    with torch.no_grad():
        ep = ShortcutEP(model)
        sent, identity = [], []
        complete = ep.dispatcher.complete  # both schedules: begin, then complete

        def counting_complete(hdr):
            d = complete(hdr)
            sent.append(sum(d.send_splits))
            return d

        ep.dispatcher.complete = counting_complete
        for routed in ep.model.moe_layers():  # record each routed branch's decision (ids < 8: computing)
            def gate(x, ctx, orig=routed.gate):
                ids_TW, w_TW = orig(x, ctx)
                identity.append((int((ids_TW < 8).sum()), int((ids_TW >= 8).sum())))
                return ids_TW, w_TW

            routed.gate = gate
        ref = model(ids_BS, attention_mask=mask_BS, use_cache=False).logits[mine]
        seq = ep(ids_BS[mine], mask_BS[mine], schedule="sequential")
        ov = ep(ids_BS[mine], mask_BS[mine], schedule="overlap")
        timings = ep.calibrate(ids_BS[mine], mask_BS[mine], iters=2)
        ov_cal = ep(ids_BS[mine], mask_BS[mine], schedule="overlap")
        res.update(ref_vs_seq=_diff(ref, seq), seq_equals_overlap=bool(torch.equal(seq, ov)),
                   seq_equals_calibrated=bool(torch.equal(seq, ov_cal)), ref_max=float(ref.abs().max()),
                   ops={str(u): list(t.ops) for u, t in timings.items()},
                   sent_rows=sent[:2], native_pairs=identity[:2])
        handle = moepatch.apply(model, capacity_factor=0.75, ep_size=world)
        sim = model(ids_BS, attention_mask=mask_BS, use_cache=False).logits[mine]  # ep_size=world simulation
        sim_records = [r.to_dict() for r in handle.stats().records]
        handle.reset_stats()
        cap_ep = ShortcutEP(model)
        cseq = cap_ep(ids_BS[mine], mask_BS[mine], schedule="sequential")
        cov = cap_ep(ids_BS[mine], mask_BS[mine], schedule="overlap")
        ep_records = [r.to_dict() for r in handle.stats().records]
        res.update(cap_sim_vs_seq=_diff(sim, cseq), cap_seq_equals_overlap=bool(torch.equal(cseq, cov)),
                   cap_changes_output=_diff(cseq, seq), sim_records=sim_records, ep_records=ep_records)
        # The fixed-size exchange: identity experts computed at the source there too.
        pep = ShortcutEP(model, exchange="padded")
        pseq = pep(ids_BS[mine], mask_BS[mine], schedule="sequential")
        res.update(padded_cap_vs_sim=_diff(sim, pseq),
                   padded_cap_seq_equals_overlap=bool(torch.equal(pseq, pep(ids_BS[mine], mask_BS[mine]))))
        handle.remove()
        pseq = pep(ids_BS[mine], mask_BS[mine], schedule="sequential")
        res.update(padded_ref_vs_seq=_diff(ref, pseq),
                   padded_seq_equals_overlap=bool(torch.equal(pseq, pep(ids_BS[mine], mask_BS[mine]))))
    with open(out_path, "w") as f:
        json.dump(res, f)
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
