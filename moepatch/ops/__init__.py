"""Triton kernels for patched MoE layers: fused SwiGLU experts over a sync-free dispatch.

Submodules (import what you need; nothing is imported here so the package loads without triton):
    routing       route_sync_free: the reference routing without host syncs (CUDA-graph safe).
    experts       fused_experts and its launchers (dispatch, gate_up, down, combine), as custom ops.
    tuning        tile configuration tables, defaults and the autotuner ``tune``.
    integration   the ``kernel="triton"`` backend of moepatch.apply (transformers ExpertsInterface).
    route_graphs  the sync-free routing replayed from CUDA graphs per routing signature.
    expert_graphs the fused experts layer replayed from CUDA graphs at 1-64 tokens.
    graph_cache   what the two share: the per-signature cache, the capture-time timing, the device guard.
"""
