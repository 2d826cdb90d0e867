"""The expert-parallel schedule: the slot rule, and overlapped == sequential == the single-device model."""

from pathlib import Path

import pytest
import torch
from scmoe_launch import run_ranks

import moepatch
from moepatch.errors import ModelStateError
from moepatch.scmoe import build_scmoe
from moepatch.scmoe.schedule import ShortcutEP, choose_slot

DIMS = dict(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=48, num_experts=4)


def _brute_force(comp, t_d, t_c):
    costs = [abs(sum(comp[:k]) - t_d) + abs(sum(comp[k:]) - t_c) for k in range(len(comp) + 1)]
    return costs.index(min(costs))


@pytest.mark.parametrize("comp,t_d,t_c,expected", [
    ([1.0, 1.0, 1.0], 1.0, 2.0, 1),  # one op hides the dispatch, two the combine
    ([1.0, 1.0, 1.0], 2.0, 1.0, 2),
    ([1.0, 1.0, 1.0], 0.0, 3.0, 0),  # nothing to hide before: experts first
    ([1.0, 1.0, 1.0], 3.0, 0.0, 3),  # nothing to hide after: experts last
    ([0.2, 3.0, 0.5], 0.3, 0.4, 2),  # 2.9 + 0.1 beats 0.1 + 3.1
    ([], 1.0, 1.0, 0),
])
def test_choose_slot(comp, t_d, t_c, expected):
    assert choose_slot(comp, t_d, t_c) == expected


def test_choose_slot_is_the_argmin():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(0, 6, (1,), generator=g))
        comp = torch.rand(n, generator=g).tolist()
        t_d, t_c = torch.rand(2, generator=g).tolist()
        assert choose_slot(comp, t_d, t_c) == _brute_force(comp, t_d, t_c)


@torch.no_grad()
@pytest.mark.parametrize("kw", [dict(arch="scmoe", position=2), dict(arch="scmoe", position=3, combine="cg2"),
                                dict(arch="scmoe2", position=1, moe_every_layer=True), dict(arch="top2")])
def test_one_rank_schedules_equal_the_model(kw):
    torch.manual_seed(0)
    model = build_scmoe(**kw, **DIMS).eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    ref = model(ids).logits
    ep = ShortcutEP(model)  # no process group: the local dispatcher
    assert torch.equal(ep(ids, schedule="sequential"), ref)
    assert torch.equal(ep(ids, schedule="overlap"), ref)
    timings = ep.calibrate(ids, iters=1)
    for u, t in timings.items():
        assert t.slot == ep.slots[u] == choose_slot(list(t.ops.values()), t.dispatch, t.combine)
    assert torch.equal(ep(ids), ref)


@torch.no_grad()
@pytest.mark.gpu
@pytest.mark.parametrize("after", [0, 1, 2, 99])
def test_one_gpu_side_stream_schedule_equals_sequential(after):
    """On one GPU (local dispatcher) the overlapped schedule runs its dispatch on the side stream,
    with the counting-sort dispatch and the weighted combine kernel: same logits bit for bit, for
    several forwards in a row (buffers of one unit must not be reused under the next), wherever the
    host launches the dispatch among the window's backbone ops (``after``; 99: after all of them),
    the host sending the rows between ops once the header is there; an op that fails in the window
    raises to the caller."""
    torch.manual_seed(0)
    model = build_scmoe(arch="scmoe", position=2, **DIMS).eval().cuda()
    ep = ShortcutEP(model, dispatch_after_ops=after)
    ep.slots = {u: 3 for u in range(len(model.units))}  # the whole window before the experts: 3 ops to launch among
    for seed in range(3):
        ids = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(seed)).cuda()
        seq = ep(ids, schedule="sequential")
        assert torch.equal(ep(ids, schedule="overlap"), seq)
        torch.testing.assert_close(seq, model(ids).logits, rtol=0, atol=1e-4)
    assert ep._side is not None  # the side stream was used
    ctx, h = ep.prepare(ids)
    unit_program = model.unit_program

    def boom():
        raise KeyError("op failed")

    def failing_program(u, h_BSD, ctx):
        prog = unit_program(u, h_BSD, ctx)
        prog.ops[-1] = ("boom", boom)  # the window's last op
        return prog

    model.unit_program = failing_program
    with pytest.raises(KeyError, match="op failed"):
        ep.run_unit(0, h, ctx, "overlap")


