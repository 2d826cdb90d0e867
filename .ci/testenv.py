"""Test environments for `make install`, `make test` and `make test-latest`, from the running interpreter.

    python .ci/testenv.py pins constraints.txt OUT
        OUT: constraints.txt without the pins of an already installed torch and what it requires
        (an existing torch is kept with its own triton, CUDA libraries and sympy).
    python .ci/testenv.py side DIR [-c CONSTRAINTS] [--eager] REQ...
        Installs into DIR what REQ needs beyond this interpreter's packages (torch always kept), so
        that `PYTHONPATH=DIR python` runs another resolution: transformers 5.17 for `make test-tf517`,
        the newest releases for `make test-latest`.  Works in a venv, a conda env or the system
        interpreter alike, since it needs nothing but this interpreter's pip.
    python .ci/testenv.py latest-requirements
        The names of moepatch's declared dependencies (dev extra included), without versions.

Nothing here is imported by the package.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _torch_stack() -> set[str]:
    """Normalised names of the installed torch and what it requires (empty without a torch)."""
    try:
        reqs = md.requires("torch") or []
    except md.PackageNotFoundError:
        return set()
    names = {"torch"}
    for r in reqs:
        if "extra ==" not in r:
            names.add(_norm(re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0]))
    return names


def pins(src: Path, out: Path) -> None:
    drop = _torch_stack()
    lines = []
    for line in src.read_text().splitlines():
        name = line.split("==", 1)[0].strip()
        if line.strip() and not line.startswith("#") and _norm(name) in drop:
            continue
        lines.append(line)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def side(target: Path, constraints: Path | None, eager: bool, reqs: list[str]) -> None:
    key = json.dumps([sys.executable, sys.version, reqs, eager,
                      constraints.read_text() if constraints else None, sorted(_torch_stack())])
    stamp = target / ".moepatch-stamp"
    digest = hashlib.sha256(key.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        print(f"{target}: up to date")
        return
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        keep = Path(tmp) / "keep-torch.txt"
        try:
            keep.write_text(f"torch=={md.version('torch')}\n")
        except md.PackageNotFoundError:
            keep.write_text("")
        args = ["install", "--dry-run", "--quiet", "--report", str(report), "-c", str(keep)]
        if constraints:
            args += ["-c", str(constraints)]
        if eager:
            args += ["--upgrade", "--upgrade-strategy", "eager"]
        _pip(*args, *reqs)
        wanted = [f"{i['metadata']['name']}=={i['metadata']['version']}"
                  for i in json.loads(report.read_text())["install"]]
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        if wanted:
            _pip("install", "--quiet", "--no-deps", "--target", str(target), *wanted)
    stamp.write_text(digest)
    print(f"{target}: {' '.join(wanted) or 'nothing beyond this interpreter'}")


def latest_requirements() -> None:
    from packaging.requirements import Requirement  # a dependency of transformers and of pip

    names = []
    for text in md.requires("moepatch") or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": "dev"}):
            if _norm(req.name) != "torch":
                names.append(req.name)
    print(" ".join(dict.fromkeys(names)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog=".ci/testenv.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pins")
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    s = sub.add_parser("side")
    s.add_argument("target", type=Path)
    s.add_argument("-c", "--constraints", type=Path)
    s.add_argument("--eager", action="store_true", help="the newest release of every requirement and dependency")
    s.add_argument("reqs", nargs="+")
    sub.add_parser("latest-requirements")
    a = ap.parse_args(argv)
    if a.cmd == "pins":
        pins(a.src, a.out)
    elif a.cmd == "side":
        side(a.target, a.constraints, a.eager, a.reqs)
    else:
        latest_requirements()


if __name__ == "__main__":
    main()
