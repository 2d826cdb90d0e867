"""Command line for expert parallelism, one process per rank (torchrun / accelerate launch).

    python -m moepatch.parallel.run demo  [--model-type mixtral] [--capacity-factor 1.0] ...
    python -m moepatch.parallel.run bench --out DIR [--smoke] ...      (moepatch/parallel/bench.py)
    python -m moepatch.parallel.run eval  (--checkpoint DIR | --tiny TYPE) (--text FILE | --random-tokens N) ...

``demo`` checks real EP against the single-process simulation on a tiny model and prints the
per-rank error and the load statistics; ``eval`` measures perplexity with each rank scoring its
own share of the sequences (shares may be uneven: ``ep_barrier_loop`` keeps the ranks in step).
Launch with ``scripts/launch_ep.sh`` or e.g. ``torchrun --nproc_per_node 2 -m moepatch.parallel.run demo``;
started without a launcher, it starts torchrun itself with one rank per GPU (2 ranks on a CPU
machine, or ``$MOEPATCH_EP_NPROC``).
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

from ..arguments import ArgumentParser, capacity_factor
from ..errors import UsageError


def _option(text: str):
    key, sep, raw = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--option {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _add_routing(p: argparse.ArgumentParser) -> None:
    p.add_argument("--capacity-factor", type=capacity_factor, default=1.0, help="gamma, or 'none' for no capacity")
    p.add_argument("--strategy", default="drop", choices=("drop", "reroute", "expanded", "expert_drop"))
    p.add_argument("--policy", default=None, choices=("score", "order", "reverse", "random"))
    p.add_argument("--option", type=_option, action="append", default=[],
                   help="any other moepatch.apply option, KEY=VALUE (VALUE parsed as JSON), repeatable")


def _routing(args) -> tuple:
    return args.capacity_factor, args.strategy, dict(args.option, **({"policy": args.policy} if args.policy else {}))


def _check_routing(args, model_type: str | None) -> None:
    """The patch options as ``moepatch.apply`` will validate them, and a family it patches."""
    from ..errors import InvalidOptionError
    from ..patch.registry import supported_model_types
    from ..routing.config import make_config

    gamma, strategy, opts = _routing(args)
    try:
        make_config(gamma, strategy, opts.pop("policy", None), **opts)
    except InvalidOptionError as exc:
        raise UsageError(str(exc)) from None
    if model_type is not None and model_type not in supported_model_types():
        raise UsageError(f"model type {model_type!r} is not supported; accepted: {', '.join(supported_model_types())}")


def _demo_args(argv) -> argparse.Namespace:
    p = ArgumentParser(prog="moepatch.parallel.run demo", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-type", default="mixtral")
    p.add_argument("--batch-per-rank", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    _add_routing(p)
    args = p.parse_args(argv)
    if args.batch_per_rank < 1 or args.seq < 1:
        raise UsageError("--batch-per-rank and --seq must be >= 1")
    _check_routing(args, args.model_type)
    return args


def demo(args) -> int:
    import torch.distributed as dist

    import moepatch
    from moepatch.parallel import init_distributed
    from moepatch.tiny import tiny_model

    rank, world, device = init_distributed()
    gamma, strategy, opts = _routing(args)
    model = tiny_model(args.model_type).to(device)
    g = torch.Generator().manual_seed(0)
    ids_BS = torch.randint(3, 128, (args.batch_per_rank * world, args.seq), generator=g).to(device)
    mine = slice(rank * args.batch_per_rank, (rank + 1) * args.batch_per_rank)
    with torch.no_grad():
        with moepatch.patched(model, gamma, strategy, ep_size=world, **dict(opts, kernel="torch")):
            ref = model(ids_BS).logits[mine]
        moepatch.apply(model, gamma, strategy, expert_parallel=True, **opts)
        got = model(ids_BS[mine]).logits
        table = moepatch.stats(model).table()
        moepatch.remove(model)
    err = torch.tensor([float((got - ref).abs().max())], device=device)
    errs = [torch.zeros_like(err) for _ in range(world)]
    dist.all_gather(errs, err)
    worst = max(float(e) for e in errs)
    ok = worst <= 1e-4
    if rank == 0:
        print(f"rank 0 load statistics (its own {args.batch_per_rank}x{args.seq} tokens, capacity per source rank):")
        print(table)
        print(f"{args.model_type} {strategy} gamma={gamma} on {world} ranks: max |EP - simulated ep_size={world}| "
              f"per rank = {[f'{float(e):.1e}' for e in errs]} -> {'OK' if ok else 'MISMATCH'}", flush=True)
    dist.destroy_process_group()
    return 0 if ok else 1


def _sequences(args, rank: int, world: int, vocab: int) -> list[torch.Tensor]:
    """This rank's sequences: every world-th one, so ranks get uneven counts when they do not divide."""
    if args.text is not None:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(args.checkpoint, local_files_only=True)
        ids = torch.tensor(tok(Path(args.text).read_text())["input_ids"])
    else:
        ids = torch.randint(3, vocab, (args.random_tokens,), generator=torch.Generator().manual_seed(0))
    n = ids.numel() // args.seq_len
    seqs = ids[: n * args.seq_len].view(n, args.seq_len)
    return list(seqs[rank::world])


