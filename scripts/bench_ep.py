"""Expert-parallel MoE layer benchmark: capacity-aware routing vs no capacity vs transformers' EP.

Run one process per GPU, e.g. on 2 GPUs:

    torchrun --nproc_per_node 2 scripts/bench_ep.py --out results/bench_ep
    scripts/launch_ep.sh bench --out results/bench_ep            # accelerate, recipes/accelerate/ep2.yaml

and on a CPU with gloo (tiny dims, about ten seconds):

    torchrun --nproc_per_node 2 scripts/bench_ep.py --smoke --out /tmp/bench_ep_smoke

Started without a launcher (``python scripts/bench_ep.py ...``, ``moepatch bench ep ...``) it runs
torchrun itself with one rank per GPU (2 on a CPU machine).

The implementation lives in moepatch/parallel/bench.py so that the installed package can run it
(``python -m moepatch.parallel.run bench``); this file is the documented script entry point.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv=None) -> int:
    repo = str(Path(__file__).resolve().parents[1])
    if repo not in sys.path:
        sys.path.insert(0, repo)  # run from a checkout without installing
    from moepatch.parallel.bench import main as bench_main

    return bench_main(argv)


if __name__ == "__main__":
    # Through the command line, for its one-line errors: the same as `moepatch bench ep ARGS`.
    from moepatch.cli import main as cli_main

    sys.exit(cli_main(["bench", "ep", *sys.argv[1:]]))
