"""Load statistics per MoE layer and forward: records keep the routing's tensors on their device
until the statistics are read, so collecting costs no host sync."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

from .capacity import expert_devices
from .route import RoutingResult


@dataclass
class ForwardRecord:
    """One MoE layer in one forward pass.  Loads, ``num_experts`` and ``routed_pairs`` cover the
    computing experts; tokens · top_k = routed_pairs + identity_pairs (zero-computation experts)."""

    layer: int
    tokens: int
    top_k: int
    num_experts: int
    capacity: list[int] | None
    load_before: list[int]
    load_after: list[int]
    routed_pairs: int
    dropped_pairs: int
    rerouted_pairs: int
    added_pairs: int
    ep_size: int = 1
    identity_pairs: int = 0

    @property
    def mean_load(self) -> float:
        """N̄ = T·k/E, the pairs on zero-computation experts left out: (T·k - identity_pairs)/E."""
        return (self.tokens * self.top_k - self.identity_pairs) / self.num_experts

    @staticmethod
    def _ratio(load: list[int], mean: float) -> float:
        return max(load) / mean if mean > 0 else 0.0

    @property
    def straggler_before(self) -> float:
        return self._ratio(self.load_before, self.mean_load)

    @property
    def straggler_after(self) -> float:
        return self._ratio(self.load_after, self.mean_load)

    @property
    def dropped_fraction(self) -> float:
        return self.dropped_pairs / self.routed_pairs if self.routed_pairs else 0.0

    @property
    def rerouted_fraction(self) -> float:
        return self.rerouted_pairs / self.routed_pairs if self.routed_pairs else 0.0

    def device_loads(self, which: str = "after") -> list[int]:
        """Pairs per expert-parallel device (contiguous expert blocks)."""
        load = torch.tensor(self.load_after if which == "after" else self.load_before)
        dev_E = expert_devices(self.num_experts, self.ep_size)
        return torch.bincount(dev_E, weights=load.double(), minlength=self.ep_size).long().tolist()

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(mean_load=self.mean_load, straggler_before=self.straggler_before,
                 straggler_after=self.straggler_after, dropped_fraction=self.dropped_fraction,
                 rerouted_fraction=self.rerouted_fraction)
        if self.ep_size > 1:
            d.update(device_load_before=self.device_loads("before"), device_load_after=self.device_loads("after"))
        return d


class PendingRecord:
    """A record whose numbers still live on the routing device."""

    __slots__ = ("layer", "top_k", "num_experts", "ep_size", "result")

    def __init__(self, layer: int, top_k: int, num_experts: int, ep_size: int, result: RoutingResult):
        self.layer, self.top_k, self.num_experts, self.ep_size = layer, top_k, num_experts, ep_size
        self.result = result

    def materialize(self) -> ForwardRecord:
        r = self.result
        return ForwardRecord(
            layer=self.layer, tokens=int(r.tokens_G.sum()), top_k=self.top_k, num_experts=self.num_experts,
            capacity=None if r.capacity_G is None else r.capacity_G.tolist(),
            load_before=r.load_before_E.tolist(), load_after=r.load_after_E.tolist(),
            routed_pairs=int(r.routed_pairs), dropped_pairs=int(r.dropped_pairs),
            rerouted_pairs=int(r.rerouted_pairs), added_pairs=int(r.added_pairs), ep_size=self.ep_size,
            identity_pairs=0 if r.identity_pairs is None else int(r.identity_pairs))


class LoadStats:
    """Statistics since the last reset: ``records`` per (layer, forward), ``layers()`` per layer, ``to_json()``."""

    def __init__(self, records: list[ForwardRecord], config: dict | None = None):
        self.records = records
        self.config = config or {}

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        c = self.config
        what = describe_config(c) if c else "no configuration"
        layers = self.layers()
        if not layers:
            return f"LoadStats({c.get('model_type', '?')}, {what}: nothing recorded)"
        first = next(iter(layers.values()))
        t = self.totals()
        return (f"LoadStats({c.get('model_type', '?')}, {what}: {len(layers)} MoE layers, {first['forwards']} "
                f"forward(s), {first['tokens']} tokens; dropped {100 * t['dropped_fraction']:.1f}% of routed pairs, "
                f"max/mean load {t['straggler_before']:.2f} -> {t['straggler_after']:.2f})")

    def layers(self) -> dict[int, dict]:
        """Per layer: summed loads, token and pair counts, and the ratios over the whole run."""
        out: dict[int, dict] = {}
        for r in self.records:
            s = out.setdefault(r.layer, dict(forwards=0, tokens=0, routed_pairs=0, dropped_pairs=0,
                                             rerouted_pairs=0, added_pairs=0, identity_pairs=0, top_k=r.top_k,
                                             num_experts=r.num_experts, load_before=[0] * r.num_experts,
                                             load_after=[0] * r.num_experts, straggler_before=[],
                                             straggler_after=[], capacity=[]))
            s["forwards"] += 1
            for key in ("tokens", "routed_pairs", "dropped_pairs", "rerouted_pairs", "added_pairs", "identity_pairs"):
                s[key] += getattr(r, key)
            s["load_before"] = [a + b for a, b in zip(s["load_before"], r.load_before)]
            s["load_after"] = [a + b for a, b in zip(s["load_after"], r.load_after)]
            s["straggler_before"].append(r.straggler_before)
            s["straggler_after"].append(r.straggler_after)
            if r.capacity is not None:
                s["capacity"].append(max(r.capacity))
        for s in out.values():
            n = s["forwards"]
            s["mean_straggler_before"] = sum(s.pop("straggler_before")) / n
            s["mean_straggler_after"] = sum(s.pop("straggler_after")) / n
            caps = s.pop("capacity")
            s["mean_capacity"] = sum(caps) / len(caps) if caps else None
            s["dropped_fraction"] = s["dropped_pairs"] / s["routed_pairs"] if s["routed_pairs"] else 0.0
            s["rerouted_fraction"] = s["rerouted_pairs"] / s["routed_pairs"] if s["routed_pairs"] else 0.0
        return dict(sorted(out.items()))

    def totals(self) -> dict:
        """Whole-run dropped/rerouted fractions and straggler ratios averaged over records."""
        routed = sum(r.routed_pairs for r in self.records)
        n = max(len(self.records), 1)
        return dict(
            forwards=len(self.records),
            dropped_fraction=sum(r.dropped_pairs for r in self.records) / routed if routed else 0.0,
            rerouted_fraction=sum(r.rerouted_pairs for r in self.records) / routed if routed else 0.0,
            straggler_before=sum(r.straggler_before for r in self.records) / n,
            straggler_after=sum(r.straggler_after for r in self.records) / n,
        )

    def to_dict(self) -> dict:
        return dict(config=self.config, totals=self.totals(),
                    layers={str(k): v for k, v in self.layers().items()},
                    records=[r.to_dict() for r in self.records])

    def to_json(self, path: str | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def table(self) -> str:
        """A fixed-width per-layer table: load max/mean before and after, capacity, dropped %."""
        rows = [f"{'layer':>5} {'fwd':>4} {'tokens':>7} {'cap':>6} {'max/mean before':>16} "
                f"{'max/mean after':>15} {'dropped':>8} {'rerouted':>9}"]
        for layer, s in self.layers().items():
            cap = "-" if s["mean_capacity"] is None else f"{s['mean_capacity']:.1f}"
            rows.append(f"{layer:>5} {s['forwards']:>4} {s['tokens']:>7} {cap:>6} "
                        f"{s['mean_straggler_before']:>16.2f} {s['mean_straggler_after']:>15.2f} "
                        f"{100 * s['dropped_fraction']:>7.1f}% {100 * s['rerouted_fraction']:>8.1f}%")
        return "\n".join(rows)


def describe_config(config: dict) -> str:
    """``drop/score γ=1.5`` for a routing configuration's dict (``RoutingConfig.to_dict``)."""
    strategy = config.get("strategy", "drop")
    policy = f"/{config['policy']}" if strategy in ("drop", "reroute") and config.get("policy") else ""
    gamma = config.get("capacity_factor")
    if strategy == "expert_drop":
        return f"expert_drop {config.get('expert_drop_fraction', 0.1):g}"
    return f"{strategy}{policy} " + ("no capacity" if gamma is None else f"γ={gamma:g}")
