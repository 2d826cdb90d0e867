"""ScMoE under expert parallelism: per-unit time of the top-2 MoE vs ScMoE, and how much all-to-all the overlap hides.

One unit = a dense block and an MoE block (the shape of the paper's alternating decoder).  For
each shape, on every rank (data parallel backbone, experts split over the ranks):

* ``top2`` (the baseline: top-2 routed experts on the MoE block's own state; nothing to overlap),
* ``scmoe`` Pos-2 CG-1 with the *sequential* schedule (dispatch, experts, combine, then the
  backbone): the architecture's gain alone (half the routed rows, same FLOPs: a shared expert of
  one expert's width plus top-1),
* ``scmoe`` with the *overlapped* schedule (moepatch.scmoe.schedule): the overlap's gain on top.

each with the exchanges of ``--exchange`` (default on GPUs ``graphs,counts``: the fixed-size
exchange with every unit replayed from a CUDA graph, the headline, and the header-and-counts
exchange run eagerly; top-2 runs with each and the fastest top-2 is the baseline).

Reported per variant: the unit time of both schedules, timed in alternating rounds (each run
after a barrier, the slowest rank's time, medians over rounds; "saved" is the median of the
paired differences sequential − overlap), the all-to-all time (the unit's exchanges alone, with
the sizes the variant sends, after a barrier: header or ids + rows out, rows back; ``ShortcutEP.time_exchanges``),
the fraction of it the overlap hides (saved / all-to-all, clipped to [0, 1]; saved can exceed it
when the overlap also takes the dispatch's sorting, gathering and host sync off the critical
path; the phase times of the sequential schedule are in the JSON as dispatch_ms / combine_ms), the slot K
chosen by the paper's rule, and speedups.  Before timing, each variant's expert-parallel unit
output must equal the single-device unit on the same tokens (and overlap must equal sequential
bit for bit), or the benchmark stops.

    torchrun --nproc_per_node 2 scripts/bench_scmoe.py --out results/bench_scmoe      # 2 GPUs, NCCL
    python3 scripts/bench_scmoe.py --smoke --out /tmp/bench_scmoe                      # CPU, 2 gloo ranks

Started without a launcher it starts torchrun itself (``--nproc`` ranks, default one per GPU, 2 on
a CPU machine), killed after ``--limit-s`` seconds.  ``--profile-dir`` also writes a torch.profiler
trace of each schedule and reads its exposed NCCL time (scripts/traces.py).  Writes ``bench_scmoe.json`` and
``bench_scmoe.md`` to ``--out`` and prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (str(REPO), str(REPO / "scripts")):  # a checkout runs without installing; scripts/ is no package
    if _path not in sys.path:
        sys.path.insert(0, _path)

import moepatch  # noqa: E402,I001
from moepatch.arguments import ArgumentParser, HelpFormatter  # noqa: E402
from traces import (  # noqa: E402
    add_profile_arguments, call_exposures, check_counts, exposed_communication, profile_calls, rank_exposures)

# name: (hidden, expert/dense width, query heads, kv heads, experts, batch per rank, sequence)
SHAPES = {
    # Mixtral-8x7B layer dimensions: expert compute dwarfs the all-to-all on NVLink.
    "mixtral": (4096, 14336, 32, 8, 8, 4, 2048),
    # Narrower experts (as in fine-grained MoEs): the all-to-all is a larger share of the unit.
    "narrow": (2048, 1024, 16, 4, 8, 8, 2048),
    # The narrow layer on one sequence per rank: a short unit, where the host's launches matter.
    "small": (2048, 1024, 16, 4, 8, 1, 2048),
}
SMOKE_SHAPE = ("smoke", (32, 48, 4, 2, 4, 2, 16))


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shapes", default="mixtral,narrow", help=f"comma-separated, from {', '.join(SHAPES)}")
    p.add_argument("--iters", type=int, default=30, help="rounds of the paired sequential/overlap timing")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--calibrate-iters", type=int, default=5)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="on GPUs; the CPU smoke run uses float32")
    p.add_argument("--priorities", default="high,default",
                   help="NCCL stream priorities to time the ScMoE variant under (comma-separated: high, default); "
                        "the first is the headline and runs top-2 too; ignored under gloo")
    p.add_argument("--dispatch-after-ops", default="1",
                   help="backbone ops the host queues before launching the overlapped dispatch "
                        "(ShortcutEP.dispatch_after_ops; comma-separated to compare, the first is the headline; "
                        "a value >= the slot K is the older order: the whole window, then a blocking header wait)")
    p.add_argument("--exchange", default=None,
                   help="how the ScMoE dispatch sends its rows (ShortcutEP.exchange: counts = a header of counts, "
                        "read on the host, then exact split sizes; padded = fixed-size blocks, nothing read back; "
                        "graphs = padded, each unit replayed from a CUDA graph, ShortcutEP(graphs=True)); "
                        "comma-separated to compare, the first is the headline; top-2 runs with each, and the "
                        "fastest is the baseline; default graphs,counts on GPUs, counts under gloo)")
    p.add_argument("--router", default="init", choices=("init", "unbiased"),
                   help="routers as initialised (the mean of the routed states then adds a fixed bias per expert "
                        "and ScMoE's top-1 is the more imbalanced), or unbiased (the router's rows made orthogonal "
                        "to that mean over all ranks' tokens: no expert favoured, loads even in expectation, as a "
                        "balance loss keeps trained routers)")
    p.add_argument("--capacity", default=None, metavar="STRATEGY@GAMMA",
                   help="capacity-aware routing on both variants' MoE layers, per source rank (e.g. reroute@1.0: "
                        "every expert gets at most its even share, so top-2 and ScMoE compare at balanced loads; "
                        "changes the outputs); default none")
    p.add_argument("--smoke", action="store_true", help="tiny shape, a few iterations, gloo on the CPU")
    p.add_argument("--limit-s", type=float, default=None,
                   help="wall-clock limit of a self-started torchrun (default: 600, smoke 180)")
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks of a self-started torchrun (default: one per GPU, 2 on a CPU machine)")
    add_profile_arguments(p)
    args = p.parse_args(argv)
    check_counts(p, args)
    if args.smoke:
        args.iters, args.warmup, args.calibrate_iters = 3, 1, 2
    names = [s for s in args.shapes.split(",") if s]
    if not args.smoke and (not names or any(s not in SHAPES for s in names)):
        p.error(f"--shapes {args.shapes!r}: accepted {', '.join(SHAPES)}")
    args.capacity_spec = None
    if args.capacity:
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        from moepatch.routing import STRATEGIES

        strategy, _, gamma = args.capacity.partition("@")
        try:
            args.capacity_spec = (strategy, float(gamma))
        except ValueError:
            args.capacity_spec = None
        if strategy not in STRATEGIES or args.capacity_spec is None or not args.capacity_spec[1] > 0:
            p.error(f"--capacity {args.capacity!r}: accepted STRATEGY@GAMMA with STRATEGY one of "
                    f"{', '.join(STRATEGIES)} and GAMMA > 0 (e.g. reroute@1.0)")
    args.shape_list = [SMOKE_SHAPE] if args.smoke else [(s, SHAPES[s]) for s in names]
    args.priority_list = [s for s in args.priorities.split(",") if s]
    try:
        args.after_list = [int(v) for v in args.dispatch_after_ops.split(",") if v]
    except ValueError:
        args.after_list = []
    args.exchange_list = [v for v in args.exchange.split(",") if v] if args.exchange is not None else None
    if args.exchange_list is not None and (
            not args.exchange_list or any(v not in ("counts", "padded", "graphs") for v in args.exchange_list)):
        p.error(f"--exchange {args.exchange!r}: accepted counts, padded, graphs (comma-separated)")
    if not args.after_list or min(args.after_list) < 0:
        p.error(f"--dispatch-after-ops {args.dispatch_after_ops!r}: accepted non-negative integers, comma-separated")
    if not args.priority_list or any(s not in ("high", "default") for s in args.priority_list):
        p.error(f"--priorities {args.priorities!r}: accepted high, default (comma-separated)")
    return args


def _unit_single_device(model, u, h_BSD, ctx):
    """The unit on one device (all experts local), the reference for the expert-parallel output."""
    prog = model.unit_program(u, h_BSD, ctx)
    routed = prog.moe(prog.x_s_TD, ctx)
    for _, op in prog.ops:
        op()
    return prog.merge(routed)


def run(args) -> int:
    import torch
    import torch.distributed as dist

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from moepatch.parallel import init_distributed
    from moepatch.parallel.distributed import new_group_with_priority
    from moepatch.scmoe import ScMoEConfig, ScMoEForCausalLM
    from moepatch.scmoe.schedule import ShortcutEP

    rank, world, device = init_distributed()
    cuda = device.type == "cuda"
    if args.exchange_list is None:
        args.exchange_list = ["graphs", "counts"] if cuda else ["counts"]
    elif "graphs" in args.exchange_list and not cuda:
        raise SystemExit("--exchange graphs replays CUDA graphs: it needs GPUs (under gloo: counts, padded)")
    nccl = dist.get_backend() == "nccl"
    # One group per NCCL stream priority (same ranks), made up front: every rank makes them in order.
    groups = {p: new_group_with_priority(p == "high") for p in args.priority_list} if nccl else {"n/a": None}
    dtype = getattr(torch, args.dtype) if cuda else torch.float32
    if not cuda:
        torch.set_num_threads(1)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def max_over_ranks(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def every_rank(values: list[float]) -> list[list[float]]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        out = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(out, t)
        return [o.tolist() for o in out]

    def time_pair(fn_a, fn_b, iters: int, warmup: int) -> tuple[float, float, float]:
        """Both schedules in alternating rounds (order swapped every round), each run after a barrier:
        medians of the slowest rank's times of a and b, and the median of the paired differences a - b
        (seconds).  Pairing cancels the drift (clocks, power) that separate runs would put between them."""
        a, b = [], []
        for i in range(warmup + iters):
            runs = ((fn_a, a), (fn_b, b)) if i % 2 == 0 else ((fn_b, b), (fn_a, a))
            for fn, acc in runs:
                dist.barrier()
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                if i >= warmup:
                    acc.append(time.perf_counter() - t0)
        a, b = max_over_ranks(a), max_over_ranks(b)
        return statistics.median(a), statistics.median(b), statistics.median(x - y for x, y in zip(a, b))

    def bench_variant(shape_name, dims, variant, kw, priority, after_ops, exchange) -> dict:
        """Check, calibrate and time one variant's unit (its exchanges on the group of NCCL stream
        ``priority``); the row of the report."""
        D, inter, hq, hk, E, batch, seq = dims
        cfg = ScMoEConfig(vocab_size=256, hidden_size=D, num_layers=2, num_heads=hq, num_kv_heads=hk,
                          intermediate_size=inter, num_experts=E, max_position_embeddings=seq, **kw)
        torch.manual_seed(0)  # every rank builds the same weights
        with torch.device(device):
            model = ScMoEForCausalLM(cfg)
        model = model.to(dtype).eval()
        if args.capacity_spec is not None:
            moepatch.apply(model, args.capacity_spec[1], strategy=args.capacity_spec[0], ep_size=world)
        ep = ShortcutEP(model, group=groups[priority], dispatch_after_ops=after_ops,
                        exchange="padded" if exchange == "graphs" else exchange, graphs=exchange == "graphs")
        g = torch.Generator(device="cpu").manual_seed(100 + rank)  # each rank its own tokens
        ids_BS = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
        with torch.no_grad():
            if args.router == "unbiased":  # the same rows on every rank: the mean is over all ranks' tokens
                uctx, uh0 = ep.prepare(ids_BS)
                prog = model.unit_program(0, uh0, uctx)
                mean_D = prog.x_s_TD.float().mean(0)
                dist.all_reduce(mean_D)
                unit_D = mean_D / mean_D.norm().clamp_min(1e-12)
                w_ED = prog.moe.router.weight
                w_ED.sub_(((w_ED.float() @ unit_D)[:, None] * unit_D).to(w_ED.dtype))
            # Correctness first, on this rank's first sequence.
            cctx, ch0 = ep.prepare(ids_BS[:1])
            ref = _unit_single_device(model, 0, ch0, cctx).float()
            seq_out = ep.run_unit(0, ch0, cctx, "sequential")
            ov_out = ep.run_unit(0, ch0, cctx, "overlap")
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            err = (seq_out.float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
            ov_diff = (seq_out.float() - ov_out.float()).abs().max().item()
            err, ov_diff = max_over_ranks([err, ov_diff])
            if err > tol:
                raise SystemExit(f"{shape_name}/{variant}: the expert-parallel unit differs from the single-device "
                                 f"unit (relative {err:.2e} > {tol}); nothing timed")
            if ov_diff:
                # Same kernels on the same data (only the stream differs): any difference is a race.
                raise SystemExit(f"{shape_name}/{variant}: the overlapped schedule differs from the sequential one "
                                 f"by {ov_diff:.3e}; nothing timed")
            timing = ep.calibrate(ids_BS, iters=args.calibrate_iters, warmup=1)[0]
            ctx, h0 = ep.prepare(ids_BS)
            # The routed rows each rank's experts compute (all ranks' tokens; contiguous expert blocks):
            # the straggler the combine waits for.
            probe = model.unit_program(0, h0, ctx)
            ids_TW, _ = probe.moe.gate(probe.x_s_TD, ctx)
            per_rank_experts = -(-E // world)
            per_expert = torch.zeros(world * per_rank_experts, dtype=torch.float64, device=device)
            per_expert[:E] = torch.bincount(ids_TW[(ids_TW >= 0) & (ids_TW < E)], minlength=E).double()
            dist.all_reduce(per_expert)
            rows_per_rank = per_expert.view(world, per_rank_experts).sum(1).tolist()
            t_seq, t_ov, saved = time_pair(lambda: ep.run_unit(0, h0, ctx, "sequential"),
                                           lambda: ep.run_unit(0, h0, ctx, "overlap"), args.iters, args.warmup)
            if exchange == "graphs":  # the replays (captured during the warm-up rounds) agree too
                replay_diff = (ep.run_unit(0, h0, ctx, "sequential").float()
                               - ep.run_unit(0, h0, ctx, "overlap").float()).abs().max().item()
                if max_over_ranks([replay_diff])[0]:
                    raise SystemExit(f"{shape_name}/{variant}: the replayed overlapped unit differs from the replayed "
                                     f"sequential one by {replay_diff:.3e}")
            t_out, t_back = ep.time_exchanges(0, h0, ctx, iters=args.calibrate_iters * 2)
            traced = {}
            for schedule in ("sequential", "overlap"):  # only with --profile-dir
                trace = profile_calls(lambda s=schedule: ep.run_unit(0, h0, ctx, s),
                                      f"scmoe_{shape_name}_{variant}_{priority}_after{after_ops}_{exchange}_"
                                      f"{schedule}", args.profile_dir, args.profile_calls,
                                      args.profile_cpu)
                if trace is not None and cuda:
                    c = exposed_communication(trace)
                    traced[schedule] = rank_exposures(every_rank([c["nccl_ms"], c["exposed_ms"], c["compute_ms"]]))
                    flat = every_rank([v for call in c["per_call"] for v in call])
                    traced[schedule]["per_call"] = call_exposures(
                        [[r[i:i + 3] for i in range(0, len(r), 3)] for r in flat])
        comm = t_out + t_back

        def hidden_by_trace(exposed_ms):  # 1 - the overlap's exposed NCCL time / the all-to-all alone
            return max(0.0, 1.0 - exposed_ms / 1e3 / comm) if comm > 0 else None

        ov = traced.get("overlap")  # None unprofiled

        return {
            "shape": shape_name, "variant": variant, "nccl_priority": priority, "dispatch_after_ops": after_ops,
            "exchange": exchange,
            "hidden": D,
            "expert_width": inter, "experts": E,
            "tokens_per_rank": batch * seq, "unit_sequential_ms": t_seq * 1e3, "unit_overlap_ms": t_ov * 1e3,
            "dispatch_ms": timing.dispatch * 1e3, "combine_ms": timing.combine * 1e3,
            "experts_ms": timing.experts * 1e3, "gate_ms": timing.gate * 1e3,
            "ops_ms": {k: v * 1e3 for k, v in timing.ops.items()}, "slot": timing.slot,
            "routed_rows_per_rank": rows_per_rank,
            "load_max_over_mean": max(rows_per_rank) / max(statistics.fmean(rows_per_rank), 1e-9),
            "capacity": args.capacity, "router": args.router,
            "a2a_ms": comm * 1e3, "a2a_dispatch_ms": t_out * 1e3, "a2a_combine_ms": t_back * 1e3,
            "saved_ms": saved * 1e3,
            "hidden_fraction": max(0.0, min(1.0, saved / comm)) if comm > 0 and timing.ops else 0.0,
            "check_relative_error": err, "overlap_minus_sequential_max_abs": ov_diff,
            # From the profiled calls (--profile-dir): per schedule, NCCL kernel time and the part
            # of it with no compute kernel beside it (ms; max over ranks, and of the rank with the most
            # compute: traces.rank_exposures).
            "trace_ms": traced,
            # The trace readings: with the exposure of the rank that exposes most (it counts a lighter
            # rank's wait for the straggler at the combine), and of the critical-path rank.
            "hidden_fraction_trace": hidden_by_trace(ov["exposed"]) if ov else None,
            "hidden_fraction_trace_critical": hidden_by_trace(ov["critical_exposed"]) if ov else None,
            # The same from the median call's critical exposure (the mean above, which one slow call
            # can move: the per-call values are in trace_ms.overlap.per_call).
            "hidden_fraction_trace_critical_median": (hidden_by_trace(ov["per_call"]["critical_exposed_median"])
                                                      if ov and ov["per_call"]["calls"] else None),
        }

    rows = []
    env = {"world": world, "device": torch.cuda.get_device_name(device) if cuda else "cpu", "dtype": str(dtype),
           "torch": torch.__version__, "backend": dist.get_backend()}
    scmoe_kw = dict(arch="scmoe", position=2, combine="cg1")
    prios = list(groups)
    for shape_name, dims in args.shape_list:
        a0, x0 = args.after_list[0], args.exchange_list[0]
        runs = ([("top2", dict(arch="top2"), prios[0], a0, x) for x in args.exchange_list]
                + [("scmoe", scmoe_kw, p, a0, x0) for p in prios]
                + [("scmoe", scmoe_kw, prios[0], a, x0) for a in args.after_list[1:]]
                + [("scmoe", scmoe_kw, prios[0], a0, x) for x in args.exchange_list[1:]])
        for run_args in runs:
            rows.append(bench_variant(shape_name, dims, *run_args))
            if cuda:
                torch.cuda.empty_cache()

    summary = []
    for shape_name, _ in args.shape_list:
        # The headline: both variants on the first priority's group (by default high, moepatch's default);
        # the baseline is top-2 with the faster of the exchanges.
        base = min((r for r in rows if r["shape"] == shape_name and r["variant"] == "top2"),
                   key=lambda r: r["unit_sequential_ms"])
        sc = next(r for r in rows if r["shape"] == shape_name and r["variant"] == "scmoe"
                  and r["nccl_priority"] == prios[0] and r["dispatch_after_ops"] == args.after_list[0]
                  and r["exchange"] == args.exchange_list[0])
        b = base["unit_sequential_ms"]
        summary.append({"shape": shape_name, "top2_ms": b, "top2_exchange": base["exchange"],
                        "scmoe_exchange": sc["exchange"], "top2_load": base["load_max_over_mean"],
                        "scmoe_load": sc["load_max_over_mean"], "scmoe_sequential_ms": sc["unit_sequential_ms"],
                        "scmoe_overlap_ms": sc["unit_overlap_ms"],
                        "architecture_speedup": b / sc["unit_sequential_ms"],
                        "overlap_speedup": sc["unit_sequential_ms"] / sc["unit_overlap_ms"],
                        "total_speedup": b / sc["unit_overlap_ms"], "top2_a2a_ms": base["a2a_ms"],
                        "scmoe_a2a_ms": sc["a2a_ms"], "scmoe_saved_ms": sc["saved_ms"],
                        "scmoe_a2a_hidden": sc["hidden_fraction"],
                        "scmoe_a2a_hidden_trace": sc["hidden_fraction_trace"],
                        "scmoe_a2a_hidden_trace_critical": sc["hidden_fraction_trace_critical"],
                        "scmoe_a2a_hidden_trace_critical_median": sc["hidden_fraction_trace_critical_median"],
                        "slot": sc["slot"],
                        "nccl_priority": prios[0]})
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        report = {"environment": env, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                  "summary": summary}
        cap = f"capacity {args.capacity} on both variants" if args.capacity else "no capacity"
        cap += f", {args.router} routers"
        md = [f"# ScMoE expert-parallel unit benchmark ({world} ranks, {env['device']}, {env['dtype']}, {cap})", "",
              "Routed rows per rank: the rows each rank's experts compute (all ranks' tokens); max / mean is "
              "the straggler's excess.", "",
              "| shape | variant | NCCL streams | dispatch after ops, exchange | "
              "routed rows per rank (max/mean) | "
              "sequential ms | overlap ms | saved ms | "
              "a2a ms (out + back) | dispatch + combine phases ms | hidden | slot K |",
              "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            loads = " / ".join(f"{v:.0f}" for v in r["routed_rows_per_rank"])
            md.append(f"| {r['shape']} | {r['variant']} | {r['nccl_priority']} | "
                      f"{r['dispatch_after_ops']}, {r['exchange']} | "
                      f"{loads} ({r['load_max_over_mean']:.3f}) | {r['unit_sequential_ms']:.3f} | "
                      f"{r['unit_overlap_ms']:.3f} | "
                      f"{r['saved_ms']:.3f} | {r['a2a_ms']:.3f} ({r['a2a_dispatch_ms']:.3f} + "
                      f"{r['a2a_combine_ms']:.3f}) | {r['dispatch_ms'] + r['combine_ms']:.3f} | "
                      f"{100 * r['hidden_fraction']:.0f}% | {r['slot']} |")
        traced = [r for r in rows if r["trace_ms"]]
        if traced:
            md += ["", "From the profiled calls (--profile-dir; max over ranks): NCCL kernel time per unit "
                   "and the part of it with no compute kernel beside it on that GPU (any stream: a graph replay "
                   "spreads one stream's kernels over several).", "",
                   "\"Hidden (trace)\" = 1 − overlap's exposed NCCL time / the all-to-all time alone, with the "
                   "exposure of the rank that exposes most (a lighter rank's wait for the straggler at the combine "
                   "counts) and of the rank with the most compute (the unit's critical path); means over the "
                   "profiled calls, and the critical reading from the median call.  Per call: the critical "
                   "rank's exposure in each profiled call of the overlapped unit (ms).", "",
                   "| shape | variant | NCCL streams | dispatch after ops, exchange | "
                   "sequential: NCCL / exposed ms | "
                   "overlap: NCCL / exposed ms | hidden (trace, max) | critical rank: exposed ms | "
                   "hidden (trace, critical) | (median call) | per call |",
                   "|---|---|---|---:|---|---|---:|---|---:|---:|---|"]
            for r in traced:
                t_s, t_o = r["trace_ms"]["sequential"], r["trace_ms"]["overlap"]
                hid, hid_c = r["hidden_fraction_trace"] or 0.0, r["hidden_fraction_trace_critical"] or 0.0
                hid_m = r["hidden_fraction_trace_critical_median"] or 0.0
                calls = " ".join(f"{v:.2f}" for v in t_o["per_call"]["critical_exposed"])
                md.append(f"| {r['shape']} | {r['variant']} | {r['nccl_priority']} | "
                          f"{r['dispatch_after_ops']}, {r['exchange']} | "
                          f"{t_s['nccl']:.3f} / {t_s['exposed']:.3f} | "
                          f"{t_o['nccl']:.3f} / {t_o['exposed']:.3f} | {100 * hid:.1f}% | "
                          f"{t_o['critical_rank']}: {t_o['critical_exposed']:.3f} | {100 * hid_c:.1f}% | "
                          f"{100 * hid_m:.1f}% | {calls} |")
        md += ["", "| shape | top-2 ms | ScMoE seq ms | ScMoE overlap ms | architecture | overlap | total |",
               "|---|---|---|---|---|---|---|"]
        for s in summary:
            md.append(f"| {s['shape']} | {s['top2_ms']:.3f} | {s['scmoe_sequential_ms']:.3f} | "
                      f"{s['scmoe_overlap_ms']:.3f} | {s['architecture_speedup']:.2f}x | {s['overlap_speedup']:.2f}x | "
                      f"{s['total_speedup']:.2f}x |")
        (args.out / "bench_scmoe.md").write_text("\n".join(md) + "\n")
        (args.out / "bench_scmoe.json").write_text(json.dumps(report, indent=1) + "\n")
        lines = [f"{'shape':>8} {'top2 ms':>9} {'ScMoE seq':>10} {'ScMoE ovl':>10} {'a2a ms':>8} {'saved':>7} "
                 f"{'hidden':>7} {'(trace)':>7} {'(crit)':>7} {'(med)':>7} {'arch':>6} {'ovl':>6} {'total':>6} "
                 f"{'load top2/ScMoE':>16}"]
        for s in summary:
            ht, hc, hm = (("-" if v is None else f"{100 * v:.1f}%")
                          for v in (s["scmoe_a2a_hidden_trace"], s["scmoe_a2a_hidden_trace_critical"],
                                    s["scmoe_a2a_hidden_trace_critical_median"]))
            lines.append(f"{s['shape']:>8} {s['top2_ms']:>9.3f} {s['scmoe_sequential_ms']:>10.3f} "
                         f"{s['scmoe_overlap_ms']:>10.3f} {s['scmoe_a2a_ms']:>8.3f} {s['scmoe_saved_ms']:>7.3f} "
                         f"{100 * s['scmoe_a2a_hidden']:>6.0f}% {ht:>7} {hc:>7} {hm:>7} "
                         f"{s['architecture_speedup']:>5.2f}x "
                         f"{s['overlap_speedup']:>5.2f}x {s['total_speedup']:>5.2f}x "
                         f"{s['top2_load']:>8.3f}/{s['scmoe_load']:.3f}")
        for r in rows:  # the ScMoE variant under the other NCCL stream priorities and dispatch launch points
            if r["variant"] == "scmoe" and (r["nccl_priority"] != prios[0]
                                            or r["dispatch_after_ops"] != args.after_list[0]
                                            or r["exchange"] != args.exchange_list[0]):
                crit = r["hidden_fraction_trace_critical"]
                lines.append(f"{r['shape']:>8} ScMoE, {r['nccl_priority']}-priority NCCL, dispatch after "
                             f"{r['dispatch_after_ops']} ops, {r['exchange']} exchange: sequential "
                             f"{r['unit_sequential_ms']:.3f}, overlap "
                             f"{r['unit_overlap_ms']:.3f} ms, saved {r['saved_ms']:.3f} of {r['a2a_ms']:.3f} ms a2a "
                             f"({100 * r['hidden_fraction']:.0f}%)"
                             + ("" if crit is None else f", trace critical {100 * crit:.1f}%"))
        print(f"wrote {args.out / 'bench_scmoe.json'} and {args.out / 'bench_scmoe.md'}")
        print((f"(headline rows: {prios[0]}-priority NCCL streams" if nccl else "(gloo")
              + f"; ScMoE {args.exchange_list[0]} exchange, top-2 the faster of {', '.join(args.exchange_list)}"
              + f"; {cap})")
        print("\n".join(lines), flush=True)
    dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from moepatch.launch import launched, relaunch

    if not launched():
        return relaunch([str(Path(__file__).resolve()), *argv], args.nproc,
                        limit_s=args.limit_s or (180.0 if args.smoke else 600.0), env=dict(OMP_NUM_THREADS="1"))
    return run(args)


if __name__ == "__main__":
    # Through the command line, for its one-line errors: the same as `moepatch bench scmoe ARGS`.
    from moepatch.cli import main as cli_main

    sys.exit(cli_main(["bench", "scmoe", *sys.argv[1:]]))
