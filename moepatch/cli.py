"""The ``moepatch`` command line.

    moepatch eval [--model M] [--tasks T]   quality sweep: baseline and capacity variants (lm-eval)
    moepatch stats [--model M] --text F     load statistics of a model on a text file (no lm-eval)
    moepatch lm-eval ARGS...                lm-eval's own CLI with ``--model moepatch`` and the shipped tasks
    moepatch demo                           tiny random model of every family, load before/after capacity
    moepatch ep demo|eval [--nproc N] ...   expert parallelism, one process per rank (moepatch.launch)
    moepatch bench kernels|e2e|ep|scmoe ... the benchmark scripts under scripts/ (GPU)
    moepatch tune ...                       autotune the Triton tile table for this GPU

Every command checks its arguments, the model (its config only) and the tasks' datasets before
loading any weight; a failure is one line on stderr and exit status 2 (``--debug``: the traceback).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import importlib.util
import logging
import os
import sys
import sysconfig
from pathlib import Path

import torch
from tqdm import tqdm

from moepatch.arguments import ArgumentParser, HelpFormatter, capacity_factor
from moepatch.errors import MoePatchError, UsageError
from moepatch.eval import loading
from moepatch.eval.presets import parse_tasks
from moepatch.eval.sweep import build_variants, load_tasks, run_sweep
from moepatch.eval.tasks import EMBEDDED_TASKS, task_config_dir
from moepatch.launch import positive
from moepatch.launch import run as run_ep
from moepatch.patch.core import apply, patched
from moepatch.patch.registry import supported_model_types
from moepatch.routing.config import STRATEGIES, make_config
from moepatch.tiny import HAND_FAMILIES, tiny_model

DEMO_GAMMAS = (1.0, 1.5, 2.0)


def _quiet_libraries():
    """No lm-eval INFO lines nor datasets' cache-building bars (transformers' warnings about the model stay)."""
    import datasets

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    datasets.disable_progress_bars()  # "Generating test split" bars when a dataset is first cached


def demo_tables(families=None, gammas=DEMO_GAMMAS, batch=8, seq=64, seed=0) -> str:
    """Per-layer load statistics of tiny random models, unpatched and at each γ (token drop, score)."""
    out = []
    for family in families or HAND_FAMILIES:
        model = tiny_model(family, seed=seed)
        x = torch.randint(3, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
        per_gamma = {}
        with torch.no_grad():
            for gamma in gammas:
                with patched(model, capacity_factor=gamma) as handle:
                    model(x)
                    per_gamma[gamma] = handle.stats().layers()
        head = f"{'layer':>5} {'T':>5} {'E':>3} {'k':>2} {'N̄':>6} {'max/mean':>9}"
        head += "".join(f" | γ={g:<4} {'C':>4} {'max/mean':>8} {'drop':>6}" for g in gammas)
        rows = [f"{family}: {batch}x{seq} random tokens, token drop (score)", head, "-" * len(head)]
        for layer, s in per_gamma[gammas[0]].items():
            mean = (s["tokens"] * s["top_k"] - s["identity_pairs"]) / s["num_experts"]  # computing experts only
            rows.append(f"{layer:>5} {s['tokens']:>5} {s['num_experts']:>3} {s['top_k']:>2} {mean:>6.1f} "
                        f"{s['mean_straggler_before']:>9.2f}" + "".join(
                            f" | {'':<6} {t['mean_capacity']:>4.0f} {t['mean_straggler_after']:>8.2f} "
                            f"{100 * t['dropped_fraction']:>5.1f}%" for t in (per_gamma[g][layer] for g in gammas)))
        out.append("\n".join(rows))
    return "\n\n".join(out)


def _cmd_demo(args) -> int:
    supported = supported_model_types()
    unknown = [f for f in args.families or () if f not in supported]
    if unknown:
        raise UsageError(f"--families: unknown model type(s) {', '.join(unknown)}; accepted: {', '.join(supported)}")
    _check_routing(args.capacity_factor, ["drop"], ["score"])
    print("moepatch demo: capacity-aware token drop on tiny random models (--families: any supported type)", flush=True)
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


def _check_routing(gammas, strategies, policies) -> None:
    """Every (γ, strategy, policy) combination a command will apply, validated before anything loads."""
    for s in strategies:
        for g in gammas:
            make_config(g, s, policies[0] if s in ("drop", "reroute") else None)
    for p in policies:
        make_config(1.0, "drop", p)


@functools.lru_cache(maxsize=4)
def _indexed_task_manager(paths: tuple, include_defaults: bool):
    """lm-eval's TaskManager, indexed once per process (indexing its own tasks takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=include_defaults)


