"""Train the small OLMoE-architecture model that moepatch ships as its offline default.

The model is a ~4M-parameter ``transformers.OlmoeForCausalLM`` (hidden 128,
4 layers, 16 experts of width 128, top-2 routing, tied embeddings) trained on
the stdlib token arrays written by ``prepare.py``.  Training uses AdamW with
linear warmup and cosine decay, bf16 autocast on CUDA (fp32 on CPU), the
OLMoE load-balancing auxiliary loss (``router_aux_loss_coef``), a fixed seed, a
step limit and a wall-clock budget.  The final (or best-validation) weights are
saved in bfloat16 with ``save_pretrained`` (safetensors) next to a copy of the
tokenizer, together with ``train_log.json`` and ``loss_curve.png``.

Typical use (GPU machine, repository root, data prepared on the CPU machine)::

    PYTHONPATH=$PWD python3 recipes/embedded/train.py \\
        --data-dir .cache/embedded_data --out moepatch/data/embedded_model

CPU smoke test::

    python3 recipes/embedded/train.py --max-steps 20 --batch-size 4 --eval-every 10 \\
        --log-every 5 --eval-max-batches 4 --out .cache/embedded_smoke
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train the embedded OLMoE default model on data prepared by prepare.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = p.add_argument_group("input/output")
    io.add_argument("--data-dir", type=Path, default=REPO_ROOT / ".cache" / "embedded_data",
                    help="directory written by prepare.py (tokenizer/, train.npy, validation.npy, meta.json)")
    io.add_argument("--out", type=Path, default=REPO_ROOT / "moepatch" / "data" / "embedded_model",
                    help="output directory for the model, tokenizer, train_log.json and loss_curve.png")
    io.add_argument("--log-dir", type=Path, default=None,
                    help="where to write train_log.json and loss_curve.png (default: --out)")

    model = p.add_argument_group("model")
    model.add_argument("--hidden-size", type=int, default=128)
    model.add_argument("--intermediate-size", type=int, default=128, help="per-expert FFN width")
    model.add_argument("--num-layers", type=int, default=4)
    model.add_argument("--num-heads", type=int, default=4)
    model.add_argument("--num-experts", type=int, default=16)
    model.add_argument("--top-k", type=int, default=2, help="num_experts_per_tok")
    model.add_argument("--aux-loss-coef", type=float, default=0.01, help="router_aux_loss_coef")
    model.add_argument("--max-position-embeddings", type=int, default=512)
    model.add_argument("--no-tie-embeddings", action="store_true",
                       help="untie the LM head from the input embeddings (tied by default)")
    model.add_argument("--experts-impl", default=None,
                       help="transformers experts implementation: 'grouped_mm', 'eager', or 'auto' (time a "
                            "few steps of each and keep the faster); default: 'auto' on CUDA, the "
                            "transformers default on CPU")

    train = p.add_argument_group("training")
    train.add_argument("--seq-len", type=int, default=256)
    train.add_argument("--batch-size", type=int, default=64, help="sequences per optimizer step")
    train.add_argument("--max-steps", type=int, default=3000)
    train.add_argument("--max-minutes", type=float, default=8.0,
                       help="wall-clock budget for the whole run (startup, training, final eval and saving); "
                            "training stops early and the cosine schedule is compressed to fit")
    train.add_argument("--reserve-seconds", type=float, default=30.0,
                       help="part of --max-minutes kept for the final evaluation and saving")
    train.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    train.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of --lr")
    train.add_argument("--warmup-steps", type=int, default=100)
    train.add_argument("--weight-decay", type=float, default=0.1, help="applied to matrices only")
    train.add_argument("--beta2", type=float, default=0.95)
    train.add_argument("--grad-clip", type=float, default=1.0)
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument("--device", default=None, help="torch device (default: cuda if available else cpu)")
    train.add_argument("--compile", action="store_true",
                       help="torch.compile the model (off by default: compile time eats into the budget)")
    train.add_argument("--no-keep-best", action="store_true",
                       help="save the last weights even if an earlier validation loss was lower")

    report = p.add_argument_group("reporting")
    report.add_argument("--log-every", type=int, default=50, help="print training progress every N steps")
    report.add_argument("--eval-every", type=int, default=250, help="evaluate validation loss every N steps")
    report.add_argument("--eval-max-batches", type=int, default=0,
                        help="cap on validation batches per evaluation (0 = whole validation split)")
    report.add_argument("--replot", type=Path, default=None, metavar="TRAIN_LOG_JSON",
                        help="only redraw loss_curve.png next to an existing train_log.json and exit "
                             "(for runs on a machine without matplotlib)")
    return p.parse_args(argv)


def lr_at(step: int, progress: float, args: argparse.Namespace) -> float:
    """Linear warmup over ``--warmup-steps``, then cosine decay to ``min_lr``.

    ``progress`` in [0, 1] is the larger of the step fraction and the
    wall-clock fraction, so a run cut short by ``--max-minutes`` still anneals.
    """
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    warm_frac = args.warmup_steps / max(1, args.max_steps)
    t = min(1.0, max(0.0, (progress - warm_frac) / max(1e-9, 1.0 - warm_frac)))
    min_lr = args.lr * args.min_lr_ratio
    return min_lr + 0.5 * (args.lr - min_lr) * (1.0 + math.cos(math.pi * t))


def build_model(args: argparse.Namespace, vocab_size: int, eot_id: int):
    """Construct a randomly initialised OLMoE model with the recipe's config."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    config = OlmoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_heads,
        num_experts=args.num_experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=False,
        router_aux_loss_coef=args.aux_loss_coef,
        max_position_embeddings=args.max_position_embeddings,
        tie_word_embeddings=not args.no_tie_embeddings,
        # No padding_idx: <|endoftext|> doubles as pad, and nn.Embedding would
        # pin its input embedding to zero and never train it.  Generation gets
        # its pad id from generation_config below.
        pad_token_id=None,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        # Router logits are requested per forward call while training, so the
        # saved config keeps inference cheap.
        output_router_logits=False,
    )
    model = OlmoeForCausalLM(config)
    model.generation_config.pad_token_id = eot_id
    model.generation_config.bos_token_id = eot_id
    model.generation_config.eos_token_id = eot_id
    if args.experts_impl and args.experts_impl != "auto":
        model.set_experts_implementation(args.experts_impl)
    return model


