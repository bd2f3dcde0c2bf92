"""design.md section 1: imports point down the layers, and nothing in the core exits."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "parrot_core"
# what each layer may import from parrot_core (besides itself and the leaf `errors` module)
ALLOWED = {
    "graph": set(),
    "contexts": {"graph"},
    "engines": set(),  # engines/builtin knows nothing above the engine protocol (engines/base)
    "serve": {"graph", "contexts", "engines.base"},
    "frontend": {"graph", "contexts", "engines", "serve"},
    "chat": {"graph", "contexts", "engines.base", "serve", "frontend"},  # beside frontend, above it
    "switching": {"graph", "contexts", "engines.base", "serve", "frontend"},  # beside chat
    "server": {"graph", "contexts", "engines", "serve", "frontend", "chat", "switching", "parrot_core"},  # the top layer
}


def imported_modules(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n == "parrot_core" or n.startswith("parrot_core.")}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_point_down(layer):
    allowed = ALLOWED[layer] | {layer, "errors"}
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files
    for path in files:
        for module in imported_modules(path):
            target = module if module == "parrot_core" else module.removeprefix("parrot_core.")
            assert any(target == a or target.startswith(a + ".") for a in allowed), f"{path.relative_to(PACKAGE)} imports {module}"


def test_nothing_in_the_package_calls_sys_exit():
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        assert "sys.exit" not in source and "os._exit" not in source, path