def _task_manager(specs_or_names, include_path=None):
    """lm-eval's TaskManager with the shipped tasks, and lm-eval's own only when they are asked for
    (indexing its thousands of task files takes seconds); unknown names raise one clear error."""
    names = [getattr(t, "task", t) for t in specs_or_names]
    paths = (str(task_config_dir()), *([include_path] if include_path else []))
    only_ours = all(n in EMBEDDED_TASKS for n in names) and not include_path
    tm = _indexed_task_manager(paths, not only_ours)
    unknown = [n for n in names if n not in tm.all_tasks and not os.path.isfile(n)]
    if unknown:
        hints = {u: difflib.get_close_matches(u, tm.all_tasks, n=3) for u in unknown}
        msg = "; ".join(f"{u!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for u, h in hints.items())
        raise UsageError(f"unknown lm-eval task(s): {msg}. Use lm-eval task names (`lm_eval ls tasks`), 'paper', "
                         f"or the embedded offline tasks ({', '.join(EMBEDDED_TASKS)})")
    return tm


def _cmd_eval(args) -> int:
    _check_routing(args.capacity_factor, args.strategy, args.policy)
    if args.output and Path(args.output).exists() and not Path(args.output).is_dir():
        raise UsageError(f"--output {args.output}: exists and is not a directory; give a directory for the results")
    loading.check_device(args.device)
    specs = parse_tasks(args.tasks)
    target, _ = loading.check_model(args.model)
    variants = build_variants(args.capacity_factor, args.strategy, args.policy)
    _quiet_libraries()
    _phase(f"checking {len(specs)} task(s) and their datasets ...")
    loaded = load_tasks(specs, _task_manager(specs))
    _phase(f"loading {target} ...")
    model, tok, target = loading.load_model(args.model, args.dtype, args.device)
    import moepatch.eval.lm as mlm  # lm-eval: imported once the input is checked

    lm = mlm.MoePatchLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, max_length=args.max_length,
                        capacity_factor=None)
    limit = f", limit {args.limit:g}" if args.limit else ""
    _phase(f"evaluating the baseline and {len(variants)} variant(s) on {', '.join(t.task for t in specs)}{limit} ...")
    sweep = run_sweep(lm, specs, variants, loaded, limit=args.limit)
    print(f"\nmodel: {target}")
    print(sweep.table(wide=args.wide))
    if args.output:
        paths = sweep.write(args.output, model_name=os.path.basename(target.rstrip("/")) or target)
        print(f"\nwrote {args.output}: {', '.join(p.name for p in paths)}")
    return 0


def _phase(text: str) -> None:
    """What the command is doing, on a terminal only (a log keeps the table and nothing else)."""
    if sys.stderr.isatty():
        print(text, file=sys.stderr, flush=True)


def _cmd_lm_eval(rest: list) -> int:
    """lm-eval's CLI, after checking what it would find out only after loading the model."""
    if not rest or rest[0] in ("ls", "validate") or any(a in ("-h", "--help") for a in rest):
        return _run_lm_eval(rest)
    p = ArgumentParser(prog="moepatch lm-eval", add_help=False)
    p.add_argument("--model", default="hf")
    p.add_argument("--model_args", "--model-args", default="")
    p.add_argument("--tasks", "-t", default=None)
    p.add_argument("--include_path", "--include-path", default=None)
    known, _ = p.parse_known_args(rest[1:] if rest[0] == "run" else rest)
    model_args = dict(kv.split("=", 1) for kv in known.model_args.split(",") if "=" in kv)
    if known.model in ("moepatch", "hf") and "pretrained" in model_args:
        loading.check_model(model_args["pretrained"], need_moe=known.model == "moepatch", aliases=False)
    if known.model == "moepatch":  # moepatch.apply's options, parsed and split as the moepatch model will
        from lm_eval.utils import simple_parse_args_string

        from moepatch.eval.lm import patch_arguments

        make_config(**patch_arguments(simple_parse_args_string(known.model_args))[0])
    if known.tasks:
        names = [t for t in known.tasks.split(",") if t]
        _quiet_libraries()
        loading.build_tasks(_task_manager(names, known.include_path), names)
    return _run_lm_eval(rest)


def _run_lm_eval(rest) -> int:
    from lm_eval.__main__ import cli_evaluate

    import moepatch.eval.lm  # noqa: F401  (registers --model moepatch)

    sys.argv = ["lm_eval", *rest]
    cli_evaluate()
    return 0


