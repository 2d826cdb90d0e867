"""Triton kernels and their launchers (nothing is imported here, so the package loads without triton).

    route         the routing's fused kernels, for the cases they cover.
    experts       fused experts (dispatch, gate_up, down, combine) and its custom ops; reference: the loop.
    tuning, tune  tile tables and their lookup; the autotuner behind ``moepatch tune``.
    route_graphs, expert_graphs, graph_cache   CUDA-graph replay per call signature.
    *_kernels     the @triton.jit kernels (dispatch, gemm, tma for the descriptor GEMMs, routing).
"""
