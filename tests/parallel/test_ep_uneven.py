"""Uneven work across ranks: different shapes, different numbers of forwards, idle ranks,
ranks that send or receive nothing."""

import pytest

pytestmark = pytest.mark.distributed


def test_uneven_batches_match_per_rank_references(clean_scenarios):
    # rank 0: three forwards of (3, 7), (2, 9), (1, 5); rank 1: one forward of (1, 12).  Equal-chunk
    # simulation does not apply; each rank is compared with its own single-process reference.
    for rank, res in enumerate(r["uneven"] for r in clean_scenarios):
        assert len(res) == 5
        for case, err in res.items():
            assert err <= 1e-5, (rank, case, err)


def test_idle_rank_serves_until_everyone_is_done(clean_scenarios):
    # rank 1 has zero tokens for the whole evaluation, then both generate different lengths.
    r0, r1 = (r["idle"] for r in clean_scenarios)
    assert (r0["forwards"], r1["forwards"]) == (3, 0)
    assert r0["max_abs"] <= 1e-5
    assert r0["generate_equal"] and r1["generate_equal"]
    assert (r0["generated"], r1["generated"]) == (5, 2)


def test_dispatch_edge_cases_match_dense_reference(clean_scenarios):
    per_rank = [r["dispatcher"] for r in clean_scenarios]
    for rank, res in enumerate(per_rank):
        for case, r in res.items():
            tol = 1e-7 if case.endswith("float32") else 2e-2 * max(r["ref_max"], 1e-3)
            assert r["max_abs"] <= tol, (rank, case, r)
            assert r["dtype"].endswith(case.split("/")[1])
        assert res["zero-tokens/float32"]["shape"] == ([4, 32] if rank == 0 else [0, 32])
    # rank 0 dropped every slot: its output is exactly zero
    assert per_rank[0]["all-dropped/float32"]["ref_max"] == 0.0
