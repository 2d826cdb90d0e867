"""Expert-parallel MoE layer benchmark: does capacity cut the straggler's latency under real EP?

Run one process per GPU, e.g. on 2 GPUs:

    torchrun --nproc_per_node 2 scripts/bench_ep.py --out results/bench_ep
    scripts/launch_ep.sh bench --out results/bench_ep            # accelerate, recipes/accelerate/ep2.yaml

and on a CPU with gloo (tiny dims, about ten seconds):

    torchrun --nproc_per_node 2 scripts/bench_ep.py --smoke --out /tmp/bench_ep_smoke

Started without a launcher (``python scripts/bench_ep.py ...``, ``moepatch bench ep ...``) it runs
torchrun itself with ``--nproc`` ranks (default one per GPU, 2 on a CPU machine).

For each layer shape (default: Mixtral-8x7B's H=4096, I=14336 with 8 experts top-2, and 2 experts
top-1 so each GPU holds one expert) and each number of tokens per rank, every rank builds only its
experts (``build_random_expert_parallel``), feeds its MoE block the same skewed tokens for every
variant, and times the layer:

* route: the router and capacity (``moepatch.routing.route`` with ``source_rank``);
* dispatch / experts / combine: the all-to-all, the local expert GEMMs, the return and sum;
* the layer latency is dispatch + experts + combine, the max over ranks of each iteration
  (every rank waits for the slowest at the combine), median over iterations.

Variants: no capacity (the baseline) and drop / reroute / expanded at each gamma.  Beside each
measured speedup the latency model's prediction is printed: max device load of the baseline over
that of the variant (``docs/expert-parallel.md``).  transformers' own expert parallelism
(``DistributedConfig``: every rank runs its experts on the batch all ranks share, then an
all-reduce) runs on the same tokens (all ranks' tokens concatenated) from a checkpoint this
benchmark writes, since it only loads through ``from_pretrained``.

Routing skew.  Hidden states are built so the router's logits are chosen exactly: the gate
weight selects E hidden coordinates (one-hot rows) and those coordinates carry the logits, on a
1/32 grid with distinct values per token, exact in bf16 (so EP and the single-process
reference route identically).  The logits are log p + Gumbel noise, i.e. top-k without
replacement from p, with p calibrated so the expected expert load follows a Zipf-like profile
of max/mean ``--skew`` (default 1.8; trained Mixtral/OLMoE routers sit at 1.6-2.0 per layer), or
the per-layer load histogram of a moepatch stats JSON (``--load-profile``).  Hot experts are
placed by a seeded permutation, or clustered on the first ranks (``8x2:clustered``).

Correctness first: on a small slice of every rank's tokens, the EP block output is compared with
the single-process ``ep_size=world`` simulation of the full model on rank 0 (and transformers' EP
with the unpatched model); a failed check stops the run before any timing.  ``--profile-dir``
also writes a torch.profiler trace of every timed variant (scripts/traces.py).

Legend: T tokens per rank, E experts, K experts per token, H hidden, I intermediate, D ranks.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for _path in (str(REPO), str(REPO / "scripts")):  # a checkout runs without installing; scripts/ is no package
    if _path not in sys.path:
        sys.path.insert(0, _path)

from moepatch.arguments import ArgumentParser, HelpFormatter  # noqa: E402, I001  (traces is scripts/traces.py)
from traces import add_profile_arguments, check_counts, profile_calls  # noqa: E402

PHASES = ("route", "dispatch", "experts", "combine", "moe", "block")
_GRID = 32  # logits on a 1/32 grid within (-8, 8): exact in bf16 (8 significant bits)


def parse_args(argv):
    p = ArgumentParser(prog="moepatch bench ep", description=__doc__.split("\n\n")[0],
                       formatter_class=HelpFormatter)
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks to start when run without a launcher (default: one per GPU, 2 on a CPU machine)")
    p.add_argument("--out", type=Path, required=True, help="directory for bench_ep.json / bench_ep.md")
    p.add_argument("--smoke", action="store_true", help="tiny dims and few iterations (CPU + gloo check)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--configs", default="8x2,8x2:clustered,2x1",
                   help="EXPERTSxTOPK[:clustered] list; ':clustered' puts the hottest experts on the first ranks "
                        "(default: Mixtral's 8x2 with random and clustered placement, and 2x1)")
    p.add_argument("--tokens", default="4096,8192,16384", help="tokens per rank")
    p.add_argument("--gammas", default="1.0,1.5,2.0")
    p.add_argument("--strategies", default="drop,reroute,expanded")
    p.add_argument("--skew", type=float, default=1.8, help="target max/mean expert load of the synthetic profile")
    p.add_argument("--load-profile", type=Path, help="moepatch stats JSON: use its per-layer load histogram")
    p.add_argument("--profile-layer", type=int, help="layer of --load-profile (default: the most imbalanced)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--check-tokens", type=int, default=64, help="tokens per rank in the correctness check")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--no-hf-ep", action="store_true", help="skip transformers' expert parallelism")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path,
                   help="where the transformers-EP checkpoint is written (default: a temp dir, removed at the end)")
    add_profile_arguments(p)
    args = p.parse_args(argv)
    check_counts(p, args)
    if args.smoke:
        args.hidden, args.intermediate = 64, 96
        args.tokens = "64,256" if args.tokens == p.get_default("tokens") else args.tokens
        args.iters, args.warmup, args.check_tokens = min(args.iters, 3), 1, 16
    args.config_list = []
    for spec in args.configs.split(","):
        shape, _, placement = spec.partition(":")
        if placement not in ("", "clustered", "random"):
            p.error(f"--configs {spec}: placement {placement!r} is not one of 'random', 'clustered'")
        E, K = (int(v) for v in shape.split("x"))
        args.config_list.append((E, K, placement or "random"))
    args.token_list = [int(t) for t in args.tokens.split(",")]
    args.gamma_list = [float(g) for g in args.gammas.split(",")]
    args.strategy_list = args.strategies.split(",")
    return args


# -- routing profile ---------------------------------------------------------------------------

def zipf_shares(num_experts: int, top_k: int, skew: float, seed: int, placement: str = "random") -> torch.Tensor:
    """Expected share of routed pairs per expert (E,) float64: Zipf-like, max/mean == ``skew``.

    share_e ∝ (1 + r_e)^-s with s found by bisection; r is a seeded permutation of 0..E-1
    (``placement="random"``: hot experts land on ranks by chance) or r_e = e (``"clustered"``:
    the hottest experts share the first rank, the worst case for expert parallelism).  The
    largest share is capped by top-k routing (an expert gets at most one pair per token).
    """
    limit = num_experts / top_k
    if not 1.0 <= skew < limit:
        raise ValueError(f"--skew {skew} is impossible with {num_experts} experts top-{top_k}: accepted [1, {limit})")
    if placement == "clustered":
        rank_E = torch.arange(num_experts, dtype=torch.float64)
    else:
        rank_E = torch.randperm(num_experts, generator=torch.Generator().manual_seed(seed)).double()

    def shares(s):
        w = (1.0 + rank_E) ** -s
        return w / w.sum()

    lo, hi = 0.0, 50.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(shares(mid).max()) * num_experts < skew else (lo, mid)
    return shares(hi)


def profile_shares(path: Path, num_experts: int, layer: int | None) -> tuple[torch.Tensor, int]:
    """Per-expert shares from a moepatch stats JSON (``LoadStats.to_json``): the layer's load_before."""
    with open(path) as f:
        layers = json.load(f)["layers"]
    if layer is None:
        layer = int(max(layers, key=lambda k: max(layers[k]["load_before"]) / max(sum(layers[k]["load_before"]), 1)))
    load = torch.tensor(layers[str(layer)]["load_before"], dtype=torch.float64)
    if load.numel() != num_experts:
        raise ValueError(f"{path} layer {layer} has {load.numel()} experts, the benchmark config {num_experts}")
    # An expert that never got a token keeps a sliver of probability: log p must stay finite.
    load = load.clamp_min(1e-6 * float(load.sum()))
    return load / load.sum(), layer


