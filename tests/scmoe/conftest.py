"""ScMoE tests: tiny models on the CPU; the expert-parallel ones start 2 gloo ranks in subprocesses."""

import sys
from pathlib import Path

import pytest
import torch

# scmoe_launch.py / ep_worker.py sit beside the tests (named apart from tests/parallel/launch.py, worker.py).
sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: starts torch.distributed ranks in subprocesses (gloo, CPU)")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors on a shared 2-core machine: extra intra-op threads only spin (10x slower under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
