"""The shape of the code: stages depend only downwards (no import cycle, function-level imports included), the
reader never reaches the shard writer, and no function grows past one screen."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "mame_fast"

# The layers, bottom up: a package may import its own modules and those of the layers below it, never above (function-
# level imports count). Records sit below training: the trainer writes records; records get what they need of a model
# from a lower module (tensors, input.mixing) or from what the trainer recorded, never by importing train.
LAYERS = [
    ("base", ("mame_fast", "mame_fast.config", "mame_fast.errors", "mame_fast.files", "mame_fast.tensors",
              "mame_fast.configs")),
    ("data", ("mame_fast.data",)),
    ("input", ("mame_fast.input",)),
    ("records", ("mame_fast.records",)),
    ("train", ("mame_fast.train",)),
    ("commands", ("mame_fast.cli", "mame_fast.__main__", "mame_fast.demo", "mame_fast.launch", "mame_fast.slurm")),
]


def layer(module: str) -> int:
    """The index in LAYERS of the most specific prefix that holds ``module``."""
    best = max(((len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
                if module == p or module.startswith(p + ".")), default=None)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[1]


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
        out[".".join(parts)] = p
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The mame_fast modules ``name`` imports, at any depth of its code (function-level imports count)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mame_fast")}
        elif isinstance(node, ast.ImportFrom):
            parent = ".".join(base[: len(base) - node.level + 1]) if node.level else ""
            mod = ".".join(x for x in (parent, node.module or "") if x) if node.level else node.module or ""
            if not mod.startswith("mame_fast"):
                continue
            for a in node.names:  # `from . import x` imports the module x when there is one
                found.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
    return found & known


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) - {m} for m, p in mods.items()}


def test_no_import_cycle(graph):
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_packages_import_only_downwards(graph):
    """No upward import at package level: data < input < records < train < the commands."""
    upward = [f"{m} ({LAYERS[layer(m)][0]}) -> {n} ({LAYERS[layer(n)][0]})"
              for m, ns in graph.items() for n in ns if layer(n) > layer(m)]
    assert not upward, upward


def test_every_module_has_a_layer_and_the_architecture_doc_lists_it(graph):
    doc = (PKG.parent / "docs" / "architecture.md").read_text()
    missing = [m for m in graph if m.count(".") >= 1 and m.rsplit(".", 1)[1] not in doc and m != "mame_fast.__main__"]
    assert not missing, f"docs/architecture.md does not name: {missing}"
    for m in graph:
        layer(m)


def test_reader_never_reaches_the_shard_writer(graph):
    seen, todo = set(), ["mame_fast.input.reader"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph[m]
    assert "mame_fast.data.shard" not in seen
    assert "mame_fast.train.loop" not in graph["mame_fast.train.testset"] | graph["mame_fast.train.evaluate"]


def test_no_function_longer_than_a_screen():
    long = []
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{p.relative_to(PKG)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_no_module_reaches_into_anothers_private_names():
    """``from x import _private`` across modules, and ``obj._private`` of another module's objects in benchmarks."""
    bad = []
    for p in list(PKG.rglob("*.py")) + list((PKG.parent / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and "mame_fast" in (node.module or "") or \
                    isinstance(node, ast.ImportFrom) and node.level:
                bad += [f"{p.name}: imports {a.name}" for a in node.names if a.name.startswith("_") and a.name != "__version__"]
        if p.parent.name == "benchmarks":
            src = p.read_text()
            bad += [f"{p.name}: {tok}" for tok in ("._build(", "._cpu_tail(", "._pool", ".feed.start(") if tok in src]
    assert not bad, bad
