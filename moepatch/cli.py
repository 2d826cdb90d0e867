"""The ``moepatch`` command line.

    moepatch eval [--model M] [--tasks T]   quality sweep: baseline and capacity variants (lm-eval)
    moepatch stats --model M --text F       load statistics of a model on a text file (no lm-eval)
    moepatch lm-eval ARGS...                lm-eval's own CLI with ``--model moepatch`` registered
    moepatch demo                           tiny random model of every family, load before/after capacity
    moepatch bench kernels|e2e|ep|scmoe ... the benchmark scripts under scripts/ (GPU)
    moepatch tune ...                       autotune the Triton tile table for this GPU
"""

from __future__ import annotations

import argparse
import os
import sys

DEMO_GAMMAS = (1.0, 1.5, 2.0)


def _offline():
    # Nothing here may reach the hub: fail at once instead of hanging on a missing network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def demo_tables(families=None, gammas=DEMO_GAMMAS, batch=8, seq=64, seed=0) -> str:
    """Per-layer load statistics of tiny random models, unpatched and at each γ (token drop, score)."""
    import torch

    import moepatch
    from moepatch.tiny import tiny_model

    families = families or moepatch.supported_model_types()
    out = []
    for family in families:
        model = tiny_model(family, seed=seed)
        x = torch.randint(3, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
        per_gamma = {}
        with torch.no_grad():
            for gamma in gammas:
                with moepatch.patched(model, capacity_factor=gamma) as handle:
                    model(x)
                    per_gamma[gamma] = handle.stats().layers()
        layers = per_gamma[gammas[0]]
        head = f"{'layer':>5} {'T':>5} {'E':>3} {'k':>2} {'N̄':>6} {'max/mean':>9}"
        head += "".join(f" | γ={g:<4} {'C':>4} {'max/mean':>8} {'drop':>6}" for g in gammas)
        rows = [f"{family}: {batch}x{seq} random tokens, token drop (score)", head, "-" * len(head)]
        for layer, s in layers.items():
            mean = (s["tokens"] * s["top_k"] - s["identity_pairs"]) / s["num_experts"]  # computing experts only
            row = f"{layer:>5} {s['tokens']:>5} {s['num_experts']:>3} {s['top_k']:>2} {mean:>6.1f} " \
                  f"{s['mean_straggler_before']:>9.2f}"
            for g in gammas:
                t = per_gamma[g][layer]
                row += f" | {'':<6} {t['mean_capacity']:>4.0f} {t['mean_straggler_after']:>8.2f} " \
                       f"{100 * t['dropped_fraction']:>5.1f}%"
            rows.append(row)
        out.append("\n".join(rows))
    return "\n\n".join(out)


def _cmd_demo(args) -> int:
    print("moepatch demo: capacity-aware token drop on tiny random models of every supported family", flush=True)
    print("(max/mean = straggler ratio max_e N_e / N̄; C = capacity; drop = dropped pairs / routed pairs)\n")
    print(demo_tables(args.families or None, tuple(args.capacity_factor)), flush=True)
    return 0


def _csv(kind):
    def parse(text):
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind}")
        return items

    return parse


def _gammas(text):
    out = []
    for x in _csv("numbers")(text):
        try:
            out.append(float(x))
        except ValueError:
            raise argparse.ArgumentTypeError(f"capacity factor {x!r} is not a number") from None
    return out


def _cmd_eval(args) -> int:
    from moepatch.errors import MoePatchError

    try:
        return _run_eval(args)
    except MoePatchError as exc:
        print(f"moepatch eval: error: {exc}", file=sys.stderr)
        return 2


