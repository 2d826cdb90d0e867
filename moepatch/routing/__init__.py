"""Capacity-aware routing in fixed-size torch ops (no host sync): the reference and what runs."""

from .capacity import (
    bucket_rank,
    capacities,
    chunk_sizes,
    expert_devices,
    group_ids,
    priority_order,
    random_keys,
    token_devices,
)
from .config import POLICIES, STRATEGIES, RoutingConfig, make_config
from .route import RoutingResult, route
from .scores import FamilyScoring
from .stats import ForwardRecord, LoadStats, PendingRecord, describe_config
from .strategies import expanded_drop, expert_drop, token_drop, token_reroute

__all__ = [
    "POLICIES", "STRATEGIES", "FamilyScoring", "ForwardRecord", "LoadStats", "PendingRecord", "RoutingConfig",
    "RoutingResult", "describe_config",
    "bucket_rank", "capacities", "chunk_sizes", "expanded_drop", "expert_devices", "expert_drop",
    "group_ids", "make_config", "priority_order", "random_keys", "route", "token_devices", "token_drop",
    "token_reroute",
]