@torch.no_grad()
@pytest.mark.gpu
@pytest.mark.parametrize("after", [0, 1, 99])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_gpu_padded_exchange_reads_nothing_back(after, dtype):
    """The fixed-size exchange on one GPU: the overlapped unit equals the sequential one bit for
    bit and the model (float32: 1e-4; bfloat16: its rounding), over several forwards, and queues
    the whole unit with no host sync (torch's sync debug mode raises on one); the counts exchange
    does read its header back, which the same mode reports."""
    torch.manual_seed(0)
    model = build_scmoe(arch="scmoe", position=2, **DIMS).eval().cuda().to(dtype)
    ep = ShortcutEP(model, dispatch_after_ops=after, exchange="padded")
    ep.slots = {u: 3 for u in range(len(model.units))}
    for seed in range(3):
        ids = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(seed)).cuda()
        seq = ep(ids, schedule="sequential")
        assert torch.equal(ep(ids, schedule="overlap"), seq)
        ref = model(ids).logits
        tol = 1e-4 if dtype == torch.float32 else 5e-2 * float(ref.abs().max())
        torch.testing.assert_close(seq, ref, rtol=0, atol=tol)
    ctx, h = ep.prepare(ids)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ep.run_unit(0, h, ctx, "overlap")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(out, ep.run_unit(0, h, ctx, "sequential"), rtol=0, atol=0)
    counts = ShortcutEP(model, dispatch_after_ops=after)
    cctx, ch = counts.prepare(ids)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            counts.run_unit(0, ch, cctx, "overlap")
    finally:
        torch.cuda.set_sync_debug_mode(0)


@torch.no_grad()
@pytest.mark.gpu
@pytest.mark.parametrize("capacity", [None, "drop", "reroute"])
def test_one_gpu_unit_graphs_replay_the_eager_unit(capacity):
    """graphs=True: a signature's first call runs eagerly, the second captures, later ones replay;
    every replay equals the eager unit bit for bit (both schedules, new inputs of the same shape
    copied in), a new shape captures its own graph, and capacity-aware routing replays too."""
    torch.manual_seed(0)
    model = build_scmoe(arch="scmoe", position=2, **DIMS).eval().cuda()
    if capacity:
        moepatch.apply(model, 1.0, strategy=capacity, ep_size=1)
    eager = ShortcutEP(model, exchange="padded")
    graphed = ShortcutEP(model, exchange="padded", graphs=True)
    for shape in ((4, 33), (2, 17)):
        for seed in range(4):
            ids = torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed)).cuda()
            for schedule in ("sequential", "overlap"):
                want = eager(ids, schedule=schedule)
                assert torch.equal(graphed(ids, schedule=schedule), want), (shape, seed, schedule)
    captured = [v for v in graphed._unit_graphs.entries.values() if not isinstance(v, int)]
    assert len(captured) == 2 * 2 * len(model.units)  # shapes x schedules x units


def test_one_rank_refusals():
    torch.manual_seed(0)
    model = build_scmoe(**DIMS)
    ep = ShortcutEP(model)
    with pytest.raises(ModelStateError, match="inference-only"):
        ep.prepare(torch.zeros(1, 4, dtype=torch.long))
    moepatch.apply(model, 1.0, ep_size=2)
    with pytest.raises(ModelStateError, match="ep_size"):
        ShortcutEP(model)
    with pytest.raises(ValueError, match="schedule"), torch.no_grad():
        ep.run_unit(0, torch.zeros(1, 4, 32), None, schedule="later")
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="dispatch_after_ops.*integer >= 0"):
            ShortcutEP(build_scmoe(**DIMS), dispatch_after_ops=bad)
    with pytest.raises(TypeError, match="rows_sender"):  # removed: a helper thread measured no better than polling
        ShortcutEP(build_scmoe(**DIMS), rows_sender="poll")
    with pytest.raises(ValueError, match="exchange='fixed'; accepted: 'counts', 'padded'"):
        ShortcutEP(build_scmoe(**DIMS), exchange="fixed")
    with pytest.raises(ValueError, match="graphs=True needs exchange='padded'"):
        ShortcutEP(build_scmoe(**DIMS), graphs=True)
    cpu_graphs = ShortcutEP(build_scmoe(**DIMS), exchange="padded", graphs=True)
    with torch.no_grad(), pytest.raises(ModelStateError, match="graphs=True replays CUDA graphs.*cpu"):
        cpu_graphs(torch.randint(0, 64, (1, 5)))
    ep = ShortcutEP(build_scmoe(**DIMS), exchange="padded")
    ids = torch.randint(0, 64, (1, 5))
    ctx = ep.model.context(ids, None, None)  # not through ep.prepare: no agreed rows per rank pair
    with pytest.raises(ModelStateError, match="padded exchange needs the forward context of ShortcutEP.prepare"):
        ep.run_unit(0, ep.model.embed_tokens(ids), ctx)


