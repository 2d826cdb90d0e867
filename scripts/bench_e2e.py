"""End-to-end throughput of a Mixtral-architecture model: unpatched vs patched with kernel="triton".

The model has Mixtral-8x7B's dimensions (hidden 4096, intermediate 14336, 8 experts, top-2, 32
heads / 8 KV heads, vocabulary 32000) with random weights and only --layers decoder layers, so it
fits one GPU and loads in seconds.  Router weights are scaled so the routing is as uneven as a
trained router's (see --router-scale).  Variants:

    hf          transformers as loaded (grouped_mm experts)
    triton      moepatch.apply(model, capacity_factor=None, kernel="triton"): same routing, fused kernels
    triton_cap  moepatch.apply(model, capacity_factor=--gamma, kernel="triton"): capacity-aware Token
                Drop (prefill only; decode steps are single tokens, which capacity leaves alone by default)

Correctness first, and in a form that can fail only for a real bug.  In bf16 the logits of two
correct implementations differ by a few percent on random-weight models: an O(1e-3) difference in
layer l's output flips some top-k choices of layer l+1's router (random routers have near-ties),
and a flipped token's output changes completely.  HF's own grouped_mm and eager backends differ
that way too.  So the checks replay the routing: every router's output in the HF run is recorded
and forced in the compared run (a forward hook on each router, ahead of moepatch's), and

    triton      vs hf                          logits rel err < 2e-2 (bf16 lands near 5e-3)
    triton_cap  vs moepatch's torch reference  logits rel err < 2e-2, identical kept pairs
                (same γ, kernel="torch")

The free-running errors and the fraction of tokens whose top-k set flips in each layer are
reported beside them (hf_eager, transformers' eager backend, shows the noise floor of the model).

Measured: prefill tokens/s for each --prefill shape (BxS tokens, logits of the last position only)
and greedy decode tokens/s (each of --decode-batches, --new-tokens steps after a --prompt-len
prompt, DynamicCache; the variants alternate over --decode-rounds passes after one warm pass each,
median reported).  With few layers a decode step is short, so decode numbers include Python
launch overhead that a full model amortises; the per-layer CUDA-graph numbers of bench_kernels.py
are the kernel-level measure.

    python scripts/bench_e2e.py --out /tmp/e2e                   # H200, Mixtral dims, 4 layers
    python scripts/bench_e2e.py --layers 2 --prefill 4x2048        # variations
    TRITON_INTERPRET=1 python scripts/bench_e2e.py --smoke --out /tmp/e2e_smoke   # CPU, tiny model
    python scripts/bench_e2e.py --profile-host [--profile-decode 1] --out /tmp/host  # host time, cProfile

--kernel-configs DIR benchmarks with the tile tables in DIR (moepatch.ops.tuning.set_tables).
--profile-host only profiles where a forward's host time goes (the first --prefill shape, or one greedy
decode step of batch --profile-decode): launch and wall time, and --profile-calls forwards under cProfile
(cprofile_<variant>.prof / .txt, summary.txt), for hf and triton.
"""

from __future__ import annotations

import cProfile
import inspect
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined

import torch  # noqa: E402