def _run_eval(args) -> int:
    import tempfile

    from moepatch.errors import MoePatchError
    from moepatch.eval.loading import load_model
    from moepatch.eval.presets import parse_tasks
    from moepatch.eval.sweep import build_variants, run_sweep
    from moepatch.eval.tasks import write_task_configs
    from moepatch.routing.config import make_config

    specs = parse_tasks(args.tasks)
    for g in args.capacity_factor:  # fail on a bad γ, strategy or policy before loading anything
        for s in args.strategy:
            make_config(g, s, args.policy[0] if s in ("drop", "reroute") else None)
    for p in args.policy:
        make_config(1.0, "drop", p)
    variants = build_variants(args.capacity_factor, args.strategy, args.policy)

    with tempfile.TemporaryDirectory() as task_dir:
        write_task_configs(task_dir)
        from lm_eval.tasks import TaskManager

        from moepatch.eval.tasks import EMBEDDED_TASKS

        # Indexing lm-eval's thousands of bundled task files takes seconds: skip it when only ours are asked.
        tm = TaskManager(include_path=task_dir,
                         include_defaults=not all(t.task in EMBEDDED_TASKS for t in specs))
        unknown = [t.task for t in specs if t.task not in tm.all_tasks]
        if unknown:
            import difflib

            hints = {u: difflib.get_close_matches(u, tm.all_tasks, n=3) for u in unknown}
            msg = "; ".join(f"{u!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for u, h in hints.items())
            raise MoePatchError(f"unknown lm-eval task(s): {msg}. Use lm-eval task names, 'paper', or omit --tasks for "
                              "the embedded offline tasks (stdlib_ppl, stdlib_cloze)")
        print(f"loading model {args.model or '(embedded default)'} ...", flush=True)
        model, tok, target = load_model(args.model, args.dtype, args.device)
        import moepatch.eval.lm as mlm

        lm = mlm.MoePatchLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size,
                            max_length=args.max_length, capacity_factor=None)
        print(f"{len(variants)} variant(s) + baseline on {', '.join(t.task for t in specs)}"
              + (f" (limit {args.limit})" if args.limit else ""), flush=True)
        sweep = run_sweep(lm, specs, variants, tm, limit=args.limit)
    print()
    print(f"model: {target}")
    print(sweep.table())
    if args.output:
        paths = sweep.write(args.output)
        print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0


def _cmd_lm_eval(args) -> int:
    from lm_eval.__main__ import cli_evaluate

    import moepatch.eval.lm  # noqa: F401  (registers --model moepatch)

    sys.argv = ["lm_eval", *args.rest]
    cli_evaluate()
    return 0