def _check_two_ranks(per_rank, tol, graphs=False):
    for rank, res in enumerate(per_rank):
        assert sorted(res) == sorted(f"{n}/{x}" for n in ("scmoe-pos2-cg1", "scmoe-pos3-cg2", "scmoe2-every-pos1",
                                                          "top2") for x in ("counts", "padded"))
        for name, r in res.items():
            assert r["ref_vs_seq"] <= tol, (rank, name, r)
            assert r["uneven_vs_ref"] <= tol, (rank, name, r)
            assert r["ref_max"] > 0.1 and r["finite"]
            assert r["seq_equals_overlap"] and r["seq_equals_calibrated"], (rank, name)
            assert r["launch_orders"] == [True, True, True], (rank, name)
            if graphs and name.endswith("/padded"):
                assert r["graphs_equal"] == [True] * 6, (rank, name)
        for exchange in ("counts", "padded"):
            cap = res[f"scmoe-pos2-cg1/{exchange}"]
            assert cap["cap_sim_vs_seq"] <= tol and cap["cap_seq_equals_overlap"], (rank, exchange, cap)
            assert cap["cap_dropped"] > 0 and cap["cap_changes_output"] > 1e-4
            assert res[f"scmoe-pos2-cg1/{exchange}"]["ops"]["0"] == ["mlp_l", "attn_l+1", "se_l+1"]
            assert res[f"top2/{exchange}"]["ops"]["0"] == []


@pytest.mark.distributed
def test_two_gloo_ranks_overlap_equals_sequential(tmp_path):
    """2 ranks, both exchanges (counts, padded): each rank's chunk under EP equals the single-device
    forward of the full batch (also with a different batch per rank), the overlapped schedule
    (default and calibrated slots) equals the sequential one bit for bit, and capacity per source
    rank equals the ep_size=2 simulation."""
    _check_two_ranks(run_ranks(Path(__file__).with_name("ep_worker.py"), [], tmp_path, limit_s=90), 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_nccl_ranks_overlap_equals_sequential(tmp_path):
    """The same on 2 GPUs with NCCL: the overlapped schedule's side stream, async all-to-all and
    events give the sequential schedule's output bit for bit (float32; the reference batch is
    computed with other shapes, hence 1e-4); with the padded exchange, units replayed from CUDA
    graphs (the all-to-alls captured too) give the eager output bit for bit."""
    _check_two_ranks(run_ranks(Path(__file__).with_name("ep_worker.py"), ["--cuda"], tmp_path, limit_s=180,
                               timeout_s=60), 1e-4, graphs=True)


@pytest.mark.distributed
@pytest.mark.parametrize("kernel", [False, True], ids=["torch-sort", "kernel-fill"])
def test_two_gloo_ranks_padded_exchange_equals_the_reference(tmp_path, monkeypatch, kernel):
    """The fixed-size exchange on 2 gloo ranks (left in flight, then waited for), on random routing
    with a different token count per rank, all slots on one expert (ties; the other experts
    empty), every slot dropped, dropped and negative ids among kept ones, and no tokens on one
    rank: each rank's combined output equals its float64 reference sum (up to the float32 sum), as
    the counts path's does.  ``kernel-fill``: the send buffers from moepatch.ops' sort and fill
    kernels (CUDA's path; here the Triton interpreter)."""
    if kernel:
        monkeypatch.setenv("MOEPATCH_KERNEL_SORT", "1")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    per_rank = run_ranks(Path(__file__).with_name("padded_worker.py"), [], tmp_path, limit_s=90)
    for rank, res in enumerate(per_rank):
        assert len(res) == 5
        for name, r in res.items():
            assert r["shape_ok"] and r["finite"], (rank, name)
            # (both paths sum the weighted rows in float32, as transformers' experts do)
            assert r["padded"] <= 1e-5 and r["counts"] <= 1e-5, (rank, name, r)
            assert r["rows"][0] == 2 * r["q"]  # Q rows from each of the 2 ranks
        assert res["random"]["ref_max"] > 1 and res["all dropped"]["ref_max"] == 0.0
        assert res["random"]["q"] == 2 * 10  # the most tokens on any rank (10, rank 1) times 2 slots