def _cmd_stats(args) -> int:
    _check_routing([args.capacity_factor], [args.strategy], ["score"])
    if not Path(args.text).is_file():
        raise UsageError(f"--text {args.text}: " + ("not a file" if Path(args.text).exists() else "no such file"))
    if not os.access(args.text, os.R_OK):
        raise UsageError(f"--text {args.text}: not readable")
    loading.check_device(args.device)
    loading.check_model(args.model)
    _quiet_libraries()
    text = Path(args.text).read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise UsageError(f"--text {args.text}: the file is empty")
    model, tok, _ = loading.load_model(args.model, args.dtype, args.device)
    # The text runs in --seq-len windows: the tokenizer's "longer than the maximum length" note does not apply.
    ids = tok(text, return_tensors="pt", verbose=False).input_ids[:, : args.max_tokens]
    ids = ids.to(next(model.parameters()).device)
    handle = apply(model, capacity_factor=args.capacity_factor, strategy=args.strategy)
    with torch.no_grad():
        for start in tqdm(range(0, ids.shape[1], args.seq_len), desc="forward windows", unit="window",
                          leave=False, disable=not sys.stderr.isatty()):
            model(ids[:, start:start + args.seq_len])
    stats = handle.stats()
    print(stats.table())
    if args.output:
        stats.to_json(args.output)
        print(f"wrote {args.output}")
    return 0


BENCHES = ("kernels", "e2e", "ep", "scmoe")