from moepatch.arguments import ArgumentParser, HelpFormatter  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_model(args, device, dtype):
    import transformers as tf

    cfg = tf.MixtralConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_local_experts=args.experts, num_experts_per_tok=args.top_k,
                           num_hidden_layers=args.layers, num_attention_heads=args.heads,
                           num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                           max_position_embeddings=max(4096, max(s for _, s in args.prefill_shapes) + 8,
                                                       args.prompt_len + args.new_tokens + 8))
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval().requires_grad_(False)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__.endswith("TopKRouter"):
                m.weight.normal_(0.0, args.router_scale / args.hidden**0.5)
    return model


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_prefill(model, ids, reps, device) -> float:
    """Median seconds of one prefill forward (last-position logits only)."""
    with torch.no_grad():
        model(ids, logits_to_keep=1, use_cache=False)
        times = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            model(ids, logits_to_keep=1, use_cache=False)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _Clock:
    """Stamps on the device's timeline: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device == "cuda"

    def stamp(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def _moe_blocks(model):
    return [m for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock")]


def prefill_breakdown(model, ids, device) -> dict:
    """One prefill forward split on the device's timeline: the MoE blocks (router included) and the rest.

    The blocks' spans are stamped by hooks placed outside any moepatch hook.  On a GPU a second forward
    runs under torch.profiler: the kernels' busy time, which tells a host-bound forward (busy well
    below the forward's span) from a GPU-bound one.
    """
    clock = _Clock(device)
    opened, spans, handles = {}, {}, []

    def start(module, args):
        opened[id(module)] = clock.stamp()

    def stop(module, args, output):
        spans.setdefault(module is model, []).append((opened.pop(id(module)), clock.stamp()))

    try:
        for m in [model] + _moe_blocks(model):
            handles += [m.register_forward_pre_hook(start, prepend=True), m.register_forward_hook(stop)]
        with torch.no_grad():
            model(ids, logits_to_keep=1, use_cache=False)
        _sync(device)
    finally:
        for h in handles:
            h.remove()
    forward_ms = clock.ms(*spans[True][0])
    moe_ms = sum(clock.ms(a, b) for a, b in spans.get(False, []))
    out = dict(forward_ms=forward_ms, moe_ms=moe_ms, rest_ms=forward_ms - moe_ms, blocks=len(spans.get(False, [])))
    if device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(ids, logits_to_keep=1, use_cache=False)
            _sync(device)
        out["gpu_busy_ms"] = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    return out


def _cache_kwarg(model) -> str:
    # transformers 5.24 renamed past_key_values to cache (the old name warns); 5.17 only has the old one.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def time_decode(model, prompt, new_tokens, device, warm: bool = True) -> float:
    """Seconds for ``new_tokens`` greedy steps after the prompt (prompt prefill not timed).

    warm: run the steps once untimed first, on a fresh cache, to pay the one-off costs of each new
    sequence length: torch's cuDNN attention (SDPA's choice on an H200) builds an execution plan per
    key length, about 10 ms of host time per layer and step the first time a length is seen.
    Without that pass whichever variant runs first pays them all and the later ones find the plans
    cached (run 12 timed transformers at 65 ms per step that way).
    """
    from transformers import DynamicCache

    kw = _cache_kwarg(model)
    with torch.no_grad():
        for _pass in (("warm", "timed") if warm else ("timed",)):
            cache = DynamicCache(config=model.config)
            out = model(prompt, use_cache=True, logits_to_keep=1, **{kw: cache})
            nxt = out.logits[:, -1:].argmax(-1)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                out = model(nxt, use_cache=True, **{kw: cache})
                nxt = out.logits[:, -1:].argmax(-1)
            _sync(device)
            elapsed = time.perf_counter() - t0
    return elapsed


def decode_rounds(model, variants, prompt, new_tokens, device, rounds: int) -> dict:
    """Median seconds per variant, the variants' decodes alternating round by round.

    A decode step is host-bound (a few ms of Python for well under 1 ms of kernels at these sizes),
    so its time moves with the host by ±15 % between runs; alternating the variants in one run
    compares them in the same state.  Each variant is applied for its pass and removed after it.
    """
    import moepatch

    times = {name: [] for name, _ in variants}
    for r in range(rounds):
        for name, opts in variants:
            handle = moepatch.apply(model, **opts) if opts else None
            try:
                times[name].append(time_decode(model, prompt, new_tokens, device, warm=r == 0))
            finally:
                if handle is not None:
                    handle.remove()
    return {name: statistics.median(t) for name, t in times.items()}


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--router-scale", type=float, default=1.0, help="router weight std times sqrt(hidden)")
    p.add_argument("--prefill", default="8x2048,4x256", help="prefill shapes BxS, comma-separated")
    p.add_argument("--check-shape", default="2x256", help="BxS of the correctness check")
    p.add_argument("--decode-batches", default="1,32")
    p.add_argument("--decode-rounds", type=int, default=3, help="alternating decode passes per variant")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--gamma", type=float, default=1.5, help="capacity factor of triton_cap (0: skip it)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--out", default="bench_e2e_out")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--kernel-configs", default=None, metavar="DIR", help="tile tables to use (default: lookup)")
    p.add_argument("--profile-host", action="store_true", help="only profile the host time of forwards")
    p.add_argument("--profile-decode", type=int, default=0, metavar="B", help="profile decode steps of batch B")
    p.add_argument("--profile-calls", type=int, default=20, help="forwards under cProfile")
    p.add_argument("--profile-limit", type=int, default=30, help="functions listed per ordering")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab = 2, 32, 48, 4, 2, 128
        args.prefill, args.check_shape, args.prompt_len, args.new_tokens = "1x8", "2x6", 4, 2
        args.decode_batches, args.reps, args.dtype, args.router_scale = "1", 1, "fp32", 8.0
        args.decode_rounds = 1
    args.prefill_shapes = [_shape(v) for v in args.prefill.split(",") if v]
    args.check_bs = _shape(args.check_shape)
    return args


def _shape(text: str) -> tuple[int, int]:
    b, s = text.lower().split("x")
    return int(b), int(s)


def _routers(model):
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]


def _experts(model):
    return [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "num_experts")]


def run_checked(model, ids, force=None):
    """Logits (float32) of one forward, the router outputs of every layer, and each experts call's ids.

    ``force``: router outputs to replay (a list per layer, from an earlier run).  The hooks are put
    ahead of any moepatch hook (prepend), so capacity-aware routing sees the forced scores.
    """
    routed, expert_ids, handles = [], [], []

    def router_hook(i):
        def hook(module, args, output):
            routed.append(tuple(t.detach().clone() for t in output))
            return None if force is None else force[i]
        return hook

    def experts_hook(module, args, kwargs):
        ids_TW = args[1] if len(args) > 1 else kwargs["top_k_index"]
        expert_ids.append(ids_TW.detach().clone())

    try:
        for i, r in enumerate(_routers(model)):
            handles.append(r.register_forward_hook(router_hook(i), prepend=True))
        for m in _experts(model):
            handles.append(m.register_forward_pre_hook(experts_hook, with_kwargs=True, prepend=True))
        with torch.no_grad():
            logits = model(ids).logits.float()
    finally:
        for h in handles:
            h.remove()
    return logits, routed, expert_ids


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def flip_fractions(routed_a, routed_b) -> list[float]:
    """Per layer: fraction of tokens whose set of top-k experts differs between two runs."""
    out = []
    for a, b in zip(routed_a, routed_b):
        ids_a, ids_b = a[-1].sort(dim=-1).values, b[-1].sort(dim=-1).values
        out.append((ids_a != ids_b).any(dim=-1).float().mean().item())
    return out


def correctness(model, ids, args, log) -> tuple[dict, list[str]]:
    """The checks described in the module docstring; returns (numbers, failures)."""
    import moepatch

    tol = 1e-4 if args.smoke else 2e-2
    res, bad = {}, []
    ref, routed_hf, _ = run_checked(model, ids)
    # transformers' eager experts: set on each experts module's config, as bench_kernels.py does.
    configs = {id(m.config): m.config for m in _experts(model)}.values()
    saved = [(c, c._experts_implementation_internal) for c in configs]
    try:
        for c, _ in saved:
            c._experts_implementation_internal = "eager"
        eager, routed_eager, _ = run_checked(model, ids)
    finally:
        for c, impl in saved:
            c._experts_implementation_internal = impl
    res["hf_eager_free_rel_err"] = rel_err(eager, ref)
    res["hf_eager_flips"] = flip_fractions(routed_eager, routed_hf)
    with moepatch.patched(model, None, kernel="triton", collect_stats=False):
        free, routed_tri, _ = run_checked(model, ids)
        forced, _, _ = run_checked(model, ids, force=routed_hf)
    res["triton_free_rel_err"] = rel_err(free, ref)
    res["triton_flips"] = flip_fractions(routed_tri, routed_hf)
    res["triton_forced_rel_err"] = rel_err(forced, ref)
    if not res["triton_forced_rel_err"] < tol:
        bad.append("triton: logits differ from transformers' with the same routing "
                   f"({res['triton_forced_rel_err']:.3g})")
    if args.gamma:
        with moepatch.patched(model, args.gamma, kernel="torch", collect_stats=False):
            cap_ref, _, ids_ref = run_checked(model, ids, force=routed_hf)
        with moepatch.patched(model, args.gamma, kernel="triton", collect_stats=False):
            cap, _, ids_tri = run_checked(model, ids, force=routed_hf)
        E = args.experts
        res["cap_dropped_frac"] = sum((t >= E).sum().item() for t in ids_ref) / max(1, sum(t.numel() for t in ids_ref))
        res["triton_cap_rel_err_vs_torch_cap"] = rel_err(cap, cap_ref)
        res["triton_cap_rel_err_vs_hf"] = rel_err(cap, ref)
        # Seen ahead of moepatch's own experts hooks: (T, W) ids with the sentinel E on dropped slots.
        res["triton_cap_pairs_equal"] = len(ids_tri) == len(ids_ref) and all(
            torch.equal(a, b) for a, b in zip(ids_tri, ids_ref))
        if not res["triton_cap_rel_err_vs_torch_cap"] < tol:
            bad.append(f"triton_cap: logits differ from moepatch's torch reference "
                       f"({res['triton_cap_rel_err_vs_torch_cap']:.3g})")
        if not res["triton_cap_pairs_equal"]:
            bad.append("triton_cap: kept pairs differ from moepatch's torch reference")
    log("check: " + json.dumps({k: (float(f"{v:.3g}") if isinstance(v, float) else v) for k, v in res.items()}))
    return res, bad


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``moepatch bench e2e`` calls this); returns the exit status."""
    import moepatch

    args = parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: run with --smoke for the CPU check", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    if args.kernel_configs:
        from moepatch.ops.tuning import set_tables

        set_tables(args.kernel_configs)
    if args.profile_host:
        return profile_host(args, device, dtype)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []

    def log(line):
        print(line, flush=True)
        lines.append(line)

    import transformers
    import triton

    env = dict(torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__,
               device=torch.cuda.get_device_name() if device == "cuda" else "cpu (TRITON_INTERPRET=1)",
               kernel_configs=args.kernel_configs,
               args={k: v for k, v in vars(args).items() if k not in ("prefill_shapes", "check_bs")})
    log(f"env: {json.dumps(env)}")
    model = build_model(args, device, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    check_ids = torch.randint(3, args.vocab, args.check_bs, device=device, generator=gen)
    check, bad = correctness(model, check_ids, args, log)

    variants = [("hf", None), ("triton", dict(capacity_factor=None, kernel="triton", collect_stats=False))]
    if args.gamma:
        variants.append(("triton_cap", dict(capacity_factor=args.gamma, kernel="triton", collect_stats=False)))
    prefill_inputs = [torch.randint(3, args.vocab, bs, device=device, generator=gen) for bs in args.prefill_shapes]
    decode_batches = [int(x) for x in args.decode_batches.split(",") if x]
    results = []
    for name, opts in variants:
        handle = moepatch.apply(model, **opts) if opts else None
        row = dict(variant=name)
        try:
            for (b, s), ids in zip(args.prefill_shapes, prefill_inputs):
                t = time_prefill(model, ids, args.reps, device)
                row[f"prefill_{b}x{s}_tok_s"] = b * s / t
                row[f"prefill_{b}x{s}_ms"] = t * 1e3
                row[f"prefill_{b}x{s}_split"] = prefill_breakdown(model, ids, device)
        finally:
            if handle is not None:
                handle.remove()
        results.append(row)
        log(json.dumps(row))
    decoding = [(n, o) for n, o in variants if n != "triton_cap"]
    for b in decode_batches:
        prompt = torch.randint(3, args.vocab, (b, args.prompt_len), device=device, generator=gen)
        secs = decode_rounds(model, decoding, prompt, args.new_tokens, device, args.decode_rounds)
        for row in results:
            if row["variant"] in secs:
                row[f"decode_b{b}_tok_s"] = b * args.new_tokens / secs[row["variant"]]
        log(f"decode b{b}: " + json.dumps({n: round(b * args.new_tokens / t, 1) for n, t in secs.items()}))
    md = _table(results, args, check)
    (out_dir / "e2e.json").write_text(json.dumps(dict(env=env, check=check, rows=results), indent=1))
    (out_dir / "e2e.md").write_text(f"Environment: `{json.dumps(env)}`\n\n{md}\n")
    for b in bad:
        log(f"FAIL {b}")
    log(md)
    (out_dir / "log.txt").write_text("\n".join(lines) + "\n")
    return 1 if bad else 0


def host_and_wall_ms(step, device, reps: int) -> tuple[float, float]:
    """Medians of the time to return from a forward (launch) and to finish it (wall), in ms."""
    launch, wall = [], []
    with torch.no_grad():
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            _sync(device)
            launch.append((t1 - t0) * 1e3)
            wall.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(launch), statistics.median(wall)


def top_functions(step, device, limit: int, calls: int, dump: Path) -> str:
    """cProfile of ``calls`` forwards (raw stats written to ``dump``), top functions as text."""
    prof = cProfile.Profile()
    with torch.no_grad():
        _sync(device)
        prof.enable()
        for _ in range(calls):
            step()
        _sync(device)
        prof.disable()
    prof.dump_stats(dump)
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)
    return text.getvalue()


