"""The package's shape, checked from its source (AST, never text): data flows one way, no circles,
short units.

- Every module has a layer: core (and `version`, `default`) knows nothing above it; decoding and
  training take core's objects; evaluation and serving sit above them; the package root re-exports;
  the CLI sits on top. No import circle anywhere, through the root too (imports inside functions
  count).
- No module imports another's private names.
- The base's modules and config are swapped only in `core/exits.py` (the coupling module):
  `setattr` calls and assignments to a `.config` attribute live there alone.
- No module is over MAX_MODULE lines, no class over MAX_CLASS, no function over MAX_FUNCTION,
  unless LONG_UNITS gives the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "balcony"
MAX_MODULE, MAX_CLASS, MAX_FUNCTION = 500, 300, 60
# units allowed past their bound, with the reason
LONG_UNITS: dict[str, str] = {}
# the first part of a module's dotted name -> its layer; a module may import only its own layer or below
LAYERS = {"version": 0, "default": 0, "core": 0, "decoding": 1, "training": 1, "export": 1,
          "evaluation": 2, "serving": 2, "": 3, "__main__": 4, "cli": 4}
COUPLING = "core.exits"  # the one module that swaps attributes of transformers objects


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = (path, ast.parse(path.read_text()))
    return out


def _layer(module: str) -> int:
    top = module.split(".")[0]
    assert top in LAYERS, f"module {module!r} has no layer: add its package to LAYERS in tests/test_layout.py"
    return LAYERS[top]


def _imports(name: str, tree: ast.Module, is_package: bool) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every balcony import, absolute or relative."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    if name == "":
        package = []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and (node.module == "balcony" or node.module.startswith("balcony.")):
                target = node.module.removeprefix("balcony").lstrip(".")
            else:
                continue
            found.append((target, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name.removeprefix("balcony").lstrip("."), []) for a in node.names
                      if a.name == "balcony" or a.name.startswith("balcony.")]
    return found


def _graph():
    modules = _modules()
    packages = {n for n, (path, _) in modules.items() if path.name == "__init__.py"}
    graph: dict[str, set[str]] = {}
    private: list[str] = []
    for name, (_, tree) in modules.items():
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


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the path round it, or None."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_every_module_imports_only_its_layer_or_below():
    _, graph, _ = _graph()
    for name, edges in graph.items():
        for target in edges:
            assert _layer(target) <= _layer(name), f"{name or 'balcony'} (layer {_layer(name)}) reaches up into {target}"


def test_no_import_circle_anywhere_the_root_included():
    _, graph, _ = _graph()
    circle = _circle(graph)
    assert circle is None, "import circle: " + " -> ".join(m or "balcony" for m in circle)


def test_the_circle_search_finds_a_circle_through_the_root():
    graph = {"": {"core.model"}, "core.model": {""}, "core.policy": set()}
    assert _circle(graph) == ["", "core.model", ""]


def test_no_module_imports_another_modules_private_names():
    _, _, private = _graph()
    assert not private, private


def _swaps(tree: ast.Module) -> list[str]:
    """`setattr(...)` calls and assignments to another object's `.config`, with their line numbers."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            found.append(f"line {node.lineno}: setattr")
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            owner = target.value if isinstance(target, ast.Attribute) else None
            if target.__class__ is ast.Attribute and target.attr == "config" and not (
                    isinstance(owner, ast.Name) and owner.id == "self"):  # an object's own config is its business
                found.append(f"line {node.lineno}: .config =")
    return sorted(found, key=lambda entry: int(entry.split()[1].rstrip(":")))


def test_the_base_is_swapped_in_place_nowhere():
    for name, (path, tree) in _modules().items():
        if name != COUPLING:
            assert not _swaps(tree), f"{path}: {_swaps(tree)}: swapping modules or configs belongs in core/exits.py"


def test_the_swap_check_reads_code_not_text():
    assert _swaps(ast.parse("setattr(module, 'layers', layers)\nmodel.config = config\n")) == [
        "line 1: setattr", "line 2: .config ="]
    assert _swaps(ast.parse("text = 'setattr(x)'  # model.config = c\nself.config = options\n")) == []


def _too_long(modules) -> list[str]:
    found = []
    for name, (path, tree) in modules.items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE and name not in LONG_UNITS:
            found.append(f"module {name}: {lines} lines (at most {MAX_MODULE})")
        for node in ast.walk(tree):
            bound = MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION if isinstance(
                node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
            if bound is None:
                continue
            length = node.end_lineno - node.lineno + 1
            if length > bound and f"{name}.{node.name}" not in LONG_UNITS:
                found.append(f"{type(node).__name__} {name}.{node.name}: {length} lines (at most {bound})")
    return found


def test_no_unit_is_long_without_a_reason():
    too_long = _too_long(_modules())
    assert not too_long, too_long


def test_every_listed_exception_is_still_needed():
    """A reason for a unit that is short again (or gone) is stale: drop it from LONG_UNITS."""
    modules = _modules()
    saved = dict(LONG_UNITS)
    try:
        LONG_UNITS.clear()
        long_now = {entry.split(":")[0].split()[-1] for entry in _too_long(modules)}
    finally:
        LONG_UNITS.update(saved)
    stale = sorted(set(saved) - long_now)
    assert not stale, f"no longer long (drop from LONG_UNITS): {stale}"


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_every_layer_names_a_module_that_exists(name):
    assert any(m == name or m.startswith(f"{name}.") for m in _modules()), name
