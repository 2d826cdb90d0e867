"""Where the host time of a forward goes: transformers as loaded against moepatch's triton path.

Builds bench_e2e.py's model (Mixtral dimensions, random weights), and for each variant runs a few
warm forwards, times them with and without a device sync (a host-bound forward has a launch time
close to its wall time), and profiles --calls of them with cProfile (raw stats in cprofile_*.prof):
the Python functions that take the host's time, by own time and cumulative.  A hidden device
synchronisation shows up as time in ``item``, ``tolist`` or ``synchronize``.  The forward is a
prefill (--prefill BxS) or, with --decode B, one greedy decode step of batch B on a growing cache.

    PYTHONPATH=$PWD python3 scripts/profile_host.py --prefill 4x256 --out $OUT/host
    PYTHONPATH=$PWD python3 scripts/profile_host.py --decode 1 --out $OUT/host_decode
    TRITON_INTERPRET=1 python3 scripts/profile_host.py --smoke --out /tmp/host      # CPU, tiny model
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e  # noqa: E402  (scripts/ is not a package; sets TRITON_INTERPRET for --smoke)
import torch  # noqa: E402


def host_and_wall_ms(step, device, reps: int) -> tuple[float, float]:
    """Medians of the time to return from a forward (launch) and to finish it (wall), in ms."""
    launch, wall = [], []
    with torch.no_grad():
        for _ in range(reps):
            bench_e2e._sync(device)
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            bench_e2e._sync(device)
            launch.append((t1 - t0) * 1e3)
            wall.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(launch), statistics.median(wall)


def top_functions(step, device, limit: int, calls: int, dump: Path) -> str:
    """cProfile of ``calls`` forwards (raw stats written to ``dump``), top functions as text."""
    prof = cProfile.Profile()
    with torch.no_grad():
        bench_e2e._sync(device)
        prof.enable()
        for _ in range(calls):
            step()
        bench_e2e._sync(device)
        prof.disable()
    prof.dump_stats(dump)
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)
    return text.getvalue()


def main(argv=None) -> int:
    import moepatch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prefill", default="4x256", help="BxS of the forward")
    p.add_argument("--decode", type=int, default=0, metavar="B", help="profile decode steps of batch B instead")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--limit", type=int, default=30, help="functions listed per ordering")
    p.add_argument("--calls", type=int, default=20, help="forwards under cProfile")
    p.add_argument("--out", default="profile_host_out")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    e2e_argv = ["--layers", str(args.layers), "--prefill", args.prefill] + (["--smoke"] if args.smoke else [])
    e2e = bench_e2e.parse_args(e2e_argv)
    device = "cpu" if args.smoke else "cuda"
    model = bench_e2e.build_model(e2e, device, bench_e2e.DTYPES[e2e.dtype])
    gen = torch.Generator(device).manual_seed(0)
    if args.decode:
        from transformers import DynamicCache

        prompt = torch.randint(3, e2e.vocab, (args.decode, 16), device=device, generator=gen)
        what = f"decode step, batch {args.decode}"
    else:
        b, s = e2e.prefill_shapes[0]
        ids = torch.randint(3, e2e.vocab, (b, s), device=device, generator=gen)
        what = f"prefill {b}x{s}"

    def make_step():
        if not args.decode:
            return lambda: model(ids, logits_to_keep=1, use_cache=False)
        kw = {bench_e2e._cache_kwarg(model): DynamicCache(config=model.config)}
        with torch.no_grad():
            nxt = [model(prompt, use_cache=True, logits_to_keep=1, **kw).logits[:, -1:].argmax(-1)]

        def step():
            nxt[0] = model(nxt[0], use_cache=True, **kw).logits[:, -1:].argmax(-1)
        return step

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for name, opts in [("hf", None), ("triton", dict(capacity_factor=None, kernel="triton", collect_stats=False))]:
        handle = moepatch.apply(model, **opts) if opts else None
        try:
            step = make_step()
            host_and_wall_ms(step, device, 3)
            launch, wall = host_and_wall_ms(step, device, args.reps)
            text = top_functions(step, device, args.limit, args.calls, out / f"cprofile_{name}.prof")
        finally:
            if handle is not None:
                handle.remove()
        (out / f"cprofile_{name}.txt").write_text(text)
        summary.append(f"{name}: {what}: launch {launch:.2f} ms, wall {wall:.2f} ms "
                       f"(launch / wall {launch / wall:.2f}); cProfile in cprofile_{name}.txt")
        print(summary[-1], flush=True)
    (out / "summary.txt").write_text("\n".join(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