def profile_host(args, device, dtype) -> int:
    """--profile-host: launch and wall time and a cProfile of forwards, hf against triton (a hidden
    device sync shows up as time in ``item``, ``tolist`` or ``synchronize``)."""
    import moepatch

    model = build_model(args, device, dtype)
    gen = torch.Generator(device).manual_seed(0)
    if args.profile_decode:
        from transformers import DynamicCache

        prompt = torch.randint(3, args.vocab, (args.profile_decode, 16), device=device, generator=gen)
        what = f"decode step, batch {args.profile_decode}"
    else:
        b, s = args.prefill_shapes[0]
        ids = torch.randint(3, args.vocab, (b, s), device=device, generator=gen)
        what = f"prefill {b}x{s}"

    def make_step():
        if not args.profile_decode:
            return lambda: model(ids, logits_to_keep=1, use_cache=False)
        kw = {_cache_kwarg(model): DynamicCache(config=model.config)}
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
            text = top_functions(step, device, args.profile_limit, args.profile_calls, out / f"cprofile_{name}.prof")
        finally:
            if handle is not None:
                handle.remove()
        (out / f"cprofile_{name}.txt").write_text(text)
        summary.append(f"{name}: {what}: launch {launch:.2f} ms, wall {wall:.2f} ms "
                       f"(launch / wall {launch / wall:.2f}); cProfile in cprofile_{name}.txt")
        print(summary[-1], flush=True)
    (out / "summary.txt").write_text("\n".join(summary) + "\n")
    return 0


