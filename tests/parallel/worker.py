"""One rank of a 2-process gloo scenario, started by ``launch.run_ranks``; writes its result as JSON.

Usage: worker.py SCENARIO OUT_JSON [ARGS...] with RANK, WORLD_SIZE, MASTER_ADDR/PORT set.
Every reference is computed in this process on the full (unsharded) tiny model, so ranks never
exchange anything but the expert-parallel traffic under test.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch

import moepatch
from moepatch.ops.reference import reference_experts
from moepatch.parallel import ep as ep_module
from moepatch.parallel import ep_barrier_loop, ep_session, init_distributed
from moepatch.tiny import tiny_model

# (name, capacity_factor, strategy, options): every strategy the EP path must reproduce.
CASES = [
    ("unlimited", None, "drop", {}),
    ("drop-score", 1.0, "drop", {}),
    ("drop-order", 1.0, "drop", {"policy": "order"}),
    ("drop-reverse", 1.0, "drop", {"policy": "reverse"}),
    ("drop-random", 1.0, "drop", {"policy": "random", "seed": 3}),
    ("reroute", 1.0, "reroute", {}),
    ("reroute-least-loaded-2rounds", 1.0, "reroute", {"reroute_target": "least_loaded", "reroute_rounds": 2}),
    ("expanded-local", 1.0, "expanded", {}),
    ("expanded-max3", 1.5, "expanded", {"max_experts_per_token": 3}),
    ("drop-device-scope", 1.0, "drop", {"capacity_scope": "device"}),
    ("drop-sequence-group", 1.5, "drop", {"group": "sequence"}),
    ("drop-renormalize-kept", 1.0, "drop", {"renormalize": "kept"}),
    ("expert-drop", None, "expert_drop", {}),
]


def _batch(batch: int, seq: int, seed: int, pad_rows=()):
    g = torch.Generator().manual_seed(seed)
    ids_BS = torch.randint(3, 128, (batch, seq), generator=g)
    mask_BS = torch.ones(batch, seq, dtype=torch.long)
    for row in pad_rows:  # right padding: every query still sees a real token, logits stay finite
        mask_BS[row, -3:] = 0
    return ids_BS, mask_BS


def _logits(model, ids_BS, mask_BS):
    with torch.no_grad():
        return model(input_ids=ids_BS, attention_mask=mask_BS).logits


def _ep_logits(model, gamma, strategy, opts, ids_BS, mask_BS, kernel_sort=None):
    moepatch.apply(model, gamma, strategy, expert_parallel=True, **opts)
    try:
        runtime = ep_module.runtime(model)
        runtime.dispatcher.kernel_sort = kernel_sort
        rounds = runtime.rounds
        logits = _logits(model, ids_BS, mask_BS)
        # The EP path really ran: one round per MoE layer of the forward.
        assert runtime.rounds - rounds == len(runtime.blocks), (runtime.rounds, rounds)
        return logits, moepatch.stats(model)
    finally:
        moepatch.remove(model)


def _sim_logits(model, gamma, strategy, opts, ids_BS, mask_BS, world):
    with moepatch.patched(model, gamma, strategy, ep_size=world, kernel="torch", **opts):
        return _logits(model, ids_BS, mask_BS)


def _params(model):
    return dict(model.named_parameters())


def scenario_equivalence(rank, world, model_types, sort="auto"):
    """EP logits on this rank's chunk == single-process ep_size=world logits of the full batch;
    ``sort="kernel"``: the dispatcher sorts with moepatch.ops' kernels (here the Triton interpreter)."""
    out = {}
    for mt in model_types.split(","):
        model = tiny_model(mt)
        before = _params(model)
        snapshot = {n: p.detach().clone() for n, p in before.items()}
        ids_BS, mask_BS = _batch(2 * world, 10, seed=1, pad_rows=(1, 2 * world - 2))
        chunk = slice(2 * rank, 2 * rank + 2)
        for name, gamma, strategy, opts in CASES:
            ref = _sim_logits(model, gamma, strategy, opts, ids_BS, mask_BS, world)[chunk]
            got, stats = _ep_logits(model, gamma, strategy, opts, ids_BS[chunk], mask_BS[chunk],
                                    kernel_sort=True if sort == "kernel" else None)
            out[f"{mt}/{name}"] = dict(max_abs=float((got - ref).abs().max()), ref_max=float(ref.abs().max()),
                                       dropped=sum(r.dropped_pairs for r in stats.records))
        after = _params(model)
        out[f"{mt}/restored"] = all(after[n] is before[n] and torch.equal(after[n], snapshot[n]) for n in before)
        out[f"{mt}/implementation"] = model.config._experts_implementation
    return out


def _dup_reference(model, gamma, strategy, opts, ids_BS, mask_BS, rank, world):
    """Single-process reference for one rank's own batch of any shape.

    Capacity per source rank makes rank r's routing depend on its tokens only; simulating
    ep_size=world on the batch repeated world times puts one copy on every simulated device, and
    copy r sits on device r (its local experts included), so that copy is rank r's reference.
    """
    B = ids_BS.shape[0]
    rep = _sim_logits(model, gamma, strategy, opts, ids_BS.repeat(world, 1), mask_BS.repeat(world, 1), world)
    return rep[rank * B:(rank + 1) * B]


