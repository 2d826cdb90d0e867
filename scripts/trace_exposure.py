"""Re-read profiled expert-parallel calls: each call's exposed NCCL time on the critical rank.

    python3 scripts/trace_exposure.py PREFIX [--a2a-ms 0.646]

PREFIX names one profile_calls trace per rank (``PREFIX.rank0.json``, ``PREFIX.rank1.json``, ...;
bench_scmoe and bench_ep write them under ``--profile-dir``).  Prints, for both readings of
:func:`traces.exposed_communication` (``any``: no compute kernel on any stream of the GPU, the
default; ``stream``: none on the busiest stream, the older reading), the critical (most compute)
rank's exposure per call, its mean and median, and with ``--a2a-ms`` the fraction hidden,
1 - exposure / all-to-all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prefix")
    p.add_argument("--a2a-ms", type=float, default=None, help="the all-to-all time alone (bench_scmoe's a2a_ms)")
    args = p.parse_args(argv)
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))  # scripts/ is not a package
    from traces import call_exposures, exposed_communication

    paths = sorted(Path(args.prefix).parent.glob(Path(args.prefix).name + ".rank*.json"))
    if not paths:
        p.error(f"no trace {args.prefix}.rank*.json")
    for mode in ("any", "stream"):
        c = call_exposures([exposed_communication(path, compute=mode)["per_call"] for path in paths])
        line = (f"{mode:>6}: critical exposure per call (ms) {' '.join(f'{v:.3f}' for v in c['critical_exposed'])}; "
                f"mean {c['critical_exposed_mean']:.3f}, median {c['critical_exposed_median']:.3f}")
        if args.a2a_ms:
            line += (f"; hidden {100 * max(0.0, 1 - c['critical_exposed_mean'] / args.a2a_ms):.1f}% "
                     f"(median call {100 * max(0.0, 1 - c['critical_exposed_median'] / args.a2a_ms):.1f}%)")
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
