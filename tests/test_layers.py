"""The import contract: api -> engine -> runtime -> models, shared words at the bottom, tools beside.

A module may import its own folder, the folders below it that LAYERS allows, and the shared bottom
modules; an import inside a function counts the same. Anything else (an upward import, or the api
reaching past the engine) fails here, naming the file and the line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bgeserve"
# The words every layer speaks (bgeserve.core, .errors, ...), importable from anywhere.
BOTTOM = {"core", "errors", "sparse", "scoring", "data", "cache_files", ""}
LAYERS = {
    "api": {"engine"},
    "engine": {"runtime", "models"},
    "runtime": {"models"},
    "models": set(),
}
# Beside the layers, free to use any of them: the commands and tools that put them together.
BESIDE = {"cli", "bench", "ops", "ray", "testing", "embedder", "__main__", ""}


def area(module: str) -> str:
    """`bgeserve.api.routes_tei` -> `api`; `bgeserve.errors.InvalidInput` -> `errors`; `bgeserve` -> ``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def allowed(importer: str, imported: str) -> bool:
    source, target = area(importer), area(imported)
    if target in BOTTOM or source == target or source in BESIDE:
        return True
    return target in LAYERS.get(source, set())


def imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)]
    return [(line, name) for line, name in found if name == "bgeserve" or name.startswith("bgeserve.")]


def violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("bgeserve", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        for line, name in imports(path):
            if not allowed(module, name):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    return found


def test_every_import_goes_down_the_layers():
    assert violations() == []


@pytest.mark.parametrize(
    ("importer", "imported", "ok"),
    [
        ("bgeserve.api.routes_tei", "bgeserve.engine.engine", True),
        ("bgeserve.api.routes_tei", "bgeserve.runtime.backend", False),  # past the engine
        ("bgeserve.models.checkpoint", "bgeserve.runtime.backend", False),  # upward
        ("bgeserve.engine.engine", "bgeserve.api.settings", False),  # upward
        ("bgeserve.models.checkpoint", "bgeserve.core", True),  # the shared words
        ("bgeserve.runtime.torch_backend", "bgeserve.errors", True),
        ("bgeserve.bench.runners", "bgeserve.runtime.devices", True),  # beside
    ],
)
def test_the_contract_itself(importer, imported, ok):
    assert allowed(importer, imported) is ok
