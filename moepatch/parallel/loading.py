"""Models that hold only this rank's experts, from a local safetensors checkpoint or at random: built on the
meta device with each experts module shrunk to this rank's block, every parameter materialised once on
``device`` (docs/expert-parallel.md, "Loading").  E experts, L of this rank, I intermediate, H hidden.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import zlib
from pathlib import Path

import torch

from ..errors import UnsupportedModelError
from ..patch import backend
from ..patch.registry import family_for, moe_blocks
from .ep import EXPERTS_IMPLEMENTATION, SHARDS, ShardInfo, local_range, register_experts_implementation

_EXPERT_PARAMS = ("gate_up_proj", "down_proj")
# (gate, up, down) names of per-expert checkpoints: transformers' own layout, then Mixtral's original one.
_PER_EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def _renamed(name: str) -> list[str]:
    """Checkpoint names a module name may be stored under (Mixtral keeps its original MoE block name)."""
    return [name, name.replace(".mlp.", ".block_sparse_moe.")] if ".mlp." in name else [name]


class _Checkpoint:
    """Lazy read access to the tensors of a local safetensors checkpoint."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._open = safe_open
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.is_file():
            with open(index) as f:
                self.weight_map = {k: path / v for k, v in json.load(f)["weight_map"].items()}
        elif single.is_file():
            with safe_open(str(single), framework="pt") as f:
                self.weight_map = {k: single for k in f.keys()}
        else:
            raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json; "
                                    "load_expert_parallel reads local safetensors checkpoints only")
        self._files: dict = {}

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor (CPU), or only its rows ``first:stop`` along dim 0 (only those bytes are read)."""
        fname = self.weight_map[key]
        if fname not in self._files:
            self._files[fname] = self._open(str(fname), framework="pt")
        f = self._files[fname]
        if rows is None:
            return f.get_tensor(key)
        return f.get_slice(key)[rows[0]:rows[1]]

    def first(self, names: list[str]) -> str | None:
        return next((n for n in names if n in self.weight_map), None)


def _skeleton(config, dtype: torch.dtype, rank: int, world: int):
    """(the model on the meta device, each experts module shrunk to this rank's L experts, {its name: ShardInfo})."""
    import transformers
    from accelerate import init_empty_weights

    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    # The experts implementation is set on the model's config: two models must not share that switch.
    config = copy.deepcopy(config)
    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    spec = family_for(model)
    shards = {}
    for name, block in moe_blocks(model, spec):
        E = int(block.gate.num_experts)
        if world > E:
            raise ValueError(f"{world} ranks cannot share {E} experts (each rank needs at least one)")
        first, stop = local_range(E, world, rank)
        experts = block.experts
        for pname in _EXPERT_PARAMS:
            p = experts._parameters[pname]
            if p.shape[0] != E:
                raise UnsupportedModelError(f"{name}.experts.{pname} has {p.shape[0]} experts, the router {E}")
            experts._parameters[pname] = torch.nn.Parameter(
                torch.empty((stop - first, *p.shape[1:]), dtype=p.dtype, device="meta"), requires_grad=p.requires_grad)
        shards[f"{name}.experts"] = ShardInfo(rank, world, first, stop, E)
    return model, shards


def _shard_of(shards: dict, name: str) -> ShardInfo | None:
    """The ShardInfo of an expert parameter's module, None for every other parameter."""
    module_name, _, leaf = name.rpartition(".")
    return shards.get(module_name) if leaf in _EXPERT_PARAMS else None


def _materialize(model, shards: dict, device, fill) -> None:
    """Give every meta parameter storage on ``device`` from ``fill(names, shape, dtype, shard)``; tied
    parameters (one Parameter under several names) are filled once and stay tied."""
    for p, names in _unique_params(model):
        if p.device.type != "meta":
            continue
        value = fill(names, tuple(p.shape), p.dtype, _shard_of(shards, names[0]))
        new = torch.nn.Parameter(value.to(device=device, dtype=p.dtype), requires_grad=p.requires_grad)
        for full in names:
            owner_name, _, leaf_name = full.rpartition(".")
            model.get_submodule(owner_name)._parameters[leaf_name] = new


def _finish(model, shards: dict, device):
    model.to(device)  # the buffers; parameters are there already
    if all(info.world == 1 for info in shards.values()):
        return model.eval()  # every expert is here: an ordinary model (the single-process reference)
    register_experts_implementation()
    for module_name, info in shards.items():
        SHARDS[model.get_submodule(module_name)] = info
    # It lacks the other ranks' experts: the EP implementation, selected for good, fails clearly until installed.
    backend.select(model, [b for _, b in moe_blocks(model, family_for(model))], EXPERTS_IMPLEMENTATION)
    return model.eval()


def load_expert_parallel(path_or_config, rank: int, world: int, dtype: torch.dtype = torch.bfloat16,
                         device: torch.device | str = "cpu"):
    """A ``*ForCausalLM`` in eval mode holding only rank ``rank``'s experts of a local safetensors checkpoint
    (``path_or_config``: its directory, or a config whose ``name_or_path`` is it), cast to ``dtype`` on ``device``.
    Raises FileNotFoundError (no safetensors there), KeyError (missing tensors, listed), UnsupportedModelError."""
    import transformers

    if isinstance(path_or_config, (str, os.PathLike)):
        path = Path(path_or_config)
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    else:
        config = path_or_config
        path = Path(getattr(config, "name_or_path", "") or "")
        if not str(path) or not path.is_dir():
            raise FileNotFoundError(f"config.name_or_path={str(path)!r} is not a local checkpoint directory; pass "
                                    "the directory itself")
    ckpt = _Checkpoint(path)
    model, shards = _skeleton(config, dtype, rank, world)
    # Resolve every tensor before reading any, so a wrong checkpoint fails fast and lists all gaps.
    sources, missing = {}, []
    for _, names in _unique_params(model):
        shard = _shard_of(shards, names[0])
        if shard is not None:
            src = _experts_source(ckpt, names[0], shard)
        else:
            key = ckpt.first([c for n in names for c in _renamed(n)])
            src = None if key is None else functools.partial(ckpt.read, key)
        if src is None:
            missing.append(names[0])
        sources[names[0]] = src
    if missing:
        raise KeyError(f"{path} lacks tensors for {len(missing)} parameter(s) the model needs, e.g. {missing[:4]} "
                       "(layouts read: docs/expert-parallel.md, 'Loading')")
    _materialize(model, shards, device, lambda names, *_: sources[names[0]]())
    # Persistent buffers (e.g. DeepSeek-V3's e_score_correction_bias) come from the checkpoint too.
    state_keys = set(model.state_dict().keys())
    for name, buf in model.named_buffers():
        key = ckpt.first(_renamed(name)) if name in state_keys else None
        if key is not None:
            buf.copy_(ckpt.read(key).to(buf.dtype))
    config._name_or_path = str(path)
    return _finish(model, shards, device)


def _unique_params(model):
    """[(parameter, [every name it is registered under])]: tied weights appear once."""
    aliases: dict = {}
    for full, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), (p, []))[1].append(full)
    return list(aliases.values())


