"""The validated routing configuration behind ``moepatch.apply``: every check happens before anything
touches a model, so a bad argument leaves the model as it was."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from ..errors import InvalidOptionError

STRATEGIES = ("drop", "reroute", "expanded", "expert_drop")
POLICIES = ("score", "order", "reverse", "random")
KERNELS = ("auto", "torch", "triton")

# Options that only mean something for some strategies; passing one to another strategy is an error.
STRATEGY_OPTIONS = {
    "drop": ("policy", "seed"),
    "reroute": ("policy", "seed", "reroute_target", "reroute_rounds"),
    "expanded": ("local_experts", "max_experts_per_token"),
    "expert_drop": ("expert_drop_fraction",),
}
COMMON_OPTIONS = ("min_capacity", "renormalize", "count_padding", "apply_in_decode", "group",
                  "capacity_scope", "ep_size", "kernel", "cuda_graphs", "collect_stats", "expert_parallel")


@dataclass(frozen=True)
class RoutingConfig:
    """What a patched MoE layer does with its router's picks.  See docs/usage.md for each field."""

    capacity_factor: float | None = 1.5
    strategy: str = "drop"
    policy: str = "score"
    seed: int = 0
    reroute_target: str = "score"
    reroute_rounds: int = 1
    local_experts: str = "device"
    max_experts_per_token: int | None = None
    expert_drop_fraction: float = 0.1
    min_capacity: int = 0
    renormalize: str = "none"
    count_padding: bool = False
    apply_in_decode: bool = False
    group: str = "batch"
    capacity_scope: str = "expert"
    ep_size: int = 1
    kernel: str = "auto"
    cuda_graphs: bool = True
    collect_stats: bool = True
    expert_parallel: bool = False
    _explicit: tuple = field(default=(), compare=False, repr=False)

    @property
    def unlimited(self) -> bool:
        """No capacity at all: the patched model computes exactly what the unpatched one does."""
        return self.strategy != "expert_drop" and self.capacity_factor is None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("_explicit")
        return d


def check_choice(name, value, accepted) -> None:
    if value not in accepted:
        raise InvalidOptionError(f"{name}={value!r} is not supported; accepted: {', '.join(map(repr, accepted))}")


def _int(name, value, lo, hi=None):
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InvalidOptionError(f"{name}={value!r} is not valid; accepted: an integer {rng}")


def _bool(name, value):
    if not isinstance(value, bool):
        raise InvalidOptionError(f"{name}={value!r} is not valid; accepted: True or False")


def make_config(capacity_factor=1.5, strategy="drop", policy=None, *, num_experts=None, **options) -> RoutingConfig:
    """Validate ``moepatch.apply`` arguments and build a :class:`RoutingConfig`.

    Raises:
        InvalidOptionError: with what was wrong and what is accepted.
    """
    check_choice("strategy", strategy, STRATEGIES)
    known = set(COMMON_OPTIONS) | {o for opts in STRATEGY_OPTIONS.values() for o in opts}
    unknown = sorted(set(options) - known - {"policy"})
    if unknown:
        raise InvalidOptionError(
            f"unknown option(s) {', '.join(unknown)}; accepted: capacity_factor, strategy, "
            f"{', '.join(sorted(known))}")
    explicit = dict(options)
    if policy is not None:
        explicit["policy"] = policy
    allowed = set(COMMON_OPTIONS) | set(STRATEGY_OPTIONS[strategy])
    foreign = sorted(set(explicit) - allowed)
    if foreign:
        owners = {o: [s for s, opts in STRATEGY_OPTIONS.items() if o in opts] for o in foreign}
        desc = "; ".join(f"{o} belongs to strategy {'/'.join(owners[o])}" for o in foreign)
        raise InvalidOptionError(
            f"option(s) {', '.join(foreign)} do not apply to strategy {strategy!r} ({desc}); "
            f"{strategy!r} accepts: {', '.join(sorted(allowed))}")

    if capacity_factor is not None:
        cf = capacity_factor
        if isinstance(cf, bool) or not isinstance(cf, (int, float)) or math.isnan(cf) or cf <= 0:
            raise InvalidOptionError(
                f"capacity_factor={capacity_factor!r} is not valid; accepted: a number > 0, inf, or None "
                "(None or inf means no capacity)")
        capacity_factor = None if math.isinf(capacity_factor) else float(capacity_factor)

    cfg = RoutingConfig(capacity_factor=capacity_factor, strategy=strategy,
                        _explicit=tuple(sorted(explicit)), **explicit)
    check_choice("policy", cfg.policy, POLICIES)
    _int("seed", cfg.seed, 0)
    check_choice("reroute_target", cfg.reroute_target, ("score", "least_loaded"))
    _int("reroute_rounds", cfg.reroute_rounds, 1)
    check_choice("local_experts", cfg.local_experts, ("device", "all"))
    if cfg.max_experts_per_token is not None:
        _int("max_experts_per_token", cfg.max_experts_per_token, 1)
    f = cfg.expert_drop_fraction
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
        raise InvalidOptionError(f"expert_drop_fraction={f!r} is not valid; accepted: a number in (0, 1)")
    _int("min_capacity", cfg.min_capacity, 0)
    check_choice("renormalize", cfg.renormalize, ("none", "kept"))
    for name in ("count_padding", "apply_in_decode", "collect_stats", "cuda_graphs", "expert_parallel"):
        _bool(name, getattr(cfg, name))
    check_choice("group", cfg.group, ("batch", "sequence"))
    check_choice("capacity_scope", cfg.capacity_scope, ("expert", "device"))
    _int("ep_size", cfg.ep_size, 1, num_experts)
    check_choice("kernel", cfg.kernel, KERNELS)
    return cfg


def config_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(RoutingConfig) if not f.name.startswith("_"))