def pick_experts_impl(model, batch, autocast, candidates=("grouped_mm", "eager"), steps=5):
    """Time forward+backward with each experts implementation and keep the fastest.

    With fp32 master weights under bf16 autocast the expert GEMMs stay fp32,
    where torch's grouped_mm falls back to a per-expert loop with host syncs;
    whether that beats the eager per-expert loop depends on the GPU and torch
    build, so measure instead of guessing.  Parameters are not updated.
    """
    import torch

    sync = torch.cuda.synchronize if batch.is_cuda else (lambda: None)
    timings = {}
    for impl in candidates:
        try:
            model.set_experts_implementation(impl)
        except (ValueError, ImportError, RuntimeError):
            continue
        for i in range(2 + steps):  # two warm-up iterations, then timed ones
            if i == 2:
                sync()
                t0 = time.perf_counter()
            with autocast():
                out = model(input_ids=batch[:, :-1], output_router_logits=True, use_cache=False)
                proxy = out.logits.float().mean() + out.aux_loss.float()
            proxy.backward()
        sync()
        timings[impl] = (time.perf_counter() - t0) / steps
        model.zero_grad(set_to_none=True)
    best = min(timings, key=timings.get)
    model.set_experts_implementation(best)
    return best, timings


def count_params(model) -> dict[str, int]:
    """Unique parameter counts (tied weights counted once) and active params per token."""
    seen, total, expert = set(), 0, 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if ".experts." in name:
            expert += p.numel()
    cfg = model.config
    active = total - expert + expert * cfg.num_experts_per_tok // cfg.num_experts
    return {"total": total, "experts": expert, "active_per_token": active}


