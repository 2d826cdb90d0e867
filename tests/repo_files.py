"""scripts/ and recipes/ are not packages: the tests load their modules straight from the file."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_module(relpath: str, name: str | None = None):
    """The module at ``REPO / relpath``, executed under ``name`` (default: the file's stem)."""
    path = REPO / relpath
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
