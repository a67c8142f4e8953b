"""The house plan, checked mechanically: no import cycle among the package's modules (imports inside
functions count), no oracle imported by the runtime, the layers' rules (the model knows no method,
quantization knows no LoRA, training knows methods only through the `minicustom.methods` package), and the
size budgets (a file <= 600 lines, a function <= 80 lines: the longest, config.from_dict's straight-line
validation, is 76)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORACLES = {"transformers", "peft", "trl", "bitsandbytes", "accelerate", "llama_cpp", "openai"}


def modules(root: Path, package: str) -> dict[str, Path]:
    """Module name -> file, for every .py under root, the package named `package`."""
    found = {}
    for f in sorted(root.rglob("*.py")):
        parts = [package, *f.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = f
    return found


def imports(name: str, file: Path, known: dict) -> set[str]:
    """The package modules `file` imports anywhere in it: `from X import y` counts as X.y when that is a
    module (a submodule import), and as X otherwise."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = {**modules(ROOT / "minicustom", "minicustom"), **modules(ROOT / "kernels", "minicustom.kernels")}
    return {name: imports(name, file, known) for name, file in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), or a module importing itself."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges[v]:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_lazy_cycle(tmp_path):
    """The check itself can fail: a cycle hidden by an import inside a function is found."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from . import a\n    return a\n")
    (pkg / "c.py").write_text("from pkg import a\n")
    known = modules(pkg, "pkg")
    edges = {n: imports(n, f, known) for n, f in known.items()}
    assert edges["pkg.b"] == {"pkg.a"} and edges["pkg.c"] == {"pkg.a"}
    assert cycles(edges) == [["pkg.a", "pkg.b"]]


def test_no_import_cycle():
    edges = graph()
    assert len(edges) > 40 and "minicustom.methods.registry" in edges
    assert cycles(edges) == []


def test_no_oracle_is_imported_anywhere_in_the_runtime():
    for root in (ROOT / "minicustom", ROOT / "kernels"):
        for f in root.rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                bad = [n for n in names if n.split(".")[0] in ORACLES]
                assert not bad, f"{f.relative_to(ROOT)}:{node.lineno} imports {bad}"


@pytest.mark.parametrize("layer, may_not_import", [
    ("minicustom.model", ("minicustom.methods", "minicustom.quant", "minicustom.train")),
    ("minicustom.config", ("minicustom.methods", "minicustom.quant", "minicustom.train")),
    ("minicustom.quant", ("minicustom.methods", "minicustom.train")),
    ("minicustom.methods", ("minicustom.train", "minicustom.cli", "minicustom.compare")),
    ("minicustom.files", ("minicustom.",)),
])
def test_layers(layer, may_not_import):
    edges = graph()
    for name, targets in edges.items():
        if name == layer or name.startswith(layer + "."):
            bad = sorted(t for t in targets if t.startswith(may_not_import) and not t.startswith(layer))
            assert not bad, f"{name} imports {bad}"


def test_training_knows_methods_only_through_the_package():
    """minicustom.train imports the methods package (the registry and the shared API), never a method file."""
    for name, targets in graph().items():
        if name.startswith("minicustom.train"):
            assert not [t for t in targets if t.startswith("minicustom.methods.")], name


def test_size_budgets():
    long_files, long_functions = [], []
    for root in (ROOT / "minicustom", ROOT / "kernels"):
        for f in root.rglob("*.py"):
            text = f.read_text()
            rel = f.relative_to(ROOT).as_posix()
            if len(text.splitlines()) > 600:
                long_files.append(rel)
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > 80:
                        long_functions.append(f"{rel}:{node.name} ({lines} lines)")
    assert long_files == [] and long_functions == []


def test_every_import_inside_the_package_resolves():
    """An import inside a function runs only when called: one left naming a module that moved would pass
    every other test until then. Each `from .x import y` must name a module and a name that exist."""
    import importlib

    known = {**modules(ROOT / "minicustom", "minicustom"), **modules(ROOT / "kernels", "minicustom.kernels")}
    broken = []
    for name, file in known.items():
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(file.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([node.module] if node.module else []))
            if base not in known:
                broken.append(f"{file.relative_to(ROOT)}:{node.lineno}: no module {base}")
                continue
            module = importlib.import_module(base)
            broken += [f"{file.relative_to(ROOT)}:{node.lineno}: {base} has no {a.name}" for a in node.names
                       if not hasattr(module, a.name) and f"{base}.{a.name}" not in known]
    assert broken == []