def main(argv: list[str] | None = None) -> None:
    t_start = time.time()
    args = parse_args(argv)
    if args.replot is not None:
        log = json.loads(args.replot.read_text(encoding="utf-8"))
        plot_curve(log, args.replot.with_name("loss_curve.png"))
        return

    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import PreTrainedTokenizerFast

    budget_s = args.max_minutes * 60.0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_cuda = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_cuda else None
    torch.manual_seed(args.seed)
    if use_cuda:
        # TF32 for the remaining fp32 matmuls (e.g. grouped expert GEMMs on fp32 master weights).
        torch.set_float32_matmul_precision("high")

    # ---- data -------------------------------------------------------------------------------
    meta = json.loads((args.data_dir / "meta.json").read_text(encoding="utf-8"))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(args.data_dir / "tokenizer"))
    eot_id = int(meta["eot_id"])
    vocab_size = int(meta["vocab_size"])
    if len(tokenizer) != vocab_size or tokenizer.eos_token_id != eot_id:
        raise SystemExit("tokenizer in --data-dir does not match meta.json; re-run prepare.py")

    def load_tokens(name: str):
        arr = np.load(args.data_dir / f"{name}.npy")
        # Whole splits fit easily in device memory (a few MB); int32 halves it
        # versus int64, and batches are widened only after gathering.
        return torch.from_numpy(arr.astype(np.int32)).to(device)

    train_tokens = load_tokens("train")
    val_tokens = load_tokens("validation")
    L, B = args.seq_len, args.batch_size
    if train_tokens.numel() <= L + 1 or val_tokens.numel() <= L + 1:
        raise SystemExit("token arrays are shorter than one training window")
    window = torch.arange(L + 1, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)

    def train_batch():
        # Uniformly random windows (nanoGPT style); the generator lives on the
        # device so sampling needs no host round trip.
        starts = torch.randint(0, train_tokens.numel() - L - 1, (B,), device=device, generator=gen)
        return train_tokens[starts[:, None] + window].long()

    # Validation: fixed, non-overlapping windows covering the whole split.
    n_val = (val_tokens.numel() - 1) // L
    val_windows = val_tokens[: n_val * L + 1]
    val_starts = torch.arange(n_val, device=device) * L
    if args.eval_max_batches > 0:
        val_starts = val_starts[: args.eval_max_batches * B]

    # ---- model ------------------------------------------------------------------------------
    model = build_model(args, vocab_size, eot_id).to(device)
    params = count_params(model)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if tied == args.no_tie_embeddings:
        raise SystemExit(f"tie_word_embeddings did not take effect (tied={tied})")

    decay, no_decay = [], []
    seen = set()
    for _, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        # Decay matrices (incl. embeddings, experts, router); keep norms free.
        (decay if p.dim() >= 2 else no_decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, args.beta2), eps=1e-8, fused=use_cuda,
    )

    def autocast():
        if amp_dtype is None:
            return torch.autocast(device_type=device.type, enabled=False)
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    impl_timings = {}
    if args.experts_impl == "auto" or (args.experts_impl is None and use_cuda):
        # A fixed batch (the first windows of the split) keeps the training
        # batch stream, and so the run, independent of the benchmark.
        probe = train_tokens[torch.arange(B, device=device)[:, None] * L + window].long()
        chosen, impl_timings = pick_experts_impl(model, probe, autocast)
        print("experts implementation: " + ", ".join(
            f"{k} {v * 1e3:.1f} ms/fwd+bwd" for k, v in impl_timings.items()) + f" -> {chosen}")
    forward = torch.compile(model) if args.compile else model

    def losses(batch):
        out = forward(input_ids=batch[:, :-1], output_router_logits=True, use_cache=False)
        # Own cross-entropy on explicit targets rather than labels=: identical
        # across transformers versions, and CE and aux are reported separately.
        ce = F.cross_entropy(out.logits.float().reshape(-1, vocab_size), batch[:, 1:].reshape(-1))
        return ce, out.aux_loss.float()

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        total, count = torch.zeros((), device=device, dtype=torch.float64), 0
        for i in range(0, val_starts.numel(), B):
            batch = val_windows[val_starts[i: i + B, None] + window].long()
            with autocast():
                logits = forward(input_ids=batch[:, :-1], use_cache=False).logits
            total += F.cross_entropy(
                logits.float().reshape(-1, vocab_size), batch[:, 1:].reshape(-1), reduction="sum"
            ).double()
            count += batch[:, 1:].numel()
        model.train()
        return float(total.item() / count)

    header = {
        "device": torch.cuda.get_device_name(device) if use_cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "params": params,
        "tied_embeddings": tied,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "experts_implementation_timings_s": impl_timings,
        "train_tokens": int(train_tokens.numel()),
        "validation_tokens": int(val_tokens.numel()),
        "tokens_per_step": B * L,
    }
    print(
        f"model: {params['total'] / 1e6:.2f}M params ({params['active_per_token'] / 1e6:.2f}M active/token), "
        f"tied={tied}, experts_impl={header['experts_implementation']}, device={header['device']}, "
        f"amp={'bf16' if amp_dtype else 'fp32'}"
    )
    print(
        f"data: {header['train_tokens']:,} train / {header['validation_tokens']:,} validation tokens; "
        f"{B}x{L} = {B * L:,} tokens/step; {args.max_steps} steps = "
        f"{args.max_steps * B * L / header['train_tokens']:.1f} epochs; budget {args.max_minutes:.1f} min"
    )

    # ---- training loop ------------------------------------------------------------------------
    log = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "meta": meta, "header": header, "train": [], "validation": []}
    best = {"val_loss": float("inf"), "step": -1, "state": None}

    def record_validation(step: int, elapsed: float) -> float:
        val = evaluate()
        log["validation"].append({"step": step, "val_loss": val, "val_ppl": math.exp(val), "elapsed_s": elapsed})
        print(f"step {step:5d} | val loss {val:.4f} | val ppl {math.exp(val):8.2f} | elapsed {elapsed:6.1f}s",
              flush=True)
        if val < best["val_loss"] and not args.no_keep_best:
            best.update(val_loss=val, step=step,
                        state={k: v.detach().clone() for k, v in model.state_dict().items()})
        return val

    model.train()
    train_start = time.time()
    train_deadline = t_start + budget_s - args.reserve_seconds
    acc_ce = torch.zeros((), device=device)
    acc_aux = torch.zeros((), device=device)
    acc_n, last_log_t, last_log_step = 0, time.time(), 0
    stop_reason = "max_steps"
    step = 0
    for step in range(1, args.max_steps + 1):
        now = time.time()
        if now >= train_deadline:
            stop_reason = "max_minutes"
            step -= 1
            break
        progress = max(step / args.max_steps, (now - train_start) / max(1e-9, train_deadline - train_start))
        lr = lr_at(step - 1, progress, args)
        for group in optimizer.param_groups:
            group["lr"] = lr

        batch = train_batch()
        with autocast():
            ce, aux = losses(batch)
            loss = ce + args.aux_loss_coef * aux
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # Accumulate on device; .item() only at log points keeps the GPU queue full.
        acc_ce += ce.detach()
        acc_aux += aux.detach()
        acc_n += 1

        if step % args.log_every == 0 or step == args.max_steps:
            ce_mean, aux_mean = (acc_ce / acc_n).item(), (acc_aux / acc_n).item()
            t = time.time()
            tok_s = (step - last_log_step) * B * L / max(1e-9, t - last_log_t)
            elapsed = t - t_start
            log["train"].append({"step": step, "loss": ce_mean, "aux_loss": aux_mean, "lr": lr,
                                 "tokens_per_s": tok_s, "elapsed_s": elapsed})
            print(f"step {step:5d} | loss {ce_mean:.4f} | aux {aux_mean:.4f} | lr {lr:.2e} | "
                  f"{tok_s / 1e3:8.1f}k tok/s | elapsed {elapsed:6.1f}s", flush=True)
            acc_ce.zero_()
            acc_aux.zero_()
            acc_n, last_log_t, last_log_step = 0, t, step
        if step % args.eval_every == 0 and step != args.max_steps:
            record_validation(step, time.time() - t_start)
    train_s = time.time() - train_start

    final_val = record_validation(step, time.time() - t_start)
    saved_step, saved_val = step, final_val
    if best["state"] is not None and best["val_loss"] < final_val:
        # Late-training overfitting on a small corpus: ship the best weights.
        model.load_state_dict(best["state"])
        saved_step, saved_val = best["step"], best["val_loss"]
        print(f"restored best validation weights from step {saved_step} (val loss {saved_val:.4f})")

    # ---- save -------------------------------------------------------------------------------
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16)
    # transformers 5 always writes safetensors (model.safetensors); tied
    # weights are stored once.
    model.save_pretrained(str(out))
    for name in TOKENIZER_FILES:
        # Copy byte-for-byte rather than re-saving, so the shipped tokenizer is
        # independent of the transformers version on the training machine.
        shutil.copyfile(args.data_dir / "tokenizer" / name, out / name)
    if not (out / "model.safetensors").is_file():
        raise SystemExit(f"save_pretrained did not write {out / 'model.safetensors'}")
    ckpt_bytes = sum((out / n).stat().st_size for n in ("model.safetensors", "config.json", *TOKENIZER_FILES))

    sample = ""
    prompt = "def "
    model.eval()
    with torch.no_grad():
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        gen_ids = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=eot_id)
        sample = tokenizer.decode(gen_ids[0], skip_special_tokens=False)

    log["final"] = {
        "steps": step, "stop_reason": stop_reason, "train_seconds": train_s,
        "tokens_seen": step * B * L, "epochs": step * B * L / header["train_tokens"],
        "final_val_loss": final_val, "saved_step": saved_step, "saved_val_loss": saved_val,
        "saved_val_ppl": math.exp(saved_val), "checkpoint_bytes": ckpt_bytes,
        "greedy_sample": sample, "total_seconds": time.time() - t_start,
    }
    log_dir = args.log_dir or out
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "train_log.json").write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    if not plot_curve(log, log_dir / "loss_curve.png"):
        print("matplotlib is not installed: loss_curve.png skipped; redraw it elsewhere with "
              f"--replot {log_dir / 'train_log.json'}")

    print(f"stopped after {step} steps ({stop_reason}) in {train_s:.1f}s of training; "
          f"saved step {saved_step} (val loss {saved_val:.4f}, ppl {math.exp(saved_val):.2f}) to {out} "
          f"[{ckpt_bytes / 1e6:.2f} MB incl. tokenizer]")
    print(f"greedy sample: {sample!r}")
    print(f"total wall clock {time.time() - t_start:.1f}s")


def plot_curve(log: dict, path: Path) -> bool:
    """Write the training/validation loss curve as a PNG; False if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")  # headless machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if log["train"]:
        ax.plot([r["step"] for r in log["train"]], [r["loss"] for r in log["train"]], label="train CE")
    if log["validation"]:
        ax.plot([r["step"] for r in log["validation"]], [r["val_loss"] for r in log["validation"]],
                "o-", label="validation CE")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if log["train"]:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in log["train"]], [r["aux_loss"] for r in log["train"]],
                 color="tab:gray", alpha=0.5, label="aux (load balance)")
        ax2.set_ylabel("aux loss")
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    p = log["header"]["params"]["total"] / 1e6
    ax.set_title(f"embedded OLMoE ({p:.2f}M params) on stdlib")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


if __name__ == "__main__":
    sys.exit(main())
