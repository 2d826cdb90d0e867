"""Kernel tests: on the CPU through Triton's interpreter, or compiled on a CUDA GPU.

Triton reads TRITON_INTERPRET when a ``@triton.jit`` function is defined (older releases: when
triton is imported), so it is set here, at the top of the conftest, before anything imports
moepatch.ops.  On a machine with a GPU the kernels are compiled and the tests run on CUDA unless
TRITON_INTERPRET=1 is set explicitly; ``-m gpu`` selects the bf16 / real-shape / CUDA-graph tests.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def device():
    """Where kernel tests run: the CPU under the interpreter, else CUDA."""
    return "cpu" if INTERPRET else "cuda"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if str(item.path).startswith(_HERE) and "gpu" in item.keywords and INTERPRET:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (compiled Triton kernels)"))
