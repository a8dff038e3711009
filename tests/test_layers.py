"""The import graph of pelthub runs one way: each layer imports only itself and the layers below.

Every import counts, at module level or inside a function (a lazy import is still a
dependency); only `if TYPE_CHECKING:` blocks, which never run, are left out.
"""
import ast
from pathlib import Path

import networkx as nx
ROOT = Path(__file__).resolve().parents[1] / "pelthub"
# Bottom to top; the README's "Architecture" section draws the same list.
LAYERS = [
    {"errors", "version", "sites", "tasks", "training", "generative"},
    {"modules", "tfew"},
    {"model", "recycle", "privacy"},
    {"registry"},
    {"composition"},
    {"routing"},
    {"transfer"},
    {"hub"},
    {"selfcheck", "tiny", "cli", "demo", "__init__", "__main__"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """The top-level part of pelthub a module belongs to ('__init__' for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def runtime_imports(path: Path) -> set[str]:
    """pelthub modules `path` imports outside TYPE_CHECKING blocks."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pelthub")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("pelthub"):
                names = [f"{target}.{a.name}" for a in node.names]
                found |= {n for n in names if (ROOT.parent / n.replace(".", "/")).with_suffix(".py").exists()
                          or (ROOT.parent / n.replace(".", "/")).is_dir()} or {target}
    return found - {here}


def graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for path in ROOT.rglob("*.py"):
        g.add_node(module_name(path))
        for target in runtime_imports(path):
            g.add_edge(module_name(path), target)
    return g


def test_every_part_of_the_package_has_a_layer():
    parts = {part_of(m) for m in graph().nodes}
    assert parts <= set(LEVEL), f"add {sorted(parts - set(LEVEL))} to LAYERS (and to the README's picture)"


def test_no_import_runs_upward():
    upward = [(a, b) for a, b in graph().edges if LEVEL[part_of(b)] > LEVEL[part_of(a)]]
    assert not upward, f"imports running up the layers: {upward}"


def test_no_import_circles():
    g = graph()
    # a package's __init__ re-exporting its own modules is not a circle back into it
    g.remove_edges_from([(a, b) for a, b in list(g.edges) if b.startswith(a + ".")])
    circles = list(nx.simple_cycles(g))
    assert not circles, f"import circles: {circles[:5]}"


def test_the_graph_sees_lazy_imports_and_circles(tmp_path):
    """The checker itself: a function-level import counts, a TYPE_CHECKING one does not."""
    source = tmp_path / "pelthub" / "registry" / "x.py"
    source.parent.mkdir(parents=True)
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..hub import push\n"
                      "def f():\n    from ..routing import arrow\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path / "pelthub"
    try:
        assert runtime_imports(source) == {"pelthub.routing"}  # no such module file here: the package
    finally:
        ROOT = saved
