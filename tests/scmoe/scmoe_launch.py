"""Start N gloo ranks of a worker script as plain subprocesses with a wall-clock limit (the approach
of tests/parallel/launch.py: a deadlock fails the test instead of hanging the suite)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: Path, args: list[str], tmp_path: Path, world: int = 2, limit_s: float = 60.0,
              timeout_s: float = 20.0) -> list[dict]:
    """Run ``python script OUT_JSON *args`` on ``world`` ranks; every rank's JSON result, in rank order.

    Fails (AssertionError with the rank's log) when a rank exits non-zero, writes nothing, or is
    still running at ``limit_s`` (then it is killed).
    """
    port = free_port()
    procs = []
    start = time.monotonic()
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), MOEPATCH_EP_TIMEOUT_S=str(timeout_s), OMP_NUM_THREADS="1",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        out = tmp_path / f"{script.stem}.rank{rank}.json"
        log = open(tmp_path / f"{script.stem}.rank{rank}.log", "w+")
        p = subprocess.Popen([sys.executable, str(script), str(out), *args], env=env, stdout=log,
                             stderr=subprocess.STDOUT, cwd=str(REPO))
        procs.append((p, out, log))
    results = []
    for rank, (p, out, log) in enumerate(procs):
        try:
            code = p.wait(timeout=max(limit_s - (time.monotonic() - start), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            code = None
        log.seek(0)
        text = log.read()
        log.close()
        assert code == 0 and out.exists(), f"rank {rank} failed ({code}):\n{text[-3000:]}"
        results.append(json.loads(out.read_text()))
    return results
