"""The package's layering, read from the source: floors, no import circles, no function-local first-party
imports (the usual way to dodge a circle), and ``loopalign`` never imports ``data_builders``.

Floors (a module imports from its own floor or lower ones only; see README "Layout"):
  0 primitives: models, loops, hooks, lora, speed, io, log, errors, tokenizer, loading, gguf, probes, data, injection, compat
  1 measurement and objectives: eval, objectives, rewards
  2 the model organism: organism
  3 trainers
  4 entry points: scripts, cli, __main__
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FLOORS = {
    "models": 0,
    "loops": 0,
    "hooks": 0,
    "lora": 0,
    "speed": 0,
    "io": 0,
    "log": 0,
    "errors": 0,
    "tokenizer": 0,
    "loading": 0,
    "gguf": 0,
    "probes": 0,
    "data": 0,
    "injection": 0,
    "compat": 0,
    "batching": 0,
    "prefix_cache": 0,
    "eval": 1,
    "objectives": 1,
    "rewards": 1,
    "organism": 2,
    "trainers": 3,
    "scripts": 4,
    "cli": 4,
    "__main__": 4,
}


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = {**_modules("loopalign"), **_modules("data_builders")}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def _imports(module: str, path: Path) -> list[tuple[str, bool, int]]:
    """First-party modules ``module`` imports -> [(target module, inside a function, line)]."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    local = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local.update(id(n) for n in ast.walk(node))
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path, node)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in MODULES and name != module:
                out.append((name, id(node) in local, node.lineno))
    return out


IMPORTS = {module: _imports(module, path) for module, path in MODULES.items()}


def _floor(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "loopalign" or len(parts) == 1:
        return None
    return FLOORS.get(parts[1])


def test_every_loopalign_module_has_a_floor():
    missing = sorted({m.split(".")[1] for m in MODULES if m.startswith("loopalign.") and _floor(m) is None})
    assert not missing, f"add these loopalign modules to FLOORS (and README's Layout): {missing}"


def test_no_upward_imports():
    upward = [
        f"{m}:{line} (floor {_floor(m)}) imports {t} (floor {_floor(t)})"
        for m, targets in IMPORTS.items()
        for t, _, line in targets
        if _floor(m) is not None and _floor(t) is not None and _floor(t) > _floor(m)
    ]
    assert not upward, "\n".join(upward)


def test_no_module_names_another_as_a_module_function_string():
    """A ``"loopalign.x:function"`` string is an import in disguise (resolved with importlib, unseen by the floor
    checks): named models register themselves instead (loopalign.loading.register_named_model)."""
    pattern = re.compile(r"^loopalign(\.\w+)+:\w+$")
    found = [
        f"{m}:{node.lineno} names {node.value!r}"
        for m, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and pattern.match(node.value)
    ]
    assert not found, "\n".join(found)


def test_loopalign_does_not_import_data_builders():
    bad = [
        f"{m}:{line} imports {t}"
        for m, targets in IMPORTS.items()
        if m.startswith("loopalign")
        for t, _, line in targets
        if t.startswith("data_builders")
    ]
    assert not bad, "\n".join(bad)


def test_no_function_local_first_party_imports():
    local = [f"{m}:{line} imports {t} inside a function" for m, ts in IMPORTS.items() for t, inner, line in ts if inner]
    assert not local, "\n".join(local)


def test_no_import_circles():
    graph = {m: sorted({t for t, _, _ in ts}) for m, ts in IMPORTS.items()}
    # a package importing its own submodules (``from .x import y`` in __init__) is not a circle by itself;
    # a submodule importing its package's __init__ while that __init__ imports it back is
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                circles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def test_test_modules_have_unique_names():
    """The test folders are not packages: pytest imports test modules by their basename, so two ``test_x.py`` in
    different folders collide when one run collects both."""
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_readme_layout_names_every_floored_module_at_its_floor():
    """README's Layout block lists each top-level room of FLOORS under the floor this test enforces: a line
    ``floor N`` opens floor N, indented lines continue it, any other line closes it."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Layout") :].split("```")[1]
    floor, placed = None, {}
    for line in block.splitlines():
        head = re.match(r"floor (\d)\s", line)
        if head:
            floor = int(head.group(1))
        elif not line.startswith(" "):
            floor = None
        if floor is not None:
            for name in re.findall(r"loopalign/(\w+)(?:/|\.py)|[;,]\s+(\w+)\.py", line):
                placed.setdefault(name[0] or name[1], floor)
    wrong = {room: (placed.get(room), floor) for room, floor in FLOORS.items() if placed.get(room) != floor}
    assert not wrong, f"README's Layout places these rooms at (README floor, enforced floor): {wrong}"
