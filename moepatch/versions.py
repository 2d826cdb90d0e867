"""The transformers releases moepatch's suite last passed on, for error messages.

``make test`` runs the suite on both (constraints.txt and constraints-tf517.txt pin them), and
pyproject.toml's transformers range spans exactly these two; tests/test_versions.py keeps the
three in agreement.
"""

from __future__ import annotations

TESTED_TRANSFORMERS = ("5.17.0", "5.25.0")  # oldest, newest


def installed_transformers() -> str:
    import transformers

    return str(transformers.__version__)


def tested_range() -> str:
    """One phrase for error messages: what is installed and what was tested."""
    oldest, newest = TESTED_TRANSFORMERS
    return (f"transformers {installed_transformers()} is installed; moepatch is tested with {oldest} to {newest} "
            f"(newest tested: {newest})")
