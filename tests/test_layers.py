"""The package's layers import downward only, with no cycles (docs/design.md): parsed, not imported.

Every import counts, function-level ones included (ast.walk over each file).  Layers, bottom up:
base (errors, versions, arguments), routing, ops, patch, parallel, scmoe, eval, then the
command line, tiny (models for tests and the demo) and the package root.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "moepatch"
LAYERS = {"errors": 0, "versions": 0, "arguments": 0, "routing": 1, "ops": 2, "patch": 3,
          "parallel": 4, "scmoe": 5, "eval": 6}
TOP = 7  # moepatch (the root), moepatch.cli and any other top-level module not listed above
NAMES = {0: "base", 1: "routing", 2: "ops", 3: "patch", 4: "parallel", 5: "scmoe", 6: "eval", 7: "command line"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("moepatch", *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def layer(module: str) -> int:
    parts = module.split(".")
    return TOP if len(parts) == 1 else LAYERS.get(parts[1], TOP)


def _package(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def imports(module: str) -> list[tuple[str, int]]:
    """(imported moepatch module, line) for every import in ``module``'s file."""
    tree = ast.parse(MODULES[module].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "moepatch"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package(module).split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "moepatch":
                continue
            for a in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{a.name}"
                out.append((sub if sub in MODULES else target, node.lineno))
    return [(m, line) for m, line in out if m in MODULES]


GRAPH = {m: imports(m) for m in MODULES}


def test_the_layers_are_known():
    assert {"moepatch.routing", "moepatch.ops", "moepatch.patch", "moepatch.parallel", "moepatch.scmoe",
            "moepatch.eval"} <= set(MODULES)
    assert layer("moepatch.patch.core") == 3 and layer("moepatch.cli") == TOP and layer("moepatch") == TOP


def test_imports_go_downward_only():
    upward = [f"{MODULES[m].relative_to(ROOT.parent)}:{line} ({NAMES[layer(m)]}) imports {target} "
              f"({NAMES[layer(target)]})"
              for m, edges in GRAPH.items() for target, line in edges if layer(target) > layer(m)]
    assert not upward, "\n".join(upward)


def test_no_module_imports_the_package_root():
    offenders = [f"{MODULES[m].relative_to(ROOT.parent)}:{line}" for m, edges in GRAPH.items() if m != "moepatch"
                 for target, line in edges if target == "moepatch"]
    assert not offenders, "import the defining submodule instead of moepatch: " + ", ".join(offenders)


def test_no_import_cycles():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or any(t == v for t, _ in GRAPH[v]):
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def _imports_distributed(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names):
            lines.append(node.lineno)
    return lines


def test_only_the_parallel_layer_imports_torch_distributed():
    offenders = [f"{MODULES[m].relative_to(ROOT.parent)}:{line}" for m in MODULES if layer(m) != LAYERS["parallel"]
                 for line in _imports_distributed(MODULES[m])]
    assert not offenders, "torch.distributed outside moepatch/parallel: " + ", ".join(offenders)


def _reads_environment(node) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and n.attr in ("environ", "getenv") and isinstance(n.value, ast.Name) \
                and n.value.id == "os":
            return True
    return False


@pytest.mark.parametrize("module", sorted(MODULES))
def test_nothing_is_read_from_the_environment_at_import_time(module):
    """Module-level statements (class bodies included) never read os.environ: settings are arguments."""
    tree = ast.parse(MODULES[module].read_text())

    def top_level(body):
        for stmt in body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                # Decorators and default values run at import time.
                yield from stmt.decorator_list
                yield from stmt.args.defaults + [d for d in stmt.args.kw_defaults if d is not None]
            elif isinstance(stmt, ast.ClassDef):
                yield from stmt.decorator_list
                yield from top_level(stmt.body)
            else:
                yield stmt

    offenders = [getattr(n, "lineno", "?") for n in top_level(tree.body) if _reads_environment(n)]
    where = MODULES[module].relative_to(ROOT.parent)
    assert not offenders, f"{where} reads os.environ at import time, line(s) {offenders}"
