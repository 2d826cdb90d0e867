"""Start N gloo ranks of a worker script as plain subprocesses with a wall-clock limit, through
tests/parallel/launch.py (a deadlock fails the test instead of hanging the suite)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
from launch import check_ok, run_script  # noqa: E402  (tests/parallel/launch.py)


def run_ranks(script: Path, args: list[str], tmp_path: Path, world: int = 2, limit_s: float = 60.0,
              timeout_s: float = 20.0) -> list[dict]:
    """Run ``python script OUT_JSON *args`` on ``world`` ranks; every rank's JSON result, in rank order.

    Fails (AssertionError with the rank's log) when a rank exits non-zero, writes nothing, or is
    still running at ``limit_s`` (then it is killed).
    """
    return check_ok(run_script(script, [], list(args), tmp_path, script.stem, world, limit_s, timeout_s)[0])