def _experts_source(ckpt: _Checkpoint, name: str, shard: ShardInfo):
    """A reader of this rank's (L, 2I, H) gate_up or (L, H, I) down tensor, or None if absent."""
    experts_path, _, leaf = name.rpartition(".")
    rows = (shard.first, shard.stop)
    fused = ckpt.first(_renamed(name))
    if fused is not None:
        return lambda: ckpt.read(fused, rows)
    for prefix in _renamed(experts_path):
        for gate, up, down in _PER_EXPERT_NAMES:
            keys = [[f"{prefix}.{e}.{n}.weight" for n in ((gate, up) if leaf == "gate_up_proj" else (down,))]
                    for e in range(*rows)]
            if all(k in ckpt.weight_map for ks in keys for k in ks):
                # transformers fuses [gate; up] along the output rows (Concatenate(dim=1) on (E, I, H)).
                return lambda keys=keys: torch.stack([
                    torch.cat([ckpt.read(k) for k in ks], dim=0) if len(ks) > 1 else ckpt.read(ks[0]) for ks in keys])
    return None


def _seed(seed: int, name: str, expert: int = -1) -> int:
    # Per tensor and expert: any world size's slice equals the world-size-1 build; replicas agree on every rank.
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 1_009 + expert + 1) % (2**63 - 1)


def build_random_expert_parallel(config, rank: int, world: int, dtype: torch.dtype = torch.bfloat16,
                                 device: torch.device | str = "cpu", seed: int = 0, std: float | None = None):
    """A ``*ForCausalLM`` of ``config`` with random weights and only rank ``rank``'s experts: N(0, std) (default
    ``config.initializer_range``) matrices and experts, 1 for 1-D weights, 0 for biases, each tensor (and expert)
    from a generator seeded by its name on ``device``, so rank r's experts equal those of the world-size-1
    build on the same device type (a benchmark's single-process reference)."""
    model, shards = _skeleton(config, dtype, rank, world)
    if std is None:
        std = float(getattr(config, "initializer_range", 0.02))
    device = torch.device(device)

    def fill(names, shape, p_dtype, shard):
        name = names[0]
        out = torch.empty(shape, dtype=p_dtype, device=device)
        if shard is not None:
            for j, e in enumerate(range(shard.first, shard.stop)):
                g = torch.Generator(device=device).manual_seed(_seed(seed, name, e))
                out[j].normal_(0.0, std, generator=g)
        elif name.endswith("bias"):
            out.zero_()
        elif len(shape) == 1:
            out.fill_(1.0)
        else:
            out.normal_(0.0, std, generator=torch.Generator(device=device).manual_seed(_seed(seed, name)))
        return out

    _materialize(model, shards, device, fill)
    return _finish(model, shards, device)
