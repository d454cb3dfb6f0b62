"""The house rules of ktenv/, checked on the source: imports point one way, no cycles,
probes stand alone, no module grows past the size a newcomer can read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PKG = REPO / "ktenv"
# Pipeline order, bottom first. A module may import from its own layer or a
# lower one, never a higher one: reading a lock never pulls in the env builder,
# and no stage imports the CLI.
LAYERS = [
    {"errors", "tools", "progress", "probe", "probes"},
    {"spec"},
    {"lock"},
    {"host"},
    {"target"},
    {"build"},
    {"serve"},
    {"check"},
    {"cli"},
]
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """The ktenv modules `name` imports (relative imports resolved; `from x import y` counts y if it is a module)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ktenv")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("ktenv"):
                found.add(mod)
                found |= {f"{mod}.{a.name}" for a in node.names}
    return found


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer; add its package to LAYERS in pipeline order")


MODULES = _modules()


def graph() -> dict[str, set[str]]:
    return {m: {i for i in _imports(m, p) if i in MODULES and i != m} for m, p in MODULES.items()}


def test_imports_point_down_the_pipeline():
    wrong = []
    for m, deps in graph().items():
        if m == "ktenv" or m.startswith("ktenv.probes"):
            continue
        for d in deps:
            if d != "ktenv" and _layer(d) > _layer(m):
                wrong.append(f"{m} imports {d}")
    assert not wrong, "imports against the pipeline order:\n  " + "\n  ".join(sorted(wrong))


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_probes_never_import_ktenv():
    """Probes run with the env's python, where ktenv is not importable."""
    bad = [m for m, p in MODULES.items() if m.startswith("ktenv.probes.") and _imports(m, p)]
    assert not bad, bad


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_readable(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it by concern (the guide: a few hundred at most)"


def test_the_checker_catches_an_upward_import(tmp_path, monkeypatch):
    """The direction test is not vacuous: a spec module importing the env builder is caught."""
    fake = tmp_path / "ktenv" / "spec" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from ..build import pipeline\n")
    assert "ktenv.build.pipeline" in _imports("ktenv.spec.bad", fake)
    assert _layer("ktenv.build.pipeline") > _layer("ktenv.spec.bad")
