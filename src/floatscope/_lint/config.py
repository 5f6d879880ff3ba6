"""``[tool.floatscope.lint]`` in ``pyproject.toml``: select, ignore and exclude."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from floatscope._errors import UsageError
from floatscope._lint.rules import check_codes

__all__ = ["LintConfig", "find_config"]

_KEYS = {"select", "ignore", "exclude"}


@dataclass(frozen=True)
class LintConfig:
    """Settings read from ``pyproject.toml``.

    Attributes:
        select: rule ids or prefixes to run (None: every rule).
        ignore: rule ids or prefixes never reported.
        exclude: glob patterns (``tests/fixtures/*``) matched against paths relative to ``root``.
        root: the folder of the ``pyproject.toml`` (None when there is none).
    """

    select: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    root: Path | None = None

    def excludes(self, path: Path) -> bool:
        if not self.exclude or self.root is None:
            return False
        try:
            rel = path.resolve().relative_to(self.root).as_posix()
        except ValueError:
            return False
        parts = rel.split("/")
        candidates = [rel] + ["/".join(parts[:i]) for i in range(1, len(parts))]
        return any(fnmatch.fnmatch(c, pattern.rstrip("/")) for pattern in self.exclude for c in candidates)


def _load_toml(path: Path) -> dict:
    try:
        import tomllib  # type: ignore[import-not-found]
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[import-not-found,no-redef]
        except ModuleNotFoundError:
            raise UsageError(f"{path} has a [tool.floatscope.lint] table but Python 3.10 cannot read TOML without "
                             f"tomli; pip install tomli") from None
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


def find_config(start: Path) -> LintConfig:
    """The ``[tool.floatscope.lint]`` table of the nearest ``pyproject.toml`` at or above ``start``."""
    folder = start.resolve()
    if not folder.is_dir():
        folder = folder.parent
    for candidate in (folder, *folder.parents):
        path = candidate / "pyproject.toml"
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if "floatscope" not in text:
            continue
        table = _load_toml(path).get("tool", {}).get("floatscope", {}).get("lint")
        if table is None:
            continue
        if not isinstance(table, dict):
            raise UsageError(f"{path}: [tool.floatscope.lint] must be a table")
        unknown = set(table) - _KEYS
        if unknown:
            raise UsageError(f"{path}: [tool.floatscope.lint] has unknown key(s) {', '.join(sorted(unknown))}; "
                             f"the keys are select, ignore and exclude")
        values = {}
        for key in _KEYS:
            value = table.get(key)
            if value is None:
                continue
            if isinstance(value, str):  # select = "FS1,FS2": a string is read as the CLI reads --select
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise UsageError(f"{path}: [tool.floatscope.lint] {key} must be a list of strings")
            values[key] = tuple(value)
        select = check_codes(values["select"], f"{path}: select") if "select" in values else None
        if select == ():
            raise UsageError(f"{path}: [tool.floatscope.lint] select is empty, so no rule would run; remove it to "
                             f"run every rule")
        ignore = check_codes(values.get("ignore", ()), f"{path}: ignore")
        return LintConfig(select=select, ignore=ignore, exclude=values.get("exclude", ()), root=candidate)
    return LintConfig()
