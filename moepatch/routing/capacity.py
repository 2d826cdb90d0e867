"""Capacity groups, capacities and the per-bucket ranking every strategy is built on, in fixed-size ops.

Legend: T tokens (batch-major), E routed experts, K experts per token, G capacity groups, D
expert-parallel devices, NB capacity buckets per group (E, or D in device scope), P pairs.
"""

from __future__ import annotations

import torch

# ceil(γ·T·k/E) in floating point: 1.1 * 80 / 8 evaluates to 11.000000000000002; a tolerance far
# below one token keeps such products on the integer they denote.
CEIL_TOLERANCE = 1e-9


def capacities(tokens_G: torch.Tensor, top_k: int, num_experts: int, capacity_factor: float,
               min_capacity: int = 0) -> torch.Tensor:
    """C = max(min_capacity, ceil(γ · T · k / E)) per group: tokens_G (G,) int64 -> capacity_G (G,) int64."""
    raw_G = tokens_G.double() * (capacity_factor * top_k) / num_experts
    cap_G = torch.ceil(raw_G - CEIL_TOLERANCE).long().clamp_min(int(min_capacity))
    return torch.where(tokens_G > 0, cap_G, torch.full_like(cap_G, int(min_capacity)))


def count(index: torch.Tensor, size: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Fixed-size histogram (size,) int64 of ``index`` (values in [0, size)), optionally masked by a bool
    (``torch.bincount`` sizes its output from the data, a host sync on CUDA)."""
    src = torch.ones_like(index, dtype=torch.long) if weight is None else weight.to(torch.long).expand_as(index)
    return torch.zeros(size, dtype=torch.long, device=index.device).scatter_add_(
        0, index.reshape(-1), src.reshape(-1))


def expert_devices(num_experts: int, ep_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Device of each expert (E,) int64: contiguous blocks, the first E % D devices hold one more
    (``torch.tensor_split(torch.arange(E), D)``, the expert-parallel loader's split)."""
    q, r = divmod(num_experts, ep_size)
    e_E = torch.arange(num_experts, device=device)
    boundary = r * (q + 1)
    return torch.where(e_E < boundary, e_E // (q + 1), r + (e_E - boundary) // max(q, 1))


def token_devices(num_tokens: int, ep_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Source device of each token (T,) int64: the flattened batch split into D contiguous chunks."""
    t_T = torch.arange(num_tokens, device=device)
    return t_T * ep_size // max(num_tokens, 1)


def group_ids(batch: int, seq: int, group: str, ep_size: int,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, int]:
    """Capacity group of each of the T = batch * seq tokens and the number of groups G: per forward (or
    source device when ``ep_size > 1``) for "batch"; per sequence for "sequence", split further where a
    sequence straddles two simulated devices (a batch that does not divide by ``ep_size``)."""
    T = batch * seq
    if group == "batch" and ep_size == 1:
        return torch.zeros(T, dtype=torch.long, device=device), 1
    dev_T = token_devices(T, ep_size, device)
    if group == "batch":
        return dev_T, ep_size
    if group == "sequence":
        row_T = torch.arange(T, device=device) // max(seq, 1)
        return row_T * ep_size + dev_T, batch * ep_size
    raise ValueError(f"unknown group {group!r}; accepted: 'batch', 'sequence'")


def bucket_rank(bucket_P: torch.Tensor, order_P: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Rank (P,) int64 of each pair inside its bucket (0: highest priority) from bucket_P (P,) int64 in
    [0, num_buckets) and order_P (P,) int64 pair indices, highest priority first."""
    P = bucket_P.numel()
    # A stable sort by bucket keeps the priority order inside each bucket.
    sorted_bucket, perm = torch.sort(bucket_P[order_P], stable=True)
    pair_at = order_P[perm]
    counts_B = count(sorted_bucket, num_buckets)
    starts_B = torch.cumsum(counts_B, 0) - counts_B
    rank_sorted = torch.arange(P, device=bucket_P.device) - starts_B[sorted_bucket]
    return torch.empty_like(rank_sorted).scatter_(0, pair_at, rank_sorted)


def chunk_sizes(num_tokens: int, ep_size: int) -> list[int]:
    """Tokens per device chunk of :func:`token_devices`, on the host: device d holds t in
    [ceil(d·T/D), ceil((d+1)·T/D)) since token t is on device t·D // T."""
    return [-(-(d + 1) * num_tokens // ep_size) - -(-d * num_tokens // ep_size) for d in range(ep_size)]


def random_keys(seed: int, layer: int, pairs_per_device: list[int], first_device: int = 0) -> torch.Tensor:
    """Priority keys of the ``random`` policy (float64, CPU), one seeded stream per source device: a
    rank under real expert parallelism draws what its chunk draws in the one-process simulation."""
    return torch.cat([torch.rand(n, generator=torch.Generator(device="cpu").manual_seed(
        seed * 1_000_003 + layer + 7_919 * (first_device + d)), dtype=torch.float64)
        for d, n in enumerate(pairs_per_device)]) if pairs_per_device else torch.zeros(0, dtype=torch.float64)


def priority_order(policy: str, score_P: torch.Tensor, token_P: torch.Tensor,
                   keys_P: torch.Tensor | None = None) -> torch.Tensor:
    """Pair indices, highest priority first, for a drop policy.  Pairs are token-major (``token_P``
    non-decreasing), so a stable sort breaks score ties toward the lower token; ``keys_P``: the random keys."""
    P = score_P.numel()
    if policy == "score":
        return torch.sort(-score_P, stable=True).indices
    if policy == "order":
        return torch.arange(P, device=score_P.device)
    if policy == "reverse":
        return torch.sort(-token_P, stable=True).indices
    if policy == "random":
        if keys_P is None or keys_P.numel() != P:
            raise ValueError("policy='random' needs one key per pair (moepatch.routing.capacity.random_keys)")
        return torch.sort(keys_P.to(score_P.device), stable=True).indices
    raise ValueError(f"unknown policy {policy!r}; accepted: 'score', 'order', 'reverse', 'random'")
