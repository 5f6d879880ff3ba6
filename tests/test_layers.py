"""Imports point down: instruments never import diagnoses, engines or the CLI; nothing imports up.

Layers, lowest first (a module may import its own layer and the ones below):

    0  _errors, _results, _events,     plain records, the error tree and the version
       _version
    1  _numerics                       pure functions on tensors and formats
    2  _instrument, _store             hooks, modes, the channel and replayer; the SQLite store
    3  _diagnose                       interpretation: events and records -> diagnoses and findings
    4  _engines, _lint                 orchestrators: watch, locate, precision, compare, determinism,
                                       gradcheck, target loading; the linter
    5  _report, _cli, public modules   what users call
"""

from __future__ import annotations

import ast
from pathlib import Path

import floatscope

PACKAGE = Path(floatscope.__file__).parent
LAYER = {"_errors": 0, "_results": 0, "_events": 0, "_version": 0, "_numerics": 1, "_instrument": 2, "_store": 2,
         "_diagnose": 3, "_engines": 4, "_lint": 4, "_report": 5, "_cli": 5, "examples": 5}
# Same-layer imports that are not allowed: instruments and the store do not know each other.
FORBIDDEN = {("_instrument", "_store"), ("_store", "_instrument")}


def _unit(module: str) -> str | None:
    """``floatscope._instrument.capture`` -> ``_instrument``; the package root and public modules -> None."""
    parts = module.split(".")
    if parts[0] != "floatscope" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYER else None


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found += [f"{node.module}.{a.name}" for a in node.names if node.module == "floatscope"]
    return found


def test_imports_point_down():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        unit = rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.stem.startswith("_") else None
        if unit not in LAYER:
            continue  # the package root and its public modules may import anything
        for target in _imports(path):
            if target == "floatscope" or target.startswith("floatscope.") and _unit(target) is None:
                if LAYER[unit] < 5:
                    violations.append(f"{rel} imports the package root or a public module ({target})")
                continue
            other = _unit(target)
            if other is None:
                continue
            if LAYER[other] > LAYER[unit] or (unit, other) in FORBIDDEN:
                violations.append(f"{rel} (layer {LAYER[unit]}) imports {target} (layer {LAYER[other]})")
    assert violations == [], "\n".join(violations)


def test_the_layer_table_covers_every_subpackage():
    units = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    units |= {p.stem for p in PACKAGE.glob("_*.py") if p.stem != "__init__" and p.stem != "__main__"}
    assert units <= set(LAYER), units - set(LAYER)
