"""The import graph of the product: one-way layers, no circles, no test support in the product.

Layers: kxl_common <- kxl_prep, kxl_train <- kxl_tools (kxl_prep and kxl_train import neither
each other nor anything above them); kxl_testing (test, bench and demo support) may import
the product, and nothing in the product imports it. Every import counts, at module level or
inside a function, read with ast from the files (nothing is imported to check)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PRODUCT = ("kxl_common", "kxl_prep", "kxl_train", "kxl_tools")
PACKAGES = (*PRODUCT, "kxl_testing")
ALLOWED = {
    "kxl_common": {"kxl_common"},
    "kxl_prep": {"kxl_common", "kxl_prep"},
    "kxl_train": {"kxl_common", "kxl_train"},
    "kxl_tools": {"kxl_common", "kxl_prep", "kxl_train", "kxl_tools"},
    "kxl_testing": set(PACKAGES),
}


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """{dotted module name: file} of every .py file of the packages under root."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `name` (the module in `path`) imports anywhere in its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            # `from a import b` imports the module a.b when there is one, else a name of a
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` names a.b.c; a name inside a module resolves to that module
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    modules = module_files(root, packages)
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} imports {b}" for a, targets in graph.items() for b in targets
                  if b.split(".")[0] not in ALLOWED[a.split(".")[0]])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, groups = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(groups)


@pytest.fixture(scope="module")
def graph():
    return import_graph(REPO)


def test_the_graph_is_read(graph):
    """Not vacuous: the reader sees the packages and the imports that are known to exist."""
    assert {"kxl_prep.pipeline", "kxl_train.entry", "kxl_tools.cli", "kxl_common.atomic"} <= set(graph)
    assert {"kxl_prep.select", "kxl_prep.outputs"} <= graph["kxl_prep.pipeline"]  # module-level imports
    assert "kxl_prep.sources" in graph["kxl_prep.pipeline"]  # an import inside a function
    assert "kxl_prep.tags.rules" in graph["kxl_prep.tags.select"]


def test_layers_are_one_way(graph):
    assert layer_violations(graph) == []


def test_no_import_circle(graph):
    assert cycles(graph) == []


def test_the_product_does_not_import_test_support(graph):
    assert [f"{a} imports {b}" for a, targets in graph.items() for b in targets
            if a.split(".")[0] in PRODUCT and b.split(".")[0] == "kxl_testing"] == []


def test_the_checks_catch_a_circle_and_a_layer_crossing(tmp_path):
    files = {
        "kxl_common/__init__.py": "",
        "kxl_common/low.py": "def f():\n    from kxl_train import high  # a lazy import counts too\n",
        "kxl_train/__init__.py": "",
        "kxl_train/high.py": "from . import other\nfrom kxl_common.low import f\n",
        "kxl_train/other.py": "import kxl_train.high\n",
        "kxl_prep/__init__.py": "",
        "kxl_prep/a.py": "from kxl_testing.fake import thing\n",
        "kxl_tools/__init__.py": "",
        "kxl_testing/__init__.py": "",
        "kxl_testing/fake.py": "from kxl_prep import a\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    g = import_graph(tmp_path)
    assert g["kxl_train.high"] == {"kxl_train.other", "kxl_common.low"}
    assert layer_violations(g) == ["kxl_common.low imports kxl_train.high", "kxl_prep.a imports kxl_testing.fake"]
    assert cycles(g) == [["kxl_common.low", "kxl_train.high", "kxl_train.other"], ["kxl_prep.a", "kxl_testing.fake"]]
