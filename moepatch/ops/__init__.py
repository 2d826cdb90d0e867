"""Triton kernels and their launchers (nothing is imported here, so the package loads without triton).

The modules: docs/design.md, "ops"; the kernels: docs/kernels.md.
"""
