"""Train a top-2 MoE and an ScMoE (Pos-2, CG-1) with equal active parameters on the same tokens.

Both models alternate dense and MoE blocks (``moepatch.scmoe.ScMoEConfig``) with the same
backbone; the baseline's MoE blocks route top-2 over E experts, the ScMoE blocks run a shared
expert of the same width plus top-1 over E experts on the Pos-2 shortcut, so both activate the
same parameters per token (ScMoE has one D-vector CG-1 gate per MoE block more; the JSON has the
exact counts).  They see the same batches in the same order (same seed) for the same number of
steps: the step count is fixed before training, from a short timing probe of every model, as the
most steps the slowest model fits in ``--max-minutes``; the wall clock is still a hard limit per
model (a model stopped by it is marked ``stopped_by_clock``).

Outputs in ``--out``: ``scmoe_train.json`` (configs, parameter counts, the step count, training
and validation curves, throughput) and ``scmoe_val_loss.png`` (validation loss against tokens).

GPU (the data directory is git-ignored: carry it)::

    PYTHONPATH=$PWD python3 recipes/scmoe/train.py --data-dir .cache/embedded_data --out "$OUT" --max-minutes 3

CPU smoke run (tiny model, a few steps)::

    python3 recipes/scmoe/train.py --smoke --out /tmp/scmoe_smoke
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS = {
    "top2": dict(arch="top2"),
    "scmoe": dict(arch="scmoe", position=2, combine="cg1"),
    # Further variants for ablations (--models top2,scmoe,scmoe-add,...).
    "scmoe-add": dict(arch="scmoe", position=2, combine="add"),
    "scmoe-pos1": dict(arch="scmoe", position=1, combine="cg1"),
    "scmoe-pos3": dict(arch="scmoe", position=3, combine="cg1"),
    "shared": dict(arch="shared", combine="add"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=REPO_ROOT / ".cache" / "embedded_data",
                   help="written by recipes/embedded/prepare.py: train.npy, validation.npy (uint16), meta.json")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--models", default="top2,scmoe", help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--smoke", action="store_true", help="tiny model and a few steps (CPU check)")
    m = p.add_argument_group("model (shared by every variant)")
    m.add_argument("--hidden-size", type=int, default=256)
    m.add_argument("--num-layers", type=int, default=8, help="dense and MoE blocks alternate")
    m.add_argument("--num-heads", type=int, default=8)
    m.add_argument("--intermediate-size", type=int, default=512, help="dense MLP width")
    m.add_argument("--expert-intermediate-size", type=int, default=512, help="routed and shared expert width")
    m.add_argument("--num-experts", type=int, default=8)
    m.add_argument("--aux-loss-coef", type=float, default=0.01)
    t = p.add_argument_group("training")
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--max-steps", type=int, default=4000, help="upper bound; the time budget usually decides")
    t.add_argument("--max-minutes", type=float, default=3.0, help="wall-clock budget per model (hard limit)")
    t.add_argument("--reserve-seconds", type=float, default=15.0,
                   help="part of each model's budget kept for evaluations and the final one")
    t.add_argument("--probe-steps", type=int, default=8, help="timed steps per model to fix the step count")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--min-lr-ratio", type=float, default=0.1)
    t.add_argument("--warmup-steps", type=int, default=100)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--device", default=None)
    r = p.add_argument_group("reporting")
    r.add_argument("--eval-every", type=int, default=100)
    r.add_argument("--eval-max-batches", type=int, default=8, help="validation batches per evaluation (0 = all)")
    r.add_argument("--log-every", type=int, default=50)
    if p.parse_known_args(argv)[0].smoke:
        # Presets; flags given explicitly still win.
        p.set_defaults(hidden_size=32, num_layers=4, num_heads=4, intermediate_size=32, expert_intermediate_size=32,
                       num_experts=4, seq_len=32, batch_size=4, max_steps=6, warmup_steps=2, eval_every=3,
                       eval_max_batches=2, log_every=3, probe_steps=1, reserve_seconds=0.0)
    args = p.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        p.error(f"--models {args.models!r}: accepted names {', '.join(MODELS)}")
    args.model_names = names
    return args


def lr_at(step: int, total: int, args) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio · lr at ``total`` steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    frac = min(1.0, (step - args.warmup_steps) / max(1, total - args.warmup_steps))
    lo = args.lr * args.min_lr_ratio
    return lo + 0.5 * (args.lr - lo) * (1.0 + math.cos(math.pi * frac))


def main(argv=None) -> int:
    t_start = time.time()
    args = parse_args(argv)
    import numpy as np
    import torch

    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from moepatch.scmoe import ScMoEConfig, active_parameters, build_scmoe

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.set_float32_matmul_precision("high")

    # ---- data ------------------------------------------------------------------------------------
    meta = json.loads((args.data_dir / "meta.json").read_text(encoding="utf-8"))
    vocab = int(meta["vocab_size"])
    train_tokens = torch.from_numpy(np.load(args.data_dir / "train.npy").astype(np.int32)).to(device)
    val_tokens = torch.from_numpy(np.load(args.data_dir / "validation.npy").astype(np.int32)).to(device)
    L, B = args.seq_len, args.batch_size
    window = torch.arange(L + 1, device=device)
    n_val = (val_tokens.numel() - 1) // L
    val_starts = torch.arange(n_val, device=device) * L
    if args.eval_max_batches > 0:
        val_starts = val_starts[: args.eval_max_batches * B]

    def batches(seed: int):
        """The training stream: uniformly random windows from a seeded device generator (same for every model)."""
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        while True:
            starts = torch.randint(0, train_tokens.numel() - L - 1, (B,), device=device, generator=gen)
            yield train_tokens[starts[:, None] + window].long()

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_cuda)

    def make(name: str):
        cfg = ScMoEConfig(vocab_size=vocab, hidden_size=args.hidden_size, num_layers=args.num_layers,
                          num_heads=args.num_heads, intermediate_size=args.intermediate_size,
                          expert_intermediate_size=args.expert_intermediate_size, num_experts=args.num_experts,
                          aux_loss_coef=args.aux_loss_coef, max_position_embeddings=max(L + 1, 64),
                          **MODELS[name])
        torch.manual_seed(args.seed)
        model = build_scmoe(cfg).to(device)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                                eps=1e-8, fused=use_cuda)
        return model, opt

    def train_step(model, opt, batch, lr):
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast():
            out = model(batch, labels=batch)
        out.loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.lm_loss.detach(), out.aux_loss.detach()

    @torch.no_grad()
    def evaluate(model) -> float:
        model.eval()
        total, count = torch.zeros((), device=device, dtype=torch.float64), 0
        for i in range(0, val_starts.numel(), B):
            batch = val_tokens[val_starts[i:i + B, None] + window].long()
            with autocast():
                logits = model(batch[:, :-1]).logits
            total += torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), batch[:, 1:].reshape(-1),
                                                       reduction="sum").double()
            count += batch[:, 1:].numel()
        model.train()
        return float(total.item() / count)  # NOTE: host sync (once per evaluation)

    def sync():
        if use_cuda:
            torch.cuda.synchronize()

    # ---- fix the step count: every model trains the same number of steps on the same batches -------
    budget_s = args.max_minutes * 60.0
    probe = {}
    for name in args.model_names:
        model, opt = make(name)
        stream = batches(args.seed + 1)  # a different stream than training: the probe does not shift it
        train_step(model, opt, next(stream), 0.0)  # warm-up (allocations, autotuning)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.probe_steps):
            train_step(model, opt, next(stream), 0.0)
        sync()
        probe[name] = (time.perf_counter() - t0) / max(args.probe_steps, 1)
        eval_t0 = time.perf_counter()
        evaluate(model)
        probe[name + ":eval"] = time.perf_counter() - eval_t0
        del model, opt
    steps = args.max_steps
    for name in args.model_names:
        n_evals = steps // args.eval_every + 1
        fit = (budget_s - args.reserve_seconds - n_evals * probe[name + ":eval"]) / max(probe[name], 1e-9)
        steps = max(1, min(steps, int(fit * 0.95)))  # 5% slack for step-time jitter
    print("step time probe: " + ", ".join(f"{n} {probe[n] * 1e3:.1f} ms" for n in args.model_names)
          + f" -> {steps} steps of {B}x{L} tokens each for every model", flush=True)

    # ---- train each model ---------------------------------------------------------------------------
    results = {}
    for name in args.model_names:
        model, opt = make(name)
        counts = active_parameters(model)
        model.train()
        stream = batches(args.seed)
        curve, train_log = [], []
        acc_ce = torch.zeros((), device=device)
        acc_aux = torch.zeros((), device=device)
        acc_n, stopped_by_clock = 0, False
        t_model = time.time()
        deadline = t_model + budget_s - args.reserve_seconds
        curve.append({"step": 0, "tokens": 0, "val_loss": evaluate(model), "elapsed_s": 0.0})
        done = 0
        for step in range(1, steps + 1):
            if time.time() >= deadline:
                stopped_by_clock = True
                break
            ce, aux = train_step(model, opt, next(stream), lr_at(step - 1, steps, args))
            acc_ce += ce
            acc_aux += aux
            acc_n += 1
            done = step
            if step % args.log_every == 0 or step == steps:
                ce_m, aux_m = (acc_ce / acc_n).item(), (acc_aux / acc_n).item()
                train_log.append({"step": step, "tokens": step * B * L, "loss": ce_m, "aux_loss": aux_m,
                                  "elapsed_s": time.time() - t_model})
                print(f"{name:>10} step {step:5d} | loss {ce_m:.4f} | aux {aux_m:.4f} | "
                      f"{time.time() - t_model:6.1f}s", flush=True)
                acc_ce.zero_()
                acc_aux.zero_()
                acc_n = 0
            if step % args.eval_every == 0 and step != steps:
                curve.append({"step": step, "tokens": step * B * L, "val_loss": evaluate(model),
                              "elapsed_s": time.time() - t_model})
        sync()
        train_s = time.time() - t_model
        final = evaluate(model)
        curve.append({"step": done, "tokens": done * B * L, "val_loss": final, "elapsed_s": time.time() - t_model})
        print(f"{name:>10} final val loss {final:.4f} after {done} steps ({train_s:.1f}s)", flush=True)
        results[name] = {"config": model.config.to_dict(), "params": counts, "steps": done,
                         "stopped_by_clock": stopped_by_clock, "final_val_loss": final,
                         "tokens_per_s": done * B * L / max(train_s, 1e-9), "probe_step_s": probe[name],
                         "validation": curve, "train": train_log}
        del model, opt
        if use_cuda:
            torch.cuda.empty_cache()

    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": {"device": torch.cuda.get_device_name(device) if use_cuda else platform.processor() or "cpu",
                        "torch": torch.__version__, "python": platform.python_version()},
        "data": {"train_tokens": int(train_tokens.numel()), "validation_tokens_used": int(val_starts.numel() * L),
                 "tokens_per_step": B * L, "steps": steps},
        "models": results,
        "total_seconds": time.time() - t_start,
    }
    (args.out / "scmoe_train.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    plotted = plot(report, args.out / "scmoe_val_loss.png")
    rows = [f"{'model':>10} {'active params':>14} {'total params':>13} {'steps':>6} {'val loss':>9} {'tok/s':>10}"]
    for name, r in results.items():
        rows.append(f"{name:>10} {r['params']['active']:>14,} {r['params']['total']:>13,} {r['steps']:>6} "
                    f"{r['final_val_loss']:>9.4f} {r['tokens_per_s']:>10,.0f}")
    print("\n".join(rows))
    print(f"wrote {args.out / 'scmoe_train.json'}" + (f" and {args.out / 'scmoe_val_loss.png'}" if plotted else
                                                     " (matplotlib missing: no PNG)"))
    return 0


def plot(report: dict, path: Path) -> bool:
    """Validation loss against tokens for every model; False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")  # headless machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in report["models"].items():
        pts = r["validation"]
        p = r["params"]
        ax.plot([q["tokens"] / 1e6 for q in pts], [q["val_loss"] for q in pts], "o-", ms=3,
                label=f"{name} ({p['active'] / 1e6:.2f}M active, final {r['final_val_loss']:.3f})")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{' vs '.join(report['models'])}: {report['data']['steps']} steps each, same batches")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


if __name__ == "__main__":
    sys.exit(main())