def _script_main(name: str):
    """``main(argv)`` of scripts/NAME.py (benchmarks live beside the package, in the source tree)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    if not path.is_file():
        raise SystemExit(f"moepatch: {path} not found; the benchmarks ship with the source tree (git clone)")
    spec = importlib.util.spec_from_file_location(f"moepatch_scripts_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _cmd_bench(args) -> int:
    return int(_script_main(f"bench_{args.which}")(args.rest) or 0)


def _cmd_tune(args) -> int:
    from moepatch.ops.tuning import main as tune_main

    return int(tune_main(args.rest) or 0)


PTH_NAME = "moepatch_lm_eval.pth"
# Guarded so that uninstalling moepatch leaves a harmless line behind instead of a start-up error.
PTH_LINE = ("import importlib.util as _u; _u.find_spec('moepatch_lm_eval_plugin') and "
            "__import__('moepatch_lm_eval_plugin')\n")


def _cmd_install_plugin(args) -> int:
    """Write the .pth that lets ``lm_eval --model moepatch`` find the model (see moepatch_lm_eval_plugin)."""
    import sysconfig
    from pathlib import Path

    path = Path(args.site_dir or sysconfig.get_paths()["purelib"]) / PTH_NAME
    if args.uninstall:
        path.unlink(missing_ok=True)
        print(f"removed {path}")
        return 0
    path.write_text(PTH_LINE)
    print(f"wrote {path}: `lm_eval --model moepatch --model_args pretrained=...,capacity_factor=1.5` now works")
    return 0


def _cmd_stats(args) -> int:
    import torch

    import moepatch
    from moepatch.eval.loading import load_model

    with open(args.text, encoding="utf-8", errors="replace") as f:
        text = f.read()
    model, tok, _ = load_model(args.model, args.dtype, args.device)
    ids = tok(text, return_tensors="pt").input_ids[:, : args.max_tokens].to(next(model.parameters()).device)
    handle = moepatch.apply(model, capacity_factor=args.capacity_factor, strategy=args.strategy)
    with torch.no_grad():
        for start in range(0, ids.shape[1], args.seq_len):
            model(ids[:, start:start + args.seq_len])
    stats = handle.stats()
    print(stats.table())
    if args.output:
        stats.to_json(args.output)
        print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moepatch", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="load statistics of tiny random models before/after capacity")
    d.add_argument("--families", nargs="*", help="model types (default: all supported)")
    d.add_argument("--capacity-factor", type=float, nargs="+", default=list(DEMO_GAMMAS))
    d.set_defaults(fn=_cmd_demo)
    e = sub.add_parser("eval", help="quality sweep: baseline and capacity variants with lm-eval")
    e.add_argument("--model", help="alias (mixtral, olmoe, deepseek-v2-lite, qwen-moe, qwen3-moe), hub id or local "
                                   "directory; default: the embedded model shipped with moepatch")
    e.add_argument("--tasks", help="comma-separated lm-eval tasks, or 'paper' (the paper's 9 tasks, "
                                   "recipes/eval/paper.yaml); default: the embedded offline tasks")
    e.add_argument("--capacity-factor", type=_gammas, default=[1.0, 1.5, 2.0], help="e.g. 1.0,1.5,2.0")
    e.add_argument("--strategy", type=_csv("strategies"), default=["drop", "reroute", "expanded"],
                   help="comma-separated: drop, reroute, expanded, expert_drop")
    e.add_argument("--policy", type=_csv("policies"), default=["score", "order", "random"],
                   help="drop policies, comma-separated: score, order, reverse, random")
    e.add_argument("--limit", type=float, help="lm-eval --limit: examples per task (or a fraction)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--max-length", type=int, default=None)
    e.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    e.add_argument("--device", default="auto", help="auto (device_map='auto' on GPUs), cpu, cuda, cuda:1, ...")
    e.add_argument("--output", help="directory for results.json, results.csv and PNG plots")
    e.set_defaults(fn=_cmd_eval)
    b = sub.add_parser("bench", help="run a benchmark script (kernels, e2e, ep, scmoe); --help after the name")
    b.add_argument("which", choices=["kernels", "e2e", "ep", "scmoe"])
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=_cmd_bench)
    t = sub.add_parser("tune", help="autotune the Triton tile configs for this GPU", add_help=False)
    t.add_argument("rest", nargs=argparse.REMAINDER)
    t.set_defaults(fn=_cmd_tune)
    ip = sub.add_parser("install-lm-eval-plugin", help="let `lm_eval --model moepatch` work (writes a .pth)")
    ip.add_argument("--site-dir", help="site-packages directory (default: this interpreter's purelib)")
    ip.add_argument("--uninstall", action="store_true")
    ip.set_defaults(fn=_cmd_install_plugin)
    le = sub.add_parser("lm-eval", help="lm-eval's CLI with the 'moepatch' model registered", add_help=False)
    le.add_argument("rest", nargs=argparse.REMAINDER)
    le.set_defaults(fn=_cmd_lm_eval)
    s = sub.add_parser("stats", help="load statistics of a model on a text file")
    s.add_argument("--model", help="alias, hub id or local directory (default: the embedded model)")
    s.add_argument("--dtype", default="auto")
    s.add_argument("--device", default="auto")
    s.add_argument("--text", required=True, help="UTF-8 text file")
    s.add_argument("--capacity-factor", type=float, default=None, help="default: none (native load only)")
    s.add_argument("--strategy", default="drop")
    s.add_argument("--seq-len", type=int, default=512)
    s.add_argument("--max-tokens", type=int, default=8192)
    s.add_argument("--output", help="write the statistics as JSON here")
    s.set_defaults(fn=_cmd_stats)
    return p


# Commands whose arguments belong to another parser (lm-eval's, a script's) pass them through untouched.
_PASSTHROUGH = {"tune": _cmd_tune, "lm-eval": _cmd_lm_eval}


def main(argv: list[str] | None = None) -> int:
    _offline()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _PASSTHROUGH:
        return _PASSTHROUGH[argv[0]](argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
