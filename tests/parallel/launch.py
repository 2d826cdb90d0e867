"""Run a scenario of ``worker.py`` on N gloo ranks, each in its own process, with a wall-clock limit.

Plain subprocesses (not torchrun) start in about a second each and can be killed by the test,
so a deadlock fails the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankResult:
    returncode: int | None  # None: killed at the wall-clock limit
    output: str
    result: dict | None


def run_script(script: Path, lead: list[str], args: list[str], tmp_path: Path, stem: str, world: int = 2,
               limit_s: float = 60.0, timeout_s: float = 20.0) -> tuple[list[RankResult], float]:
    """Start ``world`` ranks of ``python script *lead OUT_JSON *args``; their results and the wall time.

    ``timeout_s`` is the process-group timeout the ranks use; ``limit_s`` the wall-clock limit
    after which every rank still running is killed (and reported with returncode None).
    """
    port = free_port()
    procs = []
    start = time.monotonic()
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), MOEPATCH_EP_TIMEOUT_S=str(timeout_s),
                   OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        out = tmp_path / f"{stem}.rank{rank}.json"
        log = open(tmp_path / f"{stem}.rank{rank}.log", "w+")
        p = subprocess.Popen([sys.executable, str(script), *lead, str(out), *args], env=env,
                             stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
        procs.append((p, out, log))
    results = []
    for p, out, log in procs:
        remaining = max(limit_s - (time.monotonic() - start), 0.1)
        try:
            code = p.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            code = None
        log.seek(0)
        text = log.read()
        log.close()
        results.append(RankResult(code, text, json.loads(out.read_text()) if out.exists() else None))
    return results, time.monotonic() - start


def run_ranks(scenario: str, tmp_path: Path, world: int = 2, limit_s: float = 60.0, timeout_s: float = 20.0,
              args: tuple = ()) -> tuple[list[RankResult], float]:
    """Start ``world`` ranks of ``worker.py scenario``; return their results and the wall time (see run_script)."""
    return run_script(WORKER, [scenario], list(args), tmp_path, scenario, world, limit_s, timeout_s)


def check_ok(results: list[RankResult]) -> list[dict]:
    """Every rank exited 0 and wrote its result; the results in rank order."""
    for rank, r in enumerate(results):
        assert r.returncode == 0 and r.result is not None, f"rank {rank} failed ({r.returncode}):\n{r.output[-3000:]}"
    return [r.result for r in results]
