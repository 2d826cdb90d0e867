"""LongCat-Flash under ShortcutEP: every decoder layer is a Pos-2 shortcut unit whose routed branch
is transformers' LongcatFlashMoE; identity experts stay at the source rank."""

from pathlib import Path

import pytest
import torch
from scmoe_launch import run_ranks

import moepatch
from moepatch.errors import ModelStateError
from moepatch.scmoe.schedule import ShortcutEP
from moepatch.tiny import tiny_model

E = 8  # computing experts of the tiny model (ids 8, 9: identity experts)


@pytest.fixture(scope="module")
def model():
    return tiny_model("longcat_flash")


def _batch():
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


@torch.no_grad()
def test_one_rank_schedules_equal_transformers(model):
    ids, mask = _batch()
    ep = ShortcutEP(model)  # no process group: the local dispatcher
    sent = []
    begin = ep.dispatcher.begin  # both schedules send through the dispatcher's first half
    ep.dispatcher.begin = lambda x, ids_TW, **kw: sent.append(ids_TW.clone()) or begin(x, ids_TW, **kw)
    for am in (None, mask):
        ref = model(ids, attention_mask=am, use_cache=False).logits
        seq = ep(ids, am, schedule="sequential")
        torch.testing.assert_close(seq, ref, rtol=0, atol=1e-6)
        assert torch.equal(ep(ids, am, schedule="overlap"), seq)
    # Identity experts are never dispatched: only computing ids (< E) or the sentinel E go out.
    assert all(int(s.max()) <= E for s in sent) and any(bool((s == E).any()) for s in sent)
    timings = ep.calibrate(ids, mask, iters=1)
    assert [list(t.ops) for t in timings.values()] == [["mlp_l", "attn_l+1", "se_l+1"]] * 2
    assert torch.equal(ep(ids, mask), ep(ids, mask, schedule="sequential"))


@torch.no_grad()
def test_one_rank_capacity_equals_the_patched_model(model):
    ids, mask = _batch()
    base = model(ids, attention_mask=mask, use_cache=False).logits
    with moepatch.patched(model, capacity_factor=0.5, strategy="reroute") as handle:
        ref = model(ids, attention_mask=mask, use_cache=False).logits
        n = len(handle.stats().records)
        handle.reset_stats()
        out = ShortcutEP(model)(ids, mask, schedule="overlap")
        assert len(handle.stats().records) == n == 2
        assert handle.stats().records[0].rerouted_pairs > 0
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert (out - base).abs().max() > 1e-4
    with moepatch.patched(model, capacity_factor=1.0, ep_size=2), pytest.raises(ModelStateError, match="ep_size"):
        ShortcutEP(model)


@pytest.mark.distributed
def test_two_gloo_ranks_overlap_equals_sequential_and_transformers(tmp_path):
    """2 ranks: each rank's chunk under EP equals transformers' forward of the full batch, overlap
    equals sequential bit for bit, identity pairs are never sent, and capacity per source rank
    (moepatch.apply with ep_size=2) equals the one-process ep_size=2 simulation; the same with the
    fixed-size exchange."""
    per_rank = run_ranks(Path(__file__).with_name("longcat_ep_worker.py"), [], tmp_path, limit_s=90)
    for rank, r in enumerate(per_rank):
        assert r["ref_vs_seq"] <= 1e-5 and r["ref_max"] > 0.1, (rank, r["ref_vs_seq"])
        assert r["seq_equals_overlap"] and r["seq_equals_calibrated"], rank
        assert r["ops"]["0"] == ["mlp_l", "attn_l+1", "se_l+1"]
        # Rows this rank sent per layer = its native pairs on computing experts (no capacity).
        assert r["sent_rows"] == [computing for computing, _ in r["native_pairs"]], rank
        assert all(identity > 0 for _, identity in r["native_pairs"])
        assert r["cap_sim_vs_seq"] <= 1e-5 and r["cap_seq_equals_overlap"], rank
        assert r["cap_changes_output"] > 1e-4
        # The fixed-size exchange gives the same outputs, with and without capacity.
        assert r["padded_ref_vs_seq"] <= 1e-5 and r["padded_seq_equals_overlap"], rank
        assert r["padded_cap_vs_sim"] <= 1e-5 and r["padded_cap_seq_equals_overlap"], rank
        # The simulation's record covers both ranks' chunks: its per-group capacity is this rank's.
        for sim, ep in zip(r["sim_records"], r["ep_records"]):
            assert ep["capacity"] == [sim["capacity"][rank]]
            assert ep["dropped_pairs"] > 0 and ep["identity_pairs"] > 0
    for layer in range(2):
        sim = per_rank[0]["sim_records"][layer]
        assert sum(r["ep_records"][layer]["dropped_pairs"] for r in per_rank) == sim["dropped_pairs"]
        assert sum(r["ep_records"][layer]["identity_pairs"] for r in per_rank) == sim["identity_pairs"]
