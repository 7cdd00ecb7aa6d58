"""Which modules a source file imports, read from its syntax tree (tests of the layering)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "md_plugin"


def import_targets(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import in ``path`` (a file under ``md_plugin/``), relative
    imports resolved to absolute module names; ``names`` are the ``from`` import's names."""
    package = ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return out
