"""Corpus listing and the file-level split rule shared by the embedded-model recipe.

``prepare.py`` (tokenizer + token arrays), ``make_tasks.py`` (offline lm-eval
tasks) and ``tests/recipes/test_tasks.py`` must agree on which standard-library
files are train, validation or held-out eval files.  Keeping the rule in one
small dependency-free module is what guarantees that the eval files are never
trained on.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# Directory names that hold the stdlib's own test suites (``test/``,
# ``tests/``, ``idlelib/idle_test``, ``lib2to3/tests``, ``ctypes/test``,
# ``unittest/test`` ...).  They are excluded at any depth: test code is
# repetitive, partly machine-generated and some of it is not valid UTF-8.
EXCLUDED_DIR_NAMES = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})

# Percent buckets of the stable hash: [0, 94) train, [94, 97) validation,
# [97, 100) held-out eval.
TRAIN_PERCENT = 94
VALIDATION_PERCENT = 3
SPLITS = ("train", "validation", "eval")


def default_stdlib_dir() -> Path:
    """Return the directory of the running interpreter's standard library."""
    return Path(os.__file__).resolve().parent


def list_stdlib_files(stdlib_dir: Path) -> list[str]:
    """Return the relative POSIX paths of all corpus ``*.py`` files, sorted.

    Sorting by relative path makes the corpus order independent of the
    filesystem's directory enumeration order.
    """
    stdlib_dir = Path(stdlib_dir)
    rels = []
    for path in stdlib_dir.rglob("*.py"):
        rel = path.relative_to(stdlib_dir)
        if any(part in EXCLUDED_DIR_NAMES for part in rel.parts[:-1]):
            continue
        if not path.is_file():
            continue
        rels.append(rel.as_posix())
    return sorted(rels)


def split_of(rel_path: str) -> str:
    """Return ``"train"``, ``"validation"`` or ``"eval"`` for a relative path.

    The split depends only on the SHA-1 of the relative path, so it is stable
    across machines, Python versions and file contents, and adding or removing
    other files never moves a file between splits.
    """
    digest = hashlib.sha1(rel_path.encode("utf-8")).hexdigest()
    bucket = int(digest[:8], 16) % 100
    if bucket < TRAIN_PERCENT:
        return "train"
    if bucket < TRAIN_PERCENT + VALIDATION_PERCENT:
        return "validation"
    return "eval"


def split_files(rel_paths: list[str]) -> dict[str, list[str]]:
    """Partition sorted relative paths into the three splits (order kept)."""
    out: dict[str, list[str]] = {name: [] for name in SPLITS}
    for rel in rel_paths:
        out[split_of(rel)].append(rel)
    return out


def read_source(stdlib_dir: Path, rel_path: str) -> str:
    """Read one source file as text.

    Every non-test stdlib file is UTF-8 (PEP 3120); ``errors="replace"`` only
    guards against an unusual installation instead of aborting the recipe.
    Newlines are normalised so that a Windows checkout gives the same text.
    """
    data = (Path(stdlib_dir) / rel_path).read_bytes()
    return data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
