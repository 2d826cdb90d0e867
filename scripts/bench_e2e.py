"""End-to-end throughput of a Mixtral-architecture model: unpatched vs patched with kernel="triton".

The model has Mixtral-8x7B's dimensions (hidden 4096, intermediate 14336, 8 experts, top-2, 32
heads / 8 KV heads, vocabulary 32000) with random weights and only --layers decoder layers, so it
fits one GPU and loads in seconds.  Router weights are scaled so the routing is as uneven as a
trained router's (see --router-scale).  Variants:

    hf        transformers as loaded (grouped_mm experts)
    triton    moepatch.apply(model, capacity_factor=None, kernel="triton"): same routing, fused kernels
    triton_g  moepatch.apply(model, capacity_factor=--gamma, kernel="triton"): capacity-aware (prefill only;
              decode steps are single tokens, which capacity leaves alone by default)

Measured: prefill tokens/s (--prefill-batch x --prefill-len, logits of the last position only) and
greedy decode tokens/s (each of --decode-batches, --new-tokens steps after a --prompt-len prompt,
DynamicCache).  With few layers a decode step is short, so decode numbers include Python launch
overhead that a full model amortises; the per-layer CUDA-graph numbers of bench_kernels.py are the
kernel-level measure.  Correctness first: patched logits vs unpatched (relative error norm).

    python scripts/bench_e2e.py --out /tmp/e2e                   # H200, Mixtral dims, 2 layers
    python scripts/bench_e2e.py --layers 4 --prefill-batch 4       # variations
    TRITON_INTERPRET=1 python scripts/bench_e2e.py --smoke --out /tmp/e2e_smoke   # CPU, tiny model
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined

import torch  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_model(args, device, dtype):
    import transformers as tf

    cfg = tf.MixtralConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_local_experts=args.experts, num_experts_per_tok=args.top_k,
                           num_hidden_layers=args.layers, num_attention_heads=args.heads,
                           num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                           max_position_embeddings=max(4096, args.prefill_len + 8,
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


def _cache_kwarg(model) -> str:
    # transformers 5.24 renamed past_key_values to cache (the old name warns); 5.17 only has the old one.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def time_decode(model, prompt, new_tokens, device) -> float:
    """Seconds for ``new_tokens`` greedy steps after the prompt (prompt prefill not timed)."""
    from transformers import DynamicCache

    kw = _cache_kwarg(model)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(prompt, use_cache=True, logits_to_keep=1, **{kw: cache})
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(nxt, use_cache=True, **{kw: cache})
            nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        return time.perf_counter() - t0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--router-scale", type=float, default=1.0, help="router weight std times sqrt(hidden)")
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--decode-batches", default="1,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--gamma", type=float, default=1.5, help="capacity factor of triton_g (0: skip it)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--out", default="bench_e2e_out")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU under TRITON_INTERPRET=1")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab = 2, 32, 48, 4, 2, 128
        args.prefill_batch, args.prefill_len, args.prompt_len, args.new_tokens = 2, 16, 8, 2
        args.decode_batches, args.reps, args.dtype = "1,2", 1, "fp32"
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``moepatch bench e2e`` calls this); returns the exit status."""
    import moepatch

    args = parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: run with --smoke for the CPU check", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
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
               args=vars(args))
    log(f"env: {json.dumps(env)}")
    model = build_model(args, device, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    prefill_ids = torch.randint(3, args.vocab, (args.prefill_batch, args.prefill_len), device=device, generator=gen)
    check_ids = prefill_ids[:2, :256]

    variants = [("hf", None), ("triton", dict(capacity_factor=None, kernel="triton", collect_stats=False))]
    if args.gamma:
        variants.append(("triton_g", dict(capacity_factor=args.gamma, kernel="triton", collect_stats=False)))
    results, bad = [], []
    with torch.no_grad():
        ref_logits = model(check_ids).logits.float()
    for name, opts in variants:
        handle = moepatch.apply(model, **opts) if opts else None
        row = dict(variant=name)
        try:
            with torch.no_grad():
                logits = model(check_ids).logits.float()
            row["rel_err_vs_hf"] = ((logits - ref_logits).norm() / ref_logits.norm()).item()
            if name == "triton" and not row["rel_err_vs_hf"] < (1e-4 if args.smoke else 2e-2):
                bad.append(f"{name}: logits differ from transformers' ({row['rel_err_vs_hf']:.3g})")
            t = time_prefill(model, prefill_ids, args.reps, device)
            row["prefill_tok_s"] = args.prefill_batch * args.prefill_len / t
            row["prefill_ms"] = t * 1e3
            if name != "triton_g":
                for b in (int(x) for x in args.decode_batches.split(",")):
                    prompt = torch.randint(3, args.vocab, (b, args.prompt_len), device=device, generator=gen)
                    td = time_decode(model, prompt, args.new_tokens, device)
                    row[f"decode_b{b}_tok_s"] = b * args.new_tokens / td
        finally:
            if handle is not None:
                handle.remove()
        results.append(row)
        log(json.dumps(row))
    base = results[0]
    table = ["| variant | rel err | prefill tok/s | x hf | " +
             " | ".join(f"decode b{b} tok/s | x hf" for b in args.decode_batches.split(",")) + " |"]
    table.append("|" + "---:|" * (4 + 2 * len(args.decode_batches.split(","))))
    for r in results:
        cells = [r["variant"], f"{r.get('rel_err_vs_hf', 0):.2e}", f"{r['prefill_tok_s']:.0f}",
                 f"{r['prefill_tok_s'] / base['prefill_tok_s']:.2f}"]
        for b in args.decode_batches.split(","):
            v = r.get(f"decode_b{b}_tok_s")
            cells += [f"{v:.1f}" if v else "-", f"{v / base[f'decode_b{b}_tok_s']:.2f}" if v else "-"]
        table.append("| " + " | ".join(cells) + " |")
    md = "\n".join(table)
    (out_dir / "e2e.json").write_text(json.dumps(dict(env=env, rows=results), indent=1))
    (out_dir / "e2e.md").write_text(f"Environment: `{json.dumps(env)}`\n\n{md}\n")
    for b in bad:
        log(f"FAIL {b}")
    log(md)
    (out_dir / "log.txt").write_text("\n".join(lines) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
