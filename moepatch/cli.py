"""The ``moepatch`` command line.

    moepatch demo                      tiny random model of every family, load before/after capacity
    moepatch stats --model M --text F  load statistics of a model on a text file (no lm-eval)
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
            mean = s["tokens"] * s["top_k"] / s["num_experts"]
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


def _cmd_stats(args) -> int:
    import torch
    import transformers

    import moepatch

    with open(args.text, encoding="utf-8", errors="replace") as f:
        text = f.read()
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model).eval()
    ids = tok(text, return_tensors="pt").input_ids[:, : args.max_tokens]
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
    s = sub.add_parser("stats", help="load statistics of a model on a text file")
    s.add_argument("--model", required=True, help="local model directory")
    s.add_argument("--text", required=True, help="UTF-8 text file")
    s.add_argument("--capacity-factor", type=float, default=None)
    s.add_argument("--strategy", default="drop")
    s.add_argument("--seq-len", type=int, default=512)
    s.add_argument("--max-tokens", type=int, default=8192)
    s.add_argument("--output", help="write the statistics as JSON here")
    s.set_defaults(fn=_cmd_stats)
    return p


def main(argv: list[str] | None = None) -> int:
    _offline()
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
