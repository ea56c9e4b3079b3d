"""The package's shape, checked from its source: data flows one way, no circles, short units.

- core knows nothing above it; decoding, training, evaluation and serving take core's objects;
  the CLI sits on top. No import circle anywhere (imports inside functions count too).
- No module imports another's private names.
- The base's modules and config are swapped only in `core/exits.py` (the coupling module), and
  there only on twins, never on the base.
- No function is longer than MAX_LINES without its reason in LONG_UNITS.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "balcony"
MAX_LINES = 80
# functions allowed past MAX_LINES, with the reason
LONG_UNITS = {
    "cli.build_parser": "declarative: one add_argument per option; nothing in it branches",
}
LAYERS = {"core": 0, "decoding": 1, "training": 1, "evaluation": 2, "serving": 2, "export": 1, "cli": 3}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text())
    return out


def _imports(name: str, tree: ast.Module, is_package: bool) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every balcony import, absolute or relative."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.startswith("balcony"):
                target = node.module.removeprefix("balcony").lstrip(".")
            else:
                continue
            found.append((target, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name.removeprefix("balcony").lstrip("."), []) for a in node.names if a.name.startswith("balcony.")]
    return found


def _graph():
    modules = _modules()
    packages = {n for n in modules if (SRC / n.replace(".", "/") / "__init__.py").is_file() or n == ""}
    graph: dict[str, set[str]] = {}
    private: list[str] = []
    for name, tree in modules.items():
        edges = set()
        for target, names in _imports(name, tree, name in packages):
            for imported in names or [None]:
                full = f"{target}.{imported}".strip(".") if imported else target
                module = full if full in modules else target
                if module != name and module in modules:
                    edges.add(module)
                if imported and imported.startswith("_") and not imported.startswith("__") and module != name:
                    private.append(f"{name} imports {imported} from {module}")
        graph[name] = edges
    return modules, graph, private


def test_no_import_circle_and_core_knows_nothing_above_it():
    modules, graph, _ = _graph()

    def layer(module: str) -> int | None:
        return LAYERS.get(module.split(".")[0]) if module else None

    for name, edges in graph.items():
        for target in edges:
            if layer(name) is not None and layer(target) is not None:
                assert layer(target) <= layer(name), f"{name} (layer {layer(name)}) reaches up into {target}"
    # a depth-first search for cycles; the package root only re-exports, so it is left out
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node] - {""}:
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in graph:
        if start and start not in state:
            visit(start, [start])


def test_no_module_imports_another_modules_private_names():
    _, _, private = _graph()
    assert not private, private


def test_the_base_is_swapped_in_place_nowhere():
    for path in SRC.rglob("*.py"):
        if path.name == "exits.py":
            continue
        text = path.read_text()
        assert "setattr(" not in text, f"{path}: setattr on a module belongs in core/exits.py"
        assert "base.config =" not in text and "decoder.config =" not in text, path


def test_no_function_is_long_without_a_reason():
    too_long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES and f"{name}.{node.name}" not in LONG_UNITS:
                    too_long.append(f"{name}.{node.name}: {lines} lines")
    assert not too_long, too_long
