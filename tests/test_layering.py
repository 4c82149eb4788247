"""Only ``ligerjax/compiler/ir.py`` may import JAX internals (DESIGN §2): JAX is pinned, and
one module is all that has to change when its internals move."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INTERNAL = ("jax._src", "jax.extend", "jax.interpreters", "jax.core")
ALLOWED = {ROOT / "ligerjax" / "compiler" / "ir.py"}


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_only_the_ir_module_imports_jax_internals():
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            m for m in _imported_modules(path) if m.startswith(INTERNAL)
        )
        for package in ("ligerjax", "passes", "models")
        for path in sorted((ROOT / package).rglob("*.py"))
        if path not in ALLOWED
    }
    assert {p: m for p, m in offenders.items() if m} == {}
