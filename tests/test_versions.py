"""The tested versions, the constraints files and the declared ranges agree, and the pins tool keeps
an installed torch (docs/usage.md, 'Tested versions')."""

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from moepatch.versions import TESTED_TRANSFORMERS

ROOT = Path(__file__).resolve().parents[1]


def _pins(path):
    out = {}
    for line in (ROOT / path).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            out[name.lower().replace("_", "-")] = version
    return out


def _declared():
    return {Requirement(r).name.lower(): Requirement(r) for r in md.requires("moepatch")}


def test_the_constraints_pin_the_tested_transformers_releases():
    assert _pins("constraints-tf517.txt")["transformers"] == TESTED_TRANSFORMERS[0]
    assert _pins("constraints.txt")["transformers"] == TESTED_TRANSFORMERS[-1]


def test_every_declared_dependency_is_pinned_inside_its_declared_range():
    pins = _pins("constraints.txt")
    for name, req in _declared().items():
        assert name in pins, f"{name} is declared but constraints.txt does not pin it"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside the declared {req.specifier}"


def test_the_transformers_range_spans_exactly_the_tested_releases():
    spec = _declared()["transformers"].specifier
    oldest, newest = (Version(v) for v in TESTED_TRANSFORMERS)
    assert spec.contains(str(oldest)) and spec.contains(str(newest))
    below = f"{oldest.major}.{oldest.minor - 1}.99"
    above = f"{newest.major}.{newest.minor + 1}.0"
    assert not spec.contains(below) and not spec.contains(above), spec


def test_pins_keep_an_installed_torch_and_what_it_requires(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("# header\ntorch==0.0.1\nfilelock==0.0.1\nnot-a-torch-dependency==1.0\n")
    out = tmp_path / "out.txt"
    subprocess.run([sys.executable, str(ROOT / ".ci" / "testenv.py"), "pins", str(src), str(out)], check=True)
    kept = out.read_text().splitlines()
    assert "# header" in kept and "not-a-torch-dependency==1.0" in kept
    assert not any(line.startswith(("torch==", "filelock==")) for line in kept)  # torch requires filelock


def test_the_docs_name_the_pinned_versions_and_link_nothing_outside_the_repository():
    usage = (ROOT / "docs" / "usage.md").read_text()
    pins = _pins("constraints.txt")
    for name in ("transformers", "lm-eval", "accelerate", "datasets", "safetensors", "numpy", "matplotlib",
                 "triton"):
        assert pins[name] in usage, f"docs/usage.md does not name the pinned {name} {pins[name]}"
    assert TESTED_TRANSFORMERS[0] in usage and _pins("constraints-tf517.txt")["huggingface-hub"] in usage
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        text = page.read_text()
        assert "../shared" not in text and "shared/spec" not in text and "device-notes" not in text, page.name
    index = (ROOT / "docs" / "README.md").read_text()
    assert [p.name for p in pages[1:] if p.name != "README.md" and f"({p.name})" not in index] == []