def _cmd_bench(rest: list) -> int:
    """Run ``main(argv)`` of scripts/bench_NAME.py (benchmarks live beside the package, in the source tree)."""
    if not rest or rest[0] not in BENCHES:
        got = f" {rest[0]!r}" if rest else ""
        raise UsageError(f"bench: unknown benchmark{got}; accepted: {', '.join(BENCHES)} "
                         "(`moepatch bench NAME --help` for its options)")
    which, rest = rest[0], rest[1:]
    path = Path(__file__).resolve().parents[1] / "scripts" / f"bench_{which}.py"
    if not path.is_file():
        raise UsageError(f"{path} not found; the benchmarks ship with the source tree (git clone the repository)")
    spec = importlib.util.spec_from_file_location(f"moepatch_scripts_bench_{which}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    prog, sys.argv[0] = sys.argv[0], f"moepatch bench {which}"  # the script's usage line names the command
    try:
        return int(module.main(rest) or 0)
    finally:
        sys.argv[0] = prog


def _cmd_tune(rest: list) -> int:
    from moepatch.ops.tune import main as tune_main  # triton: only for this command

    return int(tune_main(rest) or 0)


PTH_NAME = "moepatch_lm_eval.pth"
# Guarded so that uninstalling moepatch leaves a harmless line behind instead of a start-up error.
PTH_LINE = ("import importlib.util as _u; _u.find_spec('moepatch_lm_eval_plugin') and "
            "__import__('moepatch_lm_eval_plugin')\n")


def _cmd_install_plugin(args) -> int:
    """Write the .pth that lets ``lm_eval --model moepatch`` find the model (see moepatch_lm_eval_plugin)."""
    path = Path(args.site_dir or sysconfig.get_paths()["purelib"]) / PTH_NAME
    if args.uninstall:
        path.unlink(missing_ok=True)
        print(f"removed {path}")
        return 0
    path.write_text(PTH_LINE)
    print(f"wrote {path}: `lm_eval --model moepatch --tasks stdlib_cloze ...` now works")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="moepatch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    def command(name, help_text, fn=None, **kw):
        c = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter, **kw)
        c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of a failure")
        c.set_defaults(fn=fn)
        return c

    d = command("demo", "load statistics of tiny random models before/after capacity", _cmd_demo)
    d.add_argument("--families", nargs="*", help="model types, any supported one (default: "
                   f"{', '.join(HAND_FAMILIES)})")
    d.add_argument("--capacity-factor", type=positive(float), nargs="+", default=list(DEMO_GAMMAS),
                   help="capacity factors γ")
    e = command("eval", "quality sweep: the baseline and each capacity variant, with lm-eval", _cmd_eval)
    e.add_argument("--model", help="alias (mixtral, olmoe, deepseek-v2-lite, qwen-moe, qwen3-moe), hub id or local "
                                   "directory; default: the embedded model shipped with moepatch")
    e.add_argument("--tasks", help="comma-separated lm-eval tasks, or 'paper' (the paper's 9 tasks, "
                                   "recipes/eval/paper.yaml); default: the embedded offline tasks "
                                   "(stdlib_cloze, stdlib_ppl)")
    e.add_argument("--capacity-factor", type=_gammas, default=[1.0, 1.5, 2.0], metavar="G1,G2,...",
                   help="capacity factors γ")
    e.add_argument("--strategy", type=_csv("strategies"), default=["drop", "reroute", "expanded"],
                   metavar="S1,S2,...", help="of drop, reroute, expanded, expert_drop")
    e.add_argument("--policy", type=_csv("policies"), default=["score", "order", "random"], metavar="P1,P2,...",
                   help="drop policies, of score, order, reverse, random")
    e.add_argument("--limit", type=positive(float), help="lm-eval --limit: examples per task (or a fraction)")
    e.add_argument("--batch-size", type=positive(int), default=16, help="requests per forward (lm-eval's)")
    e.add_argument("--max-length", type=positive(int), default=None, help="default: the model's")
    e.add_argument("--dtype", default="auto", choices=loading.DTYPES,
                   help="auto: the checkpoint's on GPUs, float32 on the CPU")
    e.add_argument("--device", default="auto", help="auto (device_map='auto' on GPUs), cpu, cuda, cuda:1, ...")
    e.add_argument("--output", help="directory for results.json, results.csv and PNG plots")
    e.add_argument("--wide", action="store_true", help="print every task's column, however wide the table")
    # Commands in _PASSTHROUGH are listed here but never parsed here: main hands their arguments on.
    command("bench", "run a benchmark script (kernels, e2e, ep, scmoe); --help after the name", add_help=False)
    command("ep", "expert parallelism, one process per rank: demo or eval; --help after the name", add_help=False)
    command("tune", "autotune the Triton tile configs for this GPU", add_help=False)
    ip = command("install-lm-eval-plugin", "let `lm_eval --model moepatch --tasks stdlib_cloze` work (writes a .pth)",
                 _cmd_install_plugin)
    ip.add_argument("--site-dir", help="site-packages directory (default: this interpreter's purelib)")
    ip.add_argument("--uninstall", action="store_true")
    command("lm-eval", "lm-eval's CLI with the 'moepatch' model and the shipped tasks registered", add_help=False)
    s = command("stats", "load statistics of a model on a text file", _cmd_stats)
    s.add_argument("--model", help="alias, hub id or local directory (default: the embedded model)")
    s.add_argument("--dtype", default="auto", choices=loading.DTYPES,
                   help="auto: the checkpoint's on GPUs, float32 on the CPU")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    s.add_argument("--text", required=True, help="UTF-8 text file (required)")
    s.add_argument("--capacity-factor", type=capacity_factor, default=None, help="γ; none: native load only")
    s.add_argument("--strategy", default="drop", choices=STRATEGIES,
                   help="what an expert's overflow gets")
    s.add_argument("--seq-len", type=positive(int), default=512, help="tokens per forward window")
    s.add_argument("--max-tokens", type=positive(int), default=8192, help="tokens read from the text")
    s.add_argument("--output", help="write the statistics as JSON here")
    return p


# Commands whose arguments belong to another parser (lm-eval's, a script's) pass them through untouched.
_PASSTHROUGH = {"tune": _cmd_tune, "lm-eval": _cmd_lm_eval, "bench": _cmd_bench, "ep": run_ep}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (2: the user's input, 1: an internal error)."""
    # Nothing reaches the hub unless the user allows it (HF_HUB_OFFLINE=0); allowed but without a route
    # to it, the local caches are used at once instead of after tens of seconds of retries.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    loading.use_cache_if_hub_unreachable()
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    debug = "--debug" in argv[: argv.index(command)] if command in _PASSTHROUGH else "--debug" in argv
    prog = f"moepatch {command}".strip()
    rest = argv[argv.index(command) + 1:] if command else []
    if command in ("bench", "ep") and rest and not rest[0].startswith("-"):
        prog += f" {rest[0]}"
    try:
        if command in _PASSTHROUGH:
            return _PASSTHROUGH[command](rest)
        args, extra = build_parser().parse_known_args(argv)
        if extra:  # named by the subcommand, whose --help lists what it accepts
            raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see `moepatch {args.command} --help`)")
        return args.fn(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, (MoePatchError, FileNotFoundError)):
            print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        # An unexpected failure is still one line; --debug shows where.
        print(f"{prog}: internal error: {type(exc).__name__}: {_one_line(exc)} (run again with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