def _eval_args(argv) -> argparse.Namespace:
    p = ArgumentParser(prog="moepatch.parallel.run eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="local safetensors checkpoint (loaded sharded)")
    src.add_argument("--tiny", metavar="MODEL_TYPE", help="a tiny random model of this family (smoke runs)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--text", type=Path, help="a text file, tokenized with the checkpoint's tokenizer")
    data.add_argument("--random-tokens", type=int, help="this many random token ids (smoke runs)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--out", type=Path)
    _add_routing(p)
    args = p.parse_args(argv)
    if args.text is not None and args.checkpoint is None:
        p.error("--text needs --checkpoint (its tokenizer)")
    if args.checkpoint is not None and not (args.checkpoint / "config.json").is_file():
        raise UsageError(f"--checkpoint {args.checkpoint}: no config.json there; give a local checkpoint directory")
    if args.text is not None and not args.text.is_file():
        raise UsageError(f"--text {args.text}: no such file")
    if min(args.seq_len, args.batch_size) < 1 or (args.random_tokens is not None and args.random_tokens < 2):
        raise UsageError("--seq-len and --batch-size must be >= 1, --random-tokens >= 2")
    _check_routing(args, args.tiny)
    return args


def evaluate(args) -> int:
    import torch.distributed as dist

    import moepatch
    from moepatch.parallel import ep_barrier_loop, init_distributed, load_expert_parallel
    from moepatch.tiny import tiny_model

    rank, world, device = init_distributed()
    dtype = getattr(torch, args.dtype)
    if args.checkpoint is not None:
        model = load_expert_parallel(args.checkpoint, rank, world, dtype=dtype, device=device)
    else:
        model = tiny_model(args.tiny, dtype=dtype).to(device)
    gamma, strategy, opts = _routing(args)
    moepatch.apply(model, gamma, strategy, expert_parallel=True, **opts)
    seqs = _sequences(args, rank, world, model.config.vocab_size)
    batches = [torch.stack(seqs[i:i + args.batch_size]) for i in range(0, len(seqs), args.batch_size)]

    def step(ids_BS):
        with torch.no_grad():
            logits = model(ids_BS.to(device)).logits[:, :-1].float()
        target = ids_BS[:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                reduction="sum")
        return float(nll), target.numel()

    results = ep_barrier_loop(model, batches, step)
    totals = torch.tensor([sum(r[0] for r in results), sum(r[1] for r in results)], dtype=torch.float64,
                          device=device)
    dist.all_reduce(totals)
    stats = moepatch.stats(model)
    ppl = math.exp(totals[0].item() / max(totals[1].item(), 1))
    if rank == 0:
        report = dict(perplexity=ppl, tokens=int(totals[1].item()), world=world, capacity_factor=gamma,
                      strategy=strategy, options=opts, rank0_batches=len(batches), rank0_stats=stats.to_dict())
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "eval_ep.json").write_text(json.dumps(report, indent=1))
        print(stats.table())
        print(f"perplexity {ppl:.3f} over {int(totals[1].item())} tokens on {world} ranks "
              f"({strategy}, gamma={gamma})", flush=True)
    moepatch.remove(model)
    dist.destroy_process_group()
    return 0


def launched() -> bool:
    """True inside a rank started by torchrun / accelerate (they set RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch(argv: list[str]) -> int:
    """Run ``python -m moepatch.parallel.run ARGV`` under torchrun, one rank per GPU (2 on a CPU)."""
    nproc = int(os.environ.get("MOEPATCH_EP_NPROC", "0")) or torch.cuda.device_count() or 2
    repo = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "moepatch.parallel.run", *argv]
    print(f"moepatch: starting {nproc} ranks: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    return subprocess.call(cmd, env=env)


def _bench_args(argv) -> list:
    from .bench import parse_args

    parse_args(argv)  # its errors (SystemExit 2 with argparse's message) come before any rank starts
    return argv


_COMMANDS = {"demo": (_demo_args, demo), "eval": (_eval_args, evaluate), "bench": (_bench_args, None)}


def main(argv=None) -> int:
    """Validate the command line, then start the ranks (or, inside one, run the command)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in _COMMANDS:
        got = f"unknown command {argv[0]!r}; " if argv else ""
        print(f"moepatch.parallel.run: error: {got}accepted: {', '.join(_COMMANDS)} (see the module's docstring: "
              "python -m moepatch.parallel.run demo --help)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parse, run_command = _COMMANDS[argv[0]]
    try:
        args = parse(argv[1:])
    except UsageError as exc:
        print(f"moepatch.parallel.run {argv[0]}: error: {exc}", file=sys.stderr)
        return 2
    if not launched():
        return relaunch(argv)
    if run_command is None:
        from .bench import main as bench_main

        return bench_main(args)
    return run_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
