"""Capacity routing per layer call: eager sync-free route against its CUDA-graph replay (GPU).

Token Reroute, Expanded Drop and the random Token Drop policy route with one to two hundred small
torch kernels; launching them costs the host far more than the GPU spends on them.  This times
``moepatch.ops.route.route`` (eager) and ``moepatch.ops.route_graphs.route_graphed`` (captured
after two warm-up calls, then replayed) the way a model calls them: back to back, one sync at the
end, wall-clock per call (so the host's launch time counts), median of rounds, after checking
that both give the same pairs and statistics.  "replay alone" is the replayed graph without its
input/output copies; "kept" says which the capture-time timing chose for the signature.

    PYTHONPATH=$PWD python3 scripts/bench_route_graphs.py --out $OUT/route_graphs
"""

from __future__ import annotations

# ruff: noqa: B023  (every lambda is timed before its loop variables change)
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moepatch.ops import route_graphs  # noqa: E402
from moepatch.ops.route import route as eager_route  # noqa: E402
from moepatch.routing import make_config  # noqa: E402

SHAPES = {"mixtral": (8, 2), "olmoe": (64, 8), "deepseek-v2-lite": (64, 6)}  # experts, top-k
VARIANTS = {"reroute@1": ("reroute", 1.0, {}), "reroute@1.5": ("reroute", 1.5, {}),
            "expanded@1": ("expanded", 1.0, {"ep_size": 2}), "drop-random@1": ("drop", 1.0, {"policy": "random"})}


def _inputs(T, E, K, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.softmax(torch.randn(T, E, device="cuda", generator=g) * 2, dim=-1)
    ids = torch.topk(scores, K, dim=1).indices
    w = scores.gather(1, ids)
    factor = 1 / w.sum(1)
    return scores, ids, w * factor[:, None], factor


def _wall_ms(fn, calls, rounds=7):
    out = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokens", default="4096,16384")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--calls", type=int, default=20, help="calls per timed round (one sync per round)")
    p.add_argument("--no-stats", action="store_true", help="collect_stats=False: the decision alone")
    args = p.parse_args(argv)
    rows = []
    for shape in args.shapes.split(","):
        E, K = SHAPES[shape]
        for T in (int(t) for t in args.tokens.split(",")):
            scores, ids, w, factor = _inputs(T, E, K, T + E)
            for name, (strategy, gamma, opts) in VARIANTS.items():
                cfg = make_config(gamma, strategy, num_experts=E, collect_stats=not args.no_stats, **opts)
                kw = dict(batch=1, seq=T, layer=0)
                route_graphs.clear()
                for _ in range(route_graphs.WARMUP_CALLS + 1):
                    got = route_graphs.route_graphed(cfg, scores, ids, w, factor, **kw)
                want = eager_route(cfg, scores, ids, w, factor, **kw)
                pairs = [(getattr(got, f), getattr(want, f)) for f in
                         ("topk_ids_TW", "topk_weights_TW", "load_after_E", "dropped_pairs", "rerouted_pairs")]
                same = all(torch.equal(a, b) if a is not None else b is None for a, b in pairs)
                if not same:
                    raise SystemExit(f"{shape} T={T} {name}: the graph replay differs from the eager route")
                graph = next((g for g in route_graphs._CACHE.values() if isinstance(g, route_graphs._RouteGraph)),
                             None)  # None: the capture-time timing kept the eager route
                t_eager = _wall_ms(lambda: eager_route(cfg, scores, ids, w, factor, **kw), args.calls)
                t_graph = _wall_ms(lambda: route_graphs.route_graphed(cfg, scores, ids, w, factor, **kw), args.calls)
                t_floor = _wall_ms(graph.graph.replay, args.calls) if graph is not None else float("nan")
                rows.append(dict(shape=shape, tokens=T, variant=name, eager_ms=t_eager, graph_ms=t_graph,
                                 replay_only_ms=t_floor, speedup=t_eager / t_graph, kept="graph" if graph else "eager"))
                print(f"{shape:>17} T={T:<6} {name:<14} eager {t_eager:7.3f} ms  route_graphed {t_graph:7.3f} ms "
                      f"({'graph' if graph else 'eager'} kept; replay alone {t_floor:6.3f})  "
                      f"{t_eager / t_graph:5.1f}x", flush=True)
    route_graphs.clear()
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, collect_stats=not args.no_stats)
    (args.out / "bench_route_graphs.json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1) + "\n")
    md = [f"# Capacity routing: eager vs CUDA-graph replay ({env['device']}, torch {env['torch']})", "",
          "| shape | T | variant | eager ms | route_graphed ms | kept | replay alone ms | speedup |",
          "|---|---:|---|---:|---:|---|---:|---:|"]
    md += [f"| {r['shape']} | {r['tokens']} | {r['variant']} | {r['eager_ms']:.3f} | {r['graph_ms']:.3f} | "
           f"{r['kept']} | {r['replay_only_ms']:.3f} | {r['speedup']:.1f}x |" for r in rows]
    (args.out / "bench_route_graphs.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