def _sample_topk(log_p_E: torch.Tensor, top_k: int, n: int, gen: torch.Generator) -> torch.Tensor:
    gumbel_NE = -torch.log(-torch.log(torch.rand(n, log_p_E.numel(), generator=gen, dtype=torch.float64)))
    return (log_p_E + gumbel_NE).topk(top_k, dim=1).indices


def calibrate(shares_E: torch.Tensor, top_k: int, seed: int, samples: int = 1 << 16) -> torch.Tensor:
    """log p such that top-k without replacement from p (Gumbel top-k) loads expert e with share_e."""
    E = shares_E.numel()
    log_p = shares_E.log()
    for it in range(30):
        picks = _sample_topk(log_p, top_k, samples, torch.Generator().manual_seed(seed + it))
        got = torch.bincount(picks.reshape(-1), minlength=E).double() / picks.numel()
        log_p = log_p + 0.8 * (shares_E.log() - got.clamp_min(1e-9).log())
        log_p = log_p - log_p.max()
    return log_p


def routing_logits(log_p_E: torch.Tensor, tokens: int, gen: torch.Generator) -> torch.Tensor:
    """(T, E) float32 logits log p + Gumbel on a 1/32 grid, distinct within each row, in (-8, 8)."""
    E = log_p_E.numel()
    u = torch.rand(tokens, E, generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    raw_TE = (log_p_E + -torch.log(-torch.log(u))).clamp(-5.0, 5.0)
    q_TE = torch.round(raw_TE * _GRID)
    # Make each row strictly decreasing in sorted order (ties would let implementations break them
    # differently): s'_i = min over j <= i of (s_j + j) - i, one grid step apart at least.
    s_TE, idx_TE = q_TE.sort(dim=1, descending=True)
    steps = torch.arange(E, dtype=torch.float64)
    s_TE = torch.cummin(s_TE + steps, dim=1).values - steps
    out_TE = torch.empty_like(q_TE).scatter_(1, idx_TE, s_TE)
    if E > 96:
        raise ValueError("the exact-logit construction supports at most 96 experts")
    return (out_TE / _GRID).float()


def selector(num_experts: int, hidden: int) -> torch.Tensor:
    """Hidden coordinate whose value is expert e's logit (E,), spread over the hidden size."""
    if num_experts > hidden:
        raise ValueError("need hidden >= experts")
    return torch.arange(num_experts) * (hidden // num_experts)


def hidden_states(logits_TE: torch.Tensor, hidden: int, gen: torch.Generator) -> torch.Tensor:
    """(T, H) float32: N(0, 1) activations whose selected coordinates carry the logits."""
    x_TH = torch.randn(logits_TE.shape[0], hidden, generator=gen)
    x_TH[:, selector(logits_TE.shape[1], hidden)] = logits_TE
    return x_TH


def set_selector_gate(block, hidden: int) -> None:
    """Router weight = one-hot rows on the selected coordinates: logits == those coordinates exactly."""
    gate = block.gate
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[torch.arange(gate.weight.shape[0]), selector(gate.weight.shape[0], hidden)] = 1.0


# -- timing ------------------------------------------------------------------------------------

class PhaseTimer:
    """Marks of one block call: CUDA events on the current stream, or wall-clock on the CPU.

    With ``align`` every rank waits for the others (a barrier, then a device sync) before the
    "dispatch" mark: the dispatch, experts and combine phases then start together on every rank,
    so a rank whose route finished later does not show up as the others' dispatch time (the
    route is timed on its own, and the layer's speedup with the route is reported beside)."""

    def __init__(self, device: torch.device, align: bool = False):
        self.cuda = device.type == "cuda"
        self.align = align
        self.marks: dict = {}

    def mark(self, phase: str) -> None:
        if self.align and phase == "dispatch":
            import torch.distributed as dist

            dist.barrier()
            _sync(torch.device("cuda" if self.cuda else "cpu"))
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks[phase] = ev
        else:
            self.marks[phase] = time.perf_counter()

    def reset(self) -> None:
        self.marks = {}

    def phases_ms(self) -> list[float]:
        m = self.marks
        if self.cuda:
            torch.cuda.synchronize()

            def ms(a, b):
                return m[a].elapsed_time(m[b])
        else:
            def ms(a, b):
                return 1e3 * (m[b] - m[a])
        if "dispatch" not in m:  # a block without the EP path (transformers' EP): total only
            total = ms("start", "end")
            return [math.nan] * 4 + [total, total]
        return [ms("start", "dispatch"), ms("dispatch", "experts"), ms("experts", "combine"),
                ms("combine", "done"), ms("dispatch", "done"), ms("start", "end")]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_block(block, x_1TH, timer: PhaseTimer, iters: int, warmup: int, device, tag: str = "",
               profile: dict | None = None) -> list[list[float]]:
    """Per-iteration phase times of this rank (iters, len(PHASES)), each iteration after a barrier;
    then, with ``profile`` (profile_calls' out / calls / cpu), the profiled calls."""
    import torch.distributed as dist

    rows = []
    with torch.no_grad():
        for i in range(warmup + iters):
            dist.barrier()
            _sync(device)
            timer.reset()
            timer.mark("start")
            block(x_1TH)
            timer.mark("end")
            phases = timer.phases_ms()
            if i >= warmup:
                rows.append(phases)
        timer.reset()
        profile_calls(lambda: block(x_1TH), tag or "block", **(profile or dict(out=None)))
    return rows


def max_over_ranks(rows: list[list[float]], device) -> dict:
    """Median over iterations of the max over ranks, for each phase."""
    import torch.distributed as dist

    local = torch.tensor(rows, dtype=torch.float64, device=device).nan_to_num(nan=-1.0)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    worst = torch.stack(gathered).amax(dim=0)  # (iters, phases)
    out = {}
    for j, name in enumerate(PHASES):
        col = worst[:, j].tolist()
        out[name] = None if col[0] < 0 else statistics.median(col)
    return out


def device_loads(model, num_experts: int, world: int, device) -> dict:
    """Global pairs per device before / after capacity for the last forward (summed over ranks)."""
    import torch.distributed as dist

    import moepatch
    from moepatch.routing.capacity import expert_devices

    rec = moepatch.stats(model).records[-1]
    both = torch.tensor([rec.load_before, rec.load_after], dtype=torch.float64, device=device)
    dist.all_reduce(both)
    dev_E = expert_devices(num_experts, world).to(device)
    per_dev = torch.zeros(2, world, dtype=torch.float64, device=device).index_add_(1, dev_E, both)
    routed = torch.tensor([rec.routed_pairs, rec.dropped_pairs, rec.added_pairs], dtype=torch.float64, device=device)
    dist.all_reduce(routed)
    before, after = per_dev.tolist()
    load_before, load_after = both.tolist()
    mean = sum(load_before) / num_experts
    return dict(device_before=before, device_after=after, max_device_after=max(after),
                expert_max_mean_before=max(load_before) / mean if mean else 0.0,
                expert_max_mean_after=max(load_after) / mean if mean else 0.0,
                dropped_fraction=routed[1].item() / max(routed[0].item(), 1),
                added_fraction=routed[2].item() / max(routed[0].item(), 1))


# -- correctness -------------------------------------------------------------------------------

def _gather_rows(x_NH, device):
    import torch.distributed as dist

    parts = [torch.empty_like(x_NH) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x_NH.contiguous())
    return torch.cat(parts)


def _rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def check_correctness(model, block, ref_block, ref_model, x_check_NH, variants, device, rank) -> list[dict]:
    """EP block output vs the single-process ep_size=world simulation on rank 0, per variant."""
    import torch.distributed as dist

    import moepatch

    world = dist.get_world_size()
    results = []
    with torch.no_grad():
        x_all = _gather_rows(x_check_NH, device)
        for name, gamma, strategy in variants:
            moepatch.apply(model, gamma, strategy, expert_parallel=True)
            got = _gather_rows(block(x_check_NH[None])[0], device)
            moepatch.remove(model)
            err = None
            if rank == 0:
                # kernel="torch": the pure-torch reference, whatever backend this machine would pick.
                with moepatch.patched(ref_model, gamma, strategy, ep_size=world, kernel="torch"):
                    ref = ref_block(x_all[None])[0]
                err = _rel_err(got, ref)
            results.append(dict(variant=name, rel_err=err))
    return results


# -- transformers' expert parallelism ----------------------------------------------------------

def hf_distributed_config(world: int):
    """DistributedConfig for transformers' experts-sharded, batch-shared EP in 5.17 and 5.2x."""
    import dataclasses

    from transformers.distributed import DistributedConfig

    fields = {f.name for f in dataclasses.fields(DistributedConfig)}
    if "ep_size" in fields:  # 5.2x: ep_size == tp_size selects the all-reduce EP implementation
        return DistributedConfig(tp_size=world, ep_size=world)
    return DistributedConfig(tp_size=world, enable_expert_parallel=True)  # 5.17


def load_hf_ep(path: str, world: int, dtype, device: torch.device | None = None):
    """transformers' own expert parallelism on ``path``, every tensor on this rank's ``device``.

    transformers places the tensors its parallel plan shards; the rest (the router, norms,
    embeddings) can stay on the CPU (seen on one H200 with transformers 5.17), so they are moved.
    """
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, distributed_config=hf_distributed_config(world),
                                                              dtype=dtype)
    if device is not None:
        for module in model.modules():
            for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
                if t.device != torch.device(device):
                    t.data = t.data.to(device)
    return model.eval()


def _try_hf_ep(path: str, world: int, dtype, device: torch.device | None = None):
    """(model, None), or (None, why) on every rank when any rank could not load transformers' EP."""
    import torch.distributed as dist

    model, error = None, None
    try:
        model = load_hf_ep(path, world, dtype, device)
    except Exception as exc:  # recorded in the report and the table; the moepatch timings go on
        error = f"{type(exc).__name__}: {exc}"[:500]
    errors = [None] * world
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    return (None, first) if first is not None else (model, None)


# -- the run -----------------------------------------------------------------------------------

def _config(args, num_experts, top_k):
    import transformers

    H = args.hidden
    heads = max(H // 128, 4)
    return transformers.MixtralConfig(
        hidden_size=H, intermediate_size=args.intermediate, num_local_experts=num_experts,
        num_experts_per_tok=top_k, num_hidden_layers=1, num_attention_heads=heads,
        num_key_value_heads=max(heads // 4, 2), vocab_size=256, max_position_embeddings=256,
        router_jitter_noise=0.0, tie_word_embeddings=False)


def _shares(args, num_experts: int, top_k: int, placement: str) -> tuple[torch.Tensor, dict]:
    """The per-expert load shares of a config: the stats JSON's layer when it has E experts, else Zipf."""
    if args.load_profile is not None:
        with open(args.load_profile) as f:
            layers = json.load(f)["layers"]
        if any(len(v["load_before"]) == num_experts for v in layers.values()):
            shares, layer = profile_shares(args.load_profile, num_experts, args.profile_layer)
            return shares, dict(kind="stats-json", path=str(args.load_profile), layer=layer, shares=shares.tolist())
    shares = zipf_shares(num_experts, top_k, args.skew, args.seed, placement)
    note = "" if args.load_profile is None else f" ({args.load_profile} has no layer with {num_experts} experts)"
    return shares, dict(kind="zipf" + note, placement=placement, target_max_mean=args.skew, shares=shares.tolist())


def _variants(args):
    out = [("baseline", None, "drop")]
    for strategy in args.strategy_list:
        for gamma in args.gamma_list:
            out.append((f"{strategy}@{gamma:g}", gamma, strategy))
    return out


def _versions(device):
    import transformers

    return dict(torch=torch.__version__, transformers=transformers.__version__, python=sys.version.split()[0],
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")


def run(args) -> dict:
    import torch.distributed as dist

    import moepatch
    from moepatch.parallel import build_random_expert_parallel, init_distributed, load_expert_parallel
    from moepatch.parallel.ep import set_phase_timer

    rank, world, device = init_distributed()
    dtype = getattr(torch, args.dtype)
    work = [str(args.work_dir) if args.work_dir else tempfile.mkdtemp(prefix="moepatch_bench_ep_")]
    dist.broadcast_object_list(work, src=0)
    work_dir = Path(work[0])
    report = dict(args={k: str(v) for k, v in vars(args).items()}, world=world, backend=dist.get_backend(),
                  versions=_versions(device), command=" ".join(sys.argv), results=[])
    variants = _variants(args)
    profiling = dict(out=args.profile_dir, calls=args.profile_calls, cpu=args.profile_cpu)
    completed = False
    try:
        for num_experts, top_k, placement in args.config_list:
            label = f"{num_experts}x{top_k}" + (":clustered" if placement == "clustered" else "")
            cfg = _config(args, num_experts, top_k)
            shares, profile = _shares(args, num_experts, top_k, placement)
            log_p = calibrate(shares, top_k, args.seed)

            model = build_random_expert_parallel(cfg, rank, world, dtype=dtype, device=device, seed=args.seed)
            block = model.model.layers[0].mlp
            set_selector_gate(block, args.hidden)
            ref_model = ref_block = None
            if rank == 0:
                ref_model = build_random_expert_parallel(cfg, 0, 1, dtype=dtype, device=device, seed=args.seed)
                ref_block = ref_model.model.layers[0].mlp
                set_selector_gate(ref_block, args.hidden)

            gen = torch.Generator().manual_seed(args.seed * 7919 + 131 * rank + num_experts)
            x_check = hidden_states(routing_logits(log_p, args.check_tokens, gen), args.hidden, gen)
            x_check = x_check.to(device=device, dtype=dtype)
            check_variants = [("baseline", None, "drop")] + [(f"{s}@1", 1.0, s) for s in args.strategy_list]
            checks = check_correctness(model, block, ref_block, ref_model, x_check, check_variants, device, rank)

            ckpt = work_dir / f"mixtral_{num_experts}x{top_k}"  # same weights for every placement
            hf_model = loader_ok = hf_error = None
            if not args.no_hf_ep:
                if rank == 0 and not ckpt.exists():
                    ref_model.save_pretrained(ckpt)
                dist.barrier()
                # The sharded loader reads the same checkpoint: its slice must equal the built one.
                loaded = load_expert_parallel(ckpt, rank, world, dtype=dtype, device=device)
                lb, bb = loaded.model.layers[0].mlp.experts, block.experts
                loader_ok = bool(torch.equal(lb.gate_up_proj, bb.gate_up_proj)
                                 and torch.equal(lb.down_proj, bb.down_proj))
                del loaded
                hf_model, hf_error = _try_hf_ep(str(ckpt), world, dtype, device)
                if hf_model is not None:
                    with torch.no_grad():
                        x_all = _gather_rows(x_check, device)
                        hf_out = hf_model.model.layers[0].mlp(x_all[None])[0]
                        verdict = [None]
                        if rank == 0:
                            err = _rel_err(hf_out, ref_block(x_all[None])[0])
                            checks.append(dict(variant="transformers-ep", rel_err=err))
                            # transformers' EP is the comparison, not the subject: a wrong result
                            # drops it from the timings instead of stopping the run.
                            verdict = [None if err <= (1e-4 if dtype == torch.float32 else 3e-2)
                                       else f"transformers EP output differs from the reference ({err:.1e})"]
                        dist.broadcast_object_list(verdict, src=0)
                        if verdict[0] is not None:
                            hf_model, hf_error = None, verdict[0]
            del ref_model, ref_block
            status = [True]
            if rank == 0:
                tol = 1e-4 if dtype == torch.float32 else 3e-2
                ours = [c for c in checks if c["variant"] != "transformers-ep"]
                status = [all(c["rel_err"] <= tol for c in ours) and loader_ok is not False]
            dist.broadcast_object_list(status, src=0)
            entry = dict(config=label, num_experts=num_experts, top_k=top_k, profile=profile,
                         checks=checks if rank == 0 else None, loader_matches_build=loader_ok,
                         transformers_ep_error=hf_error, sizes=[])
            report["results"].append(entry)
            if not status[0]:
                report["failed"] = f"correctness check failed for {label}"
                break

            timer = PhaseTimer(device, align=True)
            for tokens in args.token_list:
                gen = torch.Generator().manual_seed(args.seed * 104729 + 7 * rank + tokens + num_experts)
                x_1TH = hidden_states(routing_logits(log_p, tokens, gen), args.hidden, gen)[None]
                x_1TH = x_1TH.to(device=device, dtype=dtype)
                size = dict(tokens_per_rank=tokens, variants=[])
                for name, gamma, strategy in variants:
                    moepatch.apply(model, gamma, strategy, expert_parallel=True)
                    set_phase_timer(model, timer)
                    rows = time_block(block, x_1TH, timer, args.iters, args.warmup, device,
                                      tag=f"ep_{label}_T{tokens}_{name}", profile=profiling)
                    timing = max_over_ranks(rows, device)
                    loads = device_loads(model, num_experts, world, device)
                    moepatch.remove(model)
                    size["variants"].append(dict(variant=name, gamma=gamma, strategy=strategy, ms=timing, **loads))
                if hf_model is not None:
                    x_all = _gather_rows(x_1TH[0], device)[None]
                    hf_block = hf_model.model.layers[0].mlp
                    rows = time_block(hf_block, x_all, timer, args.iters, args.warmup, device, profile=profiling)
                    size["transformers_ep"] = dict(ms=max_over_ranks(rows, device))
                base = size["variants"][0]
                for v in size["variants"]:
                    v["speedup"] = base["ms"]["moe"] / v["ms"]["moe"]
                    v["speedup_with_route"] = ((base["ms"]["route"] + base["ms"]["moe"])
                                               / (v["ms"]["route"] + v["ms"]["moe"]))
                    v["predicted"] = base["max_device_after"] / max(v["max_device_after"], 1.0)
                entry["sizes"].append(size)
                if rank == 0:
                    write_report(report, args.out)  # partial results survive a time limit
            del hf_model, model, block
            if device.type == "cuda":
                torch.cuda.empty_cache()
        completed = True
    finally:
        if completed:
            dist.barrier()  # nobody still reads the checkpoint (after a failure: exit, do not wait)
        if rank == 0 and args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    return report


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    v = report["versions"]
    lines = ["# Expert-parallel MoE layer benchmark", "",
             f"`{report['command']}`  ", f"{report['world']} ranks ({report['backend']}), {v['device']}, "
             f"torch {v['torch']}, transformers {v['transformers']}", "",
             "Latency: median over iterations of the max over ranks (ms), from a common start after the route "
             "(every rank waits for the others before dispatching). Speedup: baseline / variant latency "
             "(dispatch + experts + combine). Predicted: baseline / variant max device load. With route: "
             "baseline / variant of route + latency.", ""]
    for entry in report["results"]:
        lines.append(f"## {entry['config']} (experts x top-k), profile {entry['profile']['kind']}")
        if entry.get("checks"):
            lines.append("Correctness (relative error vs single-process reference): " + ", ".join(
                f"{c['variant']} {c['rel_err']:.1e}" for c in entry["checks"]))
        if entry.get("loader_matches_build") is not None:
            lines.append(f"load_expert_parallel slice == built slice: {entry['loader_matches_build']}")
        if entry.get("transformers_ep_error"):
            lines.append(f"transformers EP not timed: {entry['transformers_ep_error']}")
        lines.append("")
        lines.append("| T/rank | variant | route | dispatch | experts | combine | latency | speedup | predicted "
                     "| measured / predicted | with route | max dev load | dropped | expert max/mean after |")
        lines.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for size in entry["sizes"]:
            for r in size["variants"]:
                ms = r["ms"]
                lines.append(f"| {size['tokens_per_rank']} | {r['variant']} | {_fmt(ms['route'])} | "
                             f"{_fmt(ms['dispatch'])} | {_fmt(ms['experts'])} | {_fmt(ms['combine'])} | "
                             f"{_fmt(ms['moe'])} | {r['speedup']:.2f} | {r['predicted']:.2f} | "
                             f"{r['speedup'] / r['predicted']:.2f} | {r.get('speedup_with_route', math.nan):.2f} | "
                             f"{r['max_device_after']:.0f} | {100 * r['dropped_fraction']:.1f}% | "
                             f"{r['expert_max_mean_after']:.2f} |")
            if "transformers_ep" in size:
                # transformers' EP is timed as a whole block (router included): compare with our block time.
                t = size["transformers_ep"]["ms"]["block"]
                ours = size["variants"][0]["ms"]["block"]
                lines.append(f"| {size['tokens_per_rank']} | transformers EP, whole block (ours: {ours:.2f}) | | | "
                             f"| | {_fmt(t)} | {t / ours:.2f} (ours faster if > 1) | | | | | | |")
        lines.append("")
    if "failed" in report:
        lines.append(f"**FAILED: {report['failed']}**")
    return "\n".join(lines)


def short_table(report: dict) -> str:
    """One row per (config, tokens): baseline and transformers-EP latency, measured/predicted speedups."""
    rows = []
    for entry in report["results"]:
        for size in entry["sizes"]:
            vs = size["variants"]
            base = vs[0]["ms"]["moe"]
            hf = size.get("transformers_ep", {}).get("ms", {}).get("block")
            cells = " ".join(f"{v['variant']}={v['speedup']:.2f}/{v['predicted']:.2f}" for v in vs[1:])
            rows.append(f"{entry['config']:>12} T={size['tokens_per_rank']:<6} layer={base:.2f}ms "
                        f"block={vs[0]['ms']['block']:.2f}ms hf-ep-block={_fmt(hf)}ms | {cells}")
        if entry.get("transformers_ep_error"):
            rows.append(f"{entry['config']:>12} transformers EP not timed: {entry['transformers_ep_error'][:150]}")
    head = ("EP MoE layer (dispatch+experts+combine), median of max over ranks; "
            "speedup measured/predicted vs EP without capacity")
    if "failed" in report:
        rows.append(f"FAILED: {report['failed']}")
    return "\n".join([head, *rows])


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_ep.json", "w") as f:
        json.dump(report, f, indent=1)
    (out / "bench_ep.md").write_text(markdown(report) + "\n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from moepatch.launch import launched, relaunch

    if not launched():  # e.g. `moepatch bench ep`: start the ranks ourselves
        return relaunch([str(Path(__file__).resolve()), *argv], args.nproc)
    import torch.distributed as dist

    report = run(args)
    if dist.get_rank() == 0:
        write_report(report, args.out)
        print(short_table(report), flush=True)
    dist.destroy_process_group()
    return 1 if "failed" in report else 0


if __name__ == "__main__":
    # Through the command line, for its one-line errors: the same as `moepatch bench ep ARGS`.
    from moepatch.cli import main as cli_main

    sys.exit(cli_main(["bench", "ep", *sys.argv[1:]]))