def _table(results, args, check) -> str:
    base = results[0]
    cols = [f"prefill_{b}x{s}_tok_s" for b, s in args.prefill_shapes]
    cols += [f"decode_b{b}_tok_s" for b in args.decode_batches.split(",") if b]
    head = ["variant"] + [c.replace("_tok_s", " tok/s") + " | x hf" for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * (1 + 2 * len(cols))]
    for r in results:
        cells = [r["variant"]]
        for c in cols:
            v = r.get(c)
            cells += [f"{v:.1f}" if v else "-", f"{v / base[c]:.2f}" if v and base.get(c) else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", _split_table(results, args)]
    flips = ", ".join(f"{f:.4f}" for f in check.get("triton_flips", []))
    lines += ["", "| check | value |", "|---|---:|",
              f"| triton vs hf, same routing (rel err) | {check['triton_forced_rel_err']:.2e} |",
              f"| triton vs hf, free-running (rel err) | {check['triton_free_rel_err']:.2e} |",
              f"| hf eager vs hf grouped_mm, free-running (noise floor) | {check['hf_eager_free_rel_err']:.2e} |",
              f"| tokens whose top-k flips, per layer (triton vs hf) | {flips} |"]
    if "triton_cap_rel_err_vs_torch_cap" in check:
        lines += [f"| triton_cap vs torch capacity reference, same routing | "
                  f"{check['triton_cap_rel_err_vs_torch_cap']:.2e} |",
                  f"| triton_cap kept pairs equal to the reference | {check['triton_cap_pairs_equal']} |",
                  f"| triton_cap dropped fraction (γ={args.gamma}) | {check['cap_dropped_frac']:.4f} |"]
    return "\n".join(lines)


def _split_table(results, args) -> str:
    """Each prefill forward split into MoE blocks and the rest, and what transformers' rest allows."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_kernels import floor_ms  # noqa: E402  (scripts/ is not a package)

    lines = ["| variant | prefill | forward ms | MoE blocks ms | per block / floor | rest ms | GPU busy ms |",
             "|---|---|---:|---:|---:|---:|---:|"]
    bounds = []
    for b, s in args.prefill_shapes:
        M = b * s
        floor = floor_ms(M, args.top_k, args.hidden, args.intermediate, min(args.experts, M * args.top_k))[0]
        for r in results:
            sp = r.get(f"prefill_{b}x{s}_split")
            if not sp:
                continue
            per_block = sp["moe_ms"] / max(1, sp["blocks"]) / floor
            busy = f"{sp['gpu_busy_ms']:.2f}" if "gpu_busy_ms" in sp else "-"
            lines.append(f"| {r['variant']} | {b}x{s} | {sp['forward_ms']:.2f} | {sp['moe_ms']:.2f} | "
                         f"{per_block:.2f} | {sp['rest_ms']:.2f} | {busy} |")
        hf = results[0].get(f"prefill_{b}x{s}_split")
        if hf:
            at_floor = hf["rest_ms"] + hf["blocks"] * floor
            bounds.append(f"prefill {b}x{s}: with every MoE block at its floor ({floor:.3f} ms) and the rest as "
                          f"transformers' ({hf['rest_ms']:.2f} ms), at most {hf['forward_ms'] / at_floor:.2f}x "
                          "transformers' forward")
    return "\n".join(lines + [""] + bounds)


if __name__ == "__main__":
    # Through the command line, for its one-line errors: the same as `moepatch bench e2e ARGS`.
    from moepatch.cli import main as cli_main

    sys.exit(cli_main(["bench", "e2e", *sys.argv[1:]]))
