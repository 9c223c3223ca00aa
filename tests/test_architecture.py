"""The import graph of the package: no circle, and no module imports from a layer above its own (ARCHITECTURE.md).
Imports inside functions count too: a circle held apart by a function-level import is still a circle."""

import ast
from pathlib import Path

import cxrclip

ROOT = Path(cxrclip.__file__).parent
# lowest first; a module may import from its own layer and the layers before it
LAYERS = [
    ["cxrclip.exceptions", "cxrclip.io", "cxrclip.paths", "cxrclip.hardware"],
    ["cxrclip.config", "cxrclip.data"],
    ["cxrclip.spec"],
    ["cxrclip.scoring", "cxrclip.model"],
    ["cxrclip.loss", "cxrclip.engine"],
    ["cxrclip.predict"],
    ["cxrclip.eval"],
    # the top floor, checked too: records and writers → workflows → services → entry points
    ["cxrclip.migrate", "cxrclip.synthetic", "cxrclip.fit_gate", "cxrclip.bundle", "cxrclip.jobs", "cxrclip.pacs",
     "cxrclip.reviews", "cxrclip.change"],
    ["cxrclip.infer", "cxrclip.reviews.desk", "cxrclip.change.run"],
    ["cxrclip.pacs.worker", "cxrclip.serve"],
    ["cxrclip.demo", "cxrclip.cli"],
]  # fmt: skip


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(("cxrclip", *path.relative_to(ROOT).with_suffix("").parts))
        out[name.removesuffix(".__init__")] = path
    return out


def layer(name: str) -> int:
    if name == "cxrclip":  # the package's __init__: its version string only
        return 0
    prefixes = [(i, p) for i, group in enumerate(LAYERS) for p in group if name == p or name.startswith(p + ".")]
    assert prefixes, f"{name} is in no layer: add it to LAYERS and to docs/ARCHITECTURE.md"
    return max(prefixes, key=lambda ip: len(ip[1]))[0]


def import_graph() -> dict[str, set[str]]:
    mods = modules()

    def resolve(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                if t.startswith("cxrclip") and (r := resolve(t)) and r != name:
                    graph[name].add(r)
    return graph


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [f"{a} → {b}" for a, deps in import_graph().items() for b in deps if layer(b) > layer(a)]
    assert upward == []


def test_the_import_graph_has_no_circle():
    graph, index, low, stack, on_stack, circles = import_graph(), {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert circles == []


def test_the_layers_cover_every_module_and_the_architecture_doc_names_each_folder():
    doc = (ROOT.parent / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    for name in modules():
        layer(name)
    for folder in ("scoring/", "predict/", "model/", "eval/", "engine/", "data/", "serve/"):
        assert folder in doc, folder


def function_level_imports() -> list[str]:
    """Our own modules imported inside a function (each counted once, nested functions included)."""
    out = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        seen = set()
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                own = (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cxrclip")) or (
                    isinstance(node, ast.Import) and any(a.name.startswith("cxrclip") for a in node.names)
                )
                if own and id(node) not in seen:
                    seen.add(id(node))
                    out.append(f"{name}:{node.lineno}")
    return out


def test_function_level_imports_are_few_and_the_doc_counts_them():
    found = function_level_imports()
    assert len(found) <= 30, found
    doc = (ROOT.parent / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    assert f"({len(found)} of our own modules, counted by AST;" in doc


def test_the_services_never_load_the_synthetic_data_generator():
    import subprocess
    import sys

    code = (
        "import sys, cxrclip.cli, cxrclip.serve.app, cxrclip.pacs.worker, cxrclip.reviews.export, cxrclip.infer; "
        "print('cxrclip.synthetic' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_no_function_of_the_server_is_longer_than_50_lines():
    long = []
    for path in (ROOT / "serve").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 50:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