UNEVEN_CASES = [c for c in CASES if c[0] in ("drop-score", "reroute", "expanded-local", "drop-device-scope",
                                             "drop-sequence-group")]


def scenario_uneven(rank, world, model_type):
    """Different batch and sequence length per rank, and different numbers of forwards per rank."""
    model = tiny_model(model_type)
    shapes = [[(3, 7), (2, 9), (1, 5)], [(1, 12)]][rank]  # rank 1: one forward, rank 0: three
    batches = [_batch(b, s, seed=10 * rank + i, pad_rows=(0,) if b > 1 else ()) for i, (b, s) in enumerate(shapes)]
    out = {}
    for name, gamma, strategy, opts in UNEVEN_CASES:
        refs = [_dup_reference(model, gamma, strategy, opts, ids, mask, rank, world) for ids, mask in batches]
        moepatch.apply(model, gamma, strategy, expert_parallel=True, **opts)
        try:
            got = ep_barrier_loop(model, batches, lambda b: _logits(model, *b))
        finally:
            moepatch.remove(model)
        out[name] = max(float((g - r).abs().max()) for g, r in zip(got, refs))
    return out


def scenario_idle(rank, world, model_type):
    """Rank 1 has no data at all (zero tokens, zero forwards); rank 0 runs three forwards, then
    both run greedy generation of different lengths (different numbers of decode forwards)."""
    model = tiny_model(model_type)
    batches = [_batch(2, 8, seed=i) for i in range(3)] if rank == 0 else []
    refs = [_dup_reference(model, 1.0, "drop", {}, ids, mask, rank, world) for ids, mask in batches]
    prompt_BS = _batch(1, 6, seed=99)[0]
    new_tokens = 5 if rank == 0 else 2
    with torch.no_grad():
        ref_gen = model.generate(prompt_BS, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    moepatch.apply(model, 1.0, "drop", expert_parallel=True)
    try:
        got = ep_barrier_loop(model, batches, lambda b: _logits(model, *b))
        moepatch.apply(model, None, "drop", expert_parallel=True)  # no capacity: generation must match
        with ep_session(model), torch.no_grad():
            gen = model.generate(prompt_BS, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    finally:
        moepatch.remove(model)
    return dict(forwards=len(got), max_abs=max([float((g - r).abs().max()) for g, r in zip(got, refs)], default=0.0),
                generate_equal=bool(torch.equal(gen, ref_gen)), generated=gen.shape[1] - prompt_BS.shape[1])


def scenario_dispatcher(rank, world):
    """The experts path on crafted routings: a rank that receives nothing, a rank with zero tokens,
    a rank whose every slot is dropped, sentinels in wide slots, bf16 over gloo."""
    model = tiny_model("mixtral")
    experts = model.model.layers[0].mlp.experts
    full_gu, full_dn = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
    E, H = full_gu.shape[0], full_gu.shape[2]

    def reference(x_TH, ids_TW, w_TW):  # in float64 (sentinel E: a dropped slot)
        return reference_experts(x_TH.double(), ids_TW, w_TW.double(), full_gu.double(), full_dn.double())

    g = torch.Generator().manual_seed(rank)
    cases = {
        # every slot of both ranks goes to rank 0's experts: rank 1 receives zero rows
        "to-rank0-only": (5, lambda T: torch.randint(0, E // 2, (T, 2), generator=g)),
        # rank 1 has no tokens at all
        "zero-tokens": (0 if rank == 1 else 4, lambda T: torch.randint(0, E, (T, 2), generator=g)),
        # rank 0 drops every slot: it sends nothing and gets zeros back
        "all-dropped": (3, lambda T: torch.full((T, 2), E) if rank == 0 else torch.randint(0, E, (T, 2), generator=g)),
        # expanded-drop width with sentinels interleaved
        "wide-sentinels": (7, lambda T: torch.where(torch.rand(T, 5, generator=g) < 0.4, E,
                                                    torch.randint(0, E, (T, 5), generator=g))),
    }
    out = {}
    moepatch.apply(model, None, "drop", expert_parallel=True)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            model.to(dtype)
            for name, (T, make_ids) in cases.items():
                ids_TW = make_ids(T).long()
                x_TH = torch.randn(T, H, generator=g).to(dtype)
                w_TW = torch.where(ids_TW == E, 0.0, torch.rand(ids_TW.shape, generator=g)).to(dtype)
                with torch.no_grad():
                    got = experts(x_TH, ids_TW, w_TW)
                ref = reference(x_TH.float(), ids_TW, w_TW.float())
                err = float((got.double() - ref).abs().max()) if T else 0.0
                out[f"{name}/{str(dtype)[6:]}"] = dict(max_abs=err, ref_max=float(ref.abs().max()) if T else 0.0,
                                                       shape=list(got.shape), dtype=str(got.dtype))
            model.to(torch.float32)
    finally:
        moepatch.remove(model)
    return out


def scenario_failure(rank, world, mode):
    """Rank 1 fails after one forward; rank 0 keeps running forwards and must not hang.

    mode ``raise``: rank 1 raises inside ep_session.  ``raise-in-experts``: rank 1's local
    expert compute raises in the middle of a round.  ``crash``: rank 1's process dies outside any
    session (os._exit), so rank 0 is saved by the transport noticing the closed connection.
    ``hang``: rank 1 blocks outside moepatch for the process-group timeout plus 1.5 s and then
    exits; rank 0 is saved by the process-group timeout alone.
    """
    model = tiny_model("mixtral")
    moepatch.apply(model, 1.0, "drop", expert_parallel=True)
    ids_BS, mask_BS = _batch(2, 8, seed=5)
    start = time.monotonic()
    forwards = 0
    try:
        with ep_session(model):
            for _ in range(5):
                if rank == 1 and forwards == 1:
                    if mode == "raise":
                        raise ValueError("injected failure on rank 1")
                    if mode == "crash":
                        os._exit(3)
                    if mode == "hang":
                        time.sleep(float(os.environ["MOEPATCH_EP_TIMEOUT_S"]) + 1.5)
                        os._exit(4)
                    if mode == "raise-in-experts":
                        def failing(*args, **kwargs):
                            raise MemoryError("injected failure inside the expert compute")

                        ep_module.compute_local_experts = failing
                _logits(model, ids_BS, mask_BS)
                forwards += 1
    except BaseException as exc:  # the scenario's result is the exception each rank ends with
        return dict(error=type(exc).__name__, message=str(exc)[:300], forwards=forwards,
                    elapsed=time.monotonic() - start)
    return dict(error=None, forwards=forwards, elapsed=time.monotonic() - start)


def scenario_loaded(rank, world, ckpt_root):
    """load_expert_parallel of per-expert (save_pretrained) and fused checkpoints, then EP == reference."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from moepatch.parallel import load_expert_parallel

    out = {}
    for mt in ("mixtral", "deepseek_v3"):
        ref_model = tiny_model(mt)
        per_expert, fused = f"{ckpt_root}/{mt}-per-expert", f"{ckpt_root}/{mt}-fused"
        if rank == 0:
            ref_model.save_pretrained(per_expert)
            os.makedirs(fused, exist_ok=True)
            ref_model.config.save_pretrained(fused)
            save_file({k: v.contiguous() for k, v in ref_model.state_dict().items()}, f"{fused}/model.safetensors")
        dist.barrier()
        ids_BS, mask_BS = _batch(2 * world, 9, seed=7)
        chunk = slice(2 * rank, 2 * rank + 2)
        ref = _sim_logits(ref_model, 1.0, "reroute", {}, ids_BS, mask_BS, world)[chunk]
        for layout, path in (("per-expert", per_expert), ("fused", fused)):
            model = load_expert_parallel(path, rank, world, dtype=torch.float32)
            local_shape = list(model.model.layers[0].mlp.experts.gate_up_proj.shape)
            moepatch.apply(model, 1.0, "reroute", expert_parallel=True)
            got = _logits(model, ids_BS[chunk], mask_BS[chunk])
            sliced = list(model.model.layers[0].mlp.experts.gate_up_proj.shape)
            moepatch.remove(model)
            try:
                _logits(model, ids_BS[chunk], mask_BS[chunk])
                unpatched = "ran"
            except moepatch.ModelStateError as exc:
                unpatched = str(exc)
            out[f"{mt}/{layout}"] = dict(max_abs=float((got - ref).abs().max()), local_shape=local_shape,
                                         shape_under_ep=sliced, unpatched=unpatched)
    return out


def scenario_clean(rank, world, ckpt_root):
    """The scenarios that leave the process group healthy, one after another in one launch."""
    return dict(uneven=scenario_uneven(rank, world, "mixtral"), idle=scenario_idle(rank, world, "mixtral"),
                dispatcher=scenario_dispatcher(rank, world), loaded=scenario_loaded(rank, world, ckpt_root))


SCENARIOS = {"equivalence": scenario_equivalence, "uneven": scenario_uneven, "idle": scenario_idle,
             "dispatcher": scenario_dispatcher, "failure": scenario_failure, "loaded": scenario_loaded,
             "clean": scenario_clean}


def main(argv):
    scenario, out_path, *args = argv
    torch.manual_seed(0)
    rank, world, _ = init_distributed(backend="gloo")
    try:
        result = SCENARIOS[scenario](rank, world, *args)
    except BaseException:
        result = dict(unexpected=traceback.format_exc())
        with open(out_path, "w") as f:
            json.dump(result, f)
        raise
    with open(out_path, "w") as f:
        json.dump(result, f)
    if scenario == "failure":
        # A failed session leaves the group unusable: skip the interpreter's teardown, where gloo's
        # thread still blocked in the timed-out collective can abort the process (SIGABRT, seen
        # under a loaded machine) after the result is written.
        sys.stdout.flush()
        os._exit(0)
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
