"""Expert-parallel tests: 2 (or 1) gloo ranks in subprocesses, each killed at a wall-clock limit."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # launch.py / worker.py sit beside the tests


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: starts torch.distributed ranks in subprocesses (gloo, CPU)")


@pytest.fixture(scope="session")
def clean_scenarios(tmp_path_factory):
    """uneven, idle, dispatcher and loaded, run by one 2-rank launch (process start-up dominates)."""
    from launch import check_ok, run_ranks

    tmp = tmp_path_factory.mktemp("clean")
    results, _ = run_ranks("clean", tmp, args=(str(tmp / "ckpt"),), limit_s=60)
    return check_ok(results)
