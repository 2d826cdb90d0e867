"""Expert parallelism from the command line, one process per rank (torchrun / accelerate launch).

    moepatch ep demo [--nproc N] [--model-type mixtral] [--capacity-factor 1.0] ...
    moepatch ep eval [--nproc N] (--checkpoint DIR | --tiny TYPE) (--text FILE | --random-tokens N) ...

``demo`` checks real EP against the single-process simulation on a tiny model; ``eval`` measures
perplexity with each rank scoring its own share of the sequences.  Started without a launcher it
starts torchrun itself with ``--nproc`` ranks (default one per GPU, 2 on a CPU machine); under a
launcher run ``python -m moepatch.launch demo|eval ...`` (scripts/launch_ep.sh).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from moepatch.arguments import ArgumentParser, capacity_factor
from moepatch.errors import InvalidOptionError, UsageError
from moepatch.parallel.distributed import all_gather_floats, init_distributed, shutdown
from moepatch.parallel.ep import ep_barrier_loop
from moepatch.parallel.loading import load_expert_parallel
from moepatch.patch.core import apply, patched, remove, stats
from moepatch.patch.registry import supported_model_types
from moepatch.routing.config import POLICIES, STRATEGIES, make_config
from moepatch.scmoe.convert import next_token_nll
from moepatch.tiny import tiny_model

MODULE = "moepatch.launch"


def launched() -> bool:
    """True inside a rank started by torchrun / accelerate (they set RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch(target: list[str], nproc: int | None = None, limit_s: float | None = None,
             env: dict | None = None) -> int:
    """Run ``python TARGET...`` (``-m moepatch.launch demo ...`` or a script and its arguments, less ``--nproc N``,
    which torchrun would take for its own) under torchrun with ``nproc`` ranks (default one per GPU, 2 on a
    CPU), this checkout first on PYTHONPATH, ``env`` as defaults; past ``limit_s`` killed (exit status 124)."""
    import signal

    nproc = nproc or torch.cuda.device_count() or 2
    target = [a for i, a in enumerate(target)
              if not (a == "--nproc" or a.startswith("--nproc=") or (i and target[i - 1] == "--nproc"))]
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(env or {}, **os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target]
    print(f"moepatch: starting {nproc} ranks: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    if limit_s is None:
        return subprocess.call(cmd, env=env)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this call started: torchrun and its ranks
        proc.wait()
        print(f"moepatch: killed after {limit_s:.0f} s", file=sys.stderr, flush=True)
        return 124


def positive(kind=int, bound="> 0"):
    """An argparse type: a number of ``kind`` above 0 (``bound``: how the error message says so)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be {bound}")
        return value

    return parse


def _option(text: str):
    key, sep, raw = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--option {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _parser(prog: str) -> ArgumentParser:
    p = ArgumentParser(prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nproc", type=positive(int, ">= 1"), default=None,
                   help="ranks to start when run without a launcher (default: one per GPU, 2 on a CPU machine)")
    return p


def _parse(p: ArgumentParser, argv) -> argparse.Namespace:
    """``argv`` parsed by the command's parser ``p`` with the routing options added last."""
    p.add_argument("--capacity-factor", type=capacity_factor, default=1.0, help="gamma, or 'none' for no capacity")
    p.add_argument("--strategy", default="drop", choices=STRATEGIES)
    p.add_argument("--policy", default=None, choices=POLICIES)
    p.add_argument("--option", type=_option, action="append", default=[],
                   help="any other moepatch.apply option, KEY=VALUE (VALUE parsed as JSON), repeatable")
    return p.parse_args(argv)


def _routing(args) -> tuple:
    return args.capacity_factor, args.strategy, dict(args.option, **({"policy": args.policy} if args.policy else {}))


def _check_routing(args, model_type: str | None) -> None:
    """The patch options as ``moepatch.apply`` will validate them, and a family it patches."""
    gamma, strategy, opts = _routing(args)
    try:
        make_config(gamma, strategy, opts.pop("policy", None), **opts)
    except InvalidOptionError as exc:
        raise UsageError(str(exc)) from None
    if model_type is not None and model_type not in supported_model_types():
        raise UsageError(f"model type {model_type!r} is not supported; accepted: {', '.join(supported_model_types())}")


def _demo_args(argv, prog: str) -> argparse.Namespace:
    p = _parser(prog)
    p.add_argument("--model-type", default="mixtral")
    p.add_argument("--batch-per-rank", type=positive(int, ">= 1"), default=2)
    p.add_argument("--seq", type=positive(int, ">= 1"), default=16)
    args = _parse(p, argv)
    _check_routing(args, args.model_type)
    return args


def demo(args, rank: int, world: int, device: torch.device) -> int:
    gamma, strategy, opts = _routing(args)
    model = tiny_model(args.model_type).to(device)
    g = torch.Generator().manual_seed(0)
    ids_BS = torch.randint(3, 128, (args.batch_per_rank * world, args.seq), generator=g).to(device)
    mine = slice(rank * args.batch_per_rank, (rank + 1) * args.batch_per_rank)
    with torch.no_grad():
        with patched(model, gamma, strategy, ep_size=world, **dict(opts, kernel="torch")):
            ref = model(ids_BS).logits[mine]
        apply(model, gamma, strategy, expert_parallel=True, **opts)
        got = model(ids_BS[mine]).logits
        table = stats(model).table()
        remove(model)
    errs = [e for (e,) in all_gather_floats([float((got - ref).abs().max())], device)]
    ok = max(errs) <= 1e-4
    if rank == 0:
        print(f"rank 0 load statistics (its own {args.batch_per_rank}x{args.seq} tokens, capacity per source rank):")
        print(table)
        print(f"{args.model_type} {strategy} gamma={gamma} on {world} ranks: max |EP - simulated ep_size={world}| "
              f"per rank = {[f'{e:.1e}' for e in errs]} -> {'OK' if ok else 'MISMATCH'}", flush=True)
    return 0 if ok else 1


def _eval_args(argv, prog: str) -> argparse.Namespace:
    p = _parser(prog)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="local safetensors checkpoint (loaded sharded)")
    src.add_argument("--tiny", metavar="MODEL_TYPE", help="a tiny random model of this family (smoke runs)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--text", type=Path, help="a text file, tokenized with the checkpoint's tokenizer")
    data.add_argument("--random-tokens", type=int, help="this many random token ids (smoke runs)")
    p.add_argument("--seq-len", type=positive(int, ">= 1"), default=128)
    p.add_argument("--batch-size", type=positive(int, ">= 1"), default=4)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--out", type=Path)
    args = _parse(p, argv)
    if args.text is not None and args.checkpoint is None:
        p.error("--text needs --checkpoint (its tokenizer)")
    if args.checkpoint is not None and not (args.checkpoint / "config.json").is_file():
        raise UsageError(f"--checkpoint {args.checkpoint}: no config.json there; give a local checkpoint directory")
    if args.text is not None and not args.text.is_file():
        raise UsageError(f"--text {args.text}: no such file")
    if args.random_tokens is not None and args.random_tokens < 2:
        raise UsageError("--random-tokens must be >= 2")
    _check_routing(args, args.tiny)
    return args


def evaluate(args, rank: int, world: int, device: torch.device) -> int:
    dtype = getattr(torch, args.dtype)
    if args.checkpoint is not None:
        model = load_expert_parallel(args.checkpoint, rank, world, dtype=dtype, device=device)
    else:
        model = tiny_model(args.tiny, dtype=dtype).to(device)
    gamma, strategy, opts = _routing(args)
    apply(model, gamma, strategy, expert_parallel=True, **opts)
    if args.text is not None:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(args.checkpoint, local_files_only=True)
        ids = torch.tensor(tok(Path(args.text).read_text())["input_ids"])
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (args.random_tokens,), generator=g)
    n = ids.numel() // args.seq_len  # this rank's sequences: every world-th one (uneven counts are fine)
    seqs = list(ids[: n * args.seq_len].view(n, args.seq_len)[rank::world])
    batches = [torch.stack(seqs[i:i + args.batch_size]) for i in range(0, len(seqs), args.batch_size)]
    results = ep_barrier_loop(model, batches, lambda ids_BS: next_token_nll(model, ids_BS.to(device)))
    per_rank = all_gather_floats([sum(r[0] for r in results), sum(r[1] for r in results)], device)
    nll, tokens = (math.fsum(r[i] for r in per_rank) for i in (0, 1))
    layer_stats = stats(model)
    ppl = math.exp(nll / max(tokens, 1))
    if rank == 0:
        report = dict(perplexity=ppl, tokens=int(tokens), world=world, capacity_factor=gamma,
                      strategy=strategy, options=opts, rank0_batches=len(batches), rank0_stats=layer_stats.to_dict())
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "eval_ep.json").write_text(json.dumps(report, indent=1))
        print(layer_stats.table())
        print(f"perplexity {ppl:.3f} over {int(tokens)} tokens on {world} ranks ({strategy}, gamma={gamma})",
              flush=True)
    remove(model)
    return 0


COMMANDS = {"demo": (_demo_args, demo), "eval": (_eval_args, evaluate)}


def run(argv: list[str], prog: str = "moepatch ep") -> int:
    """``demo|eval ARGS``: check the arguments, then start the ranks (or, inside one, run the command).

    Bad input raises :class:`UsageError` before any rank starts."""
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage: {prog} {{demo,eval}} [--nproc N] [ARGS...]\n\n{__doc__}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        got = f"unknown command {argv[0]!r}; " if argv else ""
        raise UsageError(f"{got}accepted: {', '.join(COMMANDS)} (`{prog} demo --help` for its options)")
    parse, command = COMMANDS[argv[0]]
    args = parse(argv[1:], f"{prog} {argv[0]}")
    if not launched():
        return relaunch(["-m", MODULE, *argv], args.nproc)
    status = command(args, *init_distributed())
    shutdown()
    return status


def main(argv=None) -> int:
    """``python -m moepatch.launch demo|eval ...``: the entry point under torchrun / accelerate launch."""
    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return run(argv, prog=f"python -m {MODULE}")
    except UsageError as exc:
        print(f"{MODULE}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
