"""Run the rules over files, folders and model targets; apply selection, ignore comments, config and --fix."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from floatscope._errors import UsageError
from floatscope._lint.config import LintConfig, find_config
from floatscope._lint.results import Finding, LintResult
from floatscope._lint.rules import check_codes, is_selected
from floatscope._lint.source import analyze_source, ignored_codes

__all__ = ["lint_paths", "lint_source"]

_SKIP_DIRS = {".git", ".hg", ".svn", ".venv", "venv", "env", ".env", "__pycache__", "build", "dist", "node_modules",
              ".tox", ".nox", ".mypy_cache", ".pytest_cache", ".ruff_cache", "site-packages", ".eggs"}
_TARGET = re.compile(r"^(?P<path>.+\.py):(?P<factory>[A-Za-z_][A-Za-z0-9_]*)$")


def _keep(finding: Finding, select: tuple[str, ...] | None, ignore: tuple[str, ...],
          ignored: dict[int, set[str] | None]) -> bool:
    if finding.rule not in ("FS001", "FS002") and not is_selected(finding.rule, select, ignore):
        return False
    if finding.line in ignored:
        codes = ignored[finding.line]
        if codes is None or finding.rule in codes:
            return False
    return True


def lint_source(source: str, filename: str = "<string>", *, select: Sequence[str] | None = None,
                ignore: Sequence[str] = ()) -> LintResult:
    """Lint Python source text; nothing in it is run.

    Args:
        source: the code.
        filename: the name findings carry.
        select: rule ids or prefixes to run (default: all).
        ignore: rule ids or prefixes to drop.

    Returns:
        A ``LintResult`` with ``files == 1``.

    Example:
        >>> from floatscope.lint import lint_source
        >>> result = lint_source("import torch\\ny = torch.log(torch.softmax(x, dim=-1))\\n")
        >>> [(f.rule, f.line, f.fix) for f in result.findings]
        [('FS101', 2, 'torch.log_softmax(x, dim=-1)')]
    """
    sel = check_codes(list(select), "select") if select is not None else None
    ign = check_codes(list(ignore), "ignore")
    ignored = ignored_codes(source)
    findings = [f for f in analyze_source(source, filename) if _keep(f, sel, ign, ignored)]
    return LintResult(tuple(findings), 1)


def _files(paths: Sequence[str], config: LintConfig) -> tuple[list[tuple[Path, str]], list[str]]:
    files: list[tuple[Path, str]] = []
    targets: list[str] = []
    for text in paths:
        path = Path(text)
        match = _TARGET.match(text)
        if match and not path.exists() and Path(match["path"]).is_file():
            targets.append(text)
            continue
        if not path.exists():
            hint = " (a model target looks like path/to/file.py:factory)" if ":" in text else ""
            raise UsageError(f"{text}: no such file or folder{hint}")
        if path.is_dir():
            for found in sorted(path.rglob("*.py")):
                rel = found.relative_to(path)
                if any(part in _SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1]):
                    continue
                if not config.excludes(found):
                    files.append((found, str(found)))
        elif not config.excludes(path):
            files.append((path, text))
    return files, targets


def lint_paths(paths: Sequence[str], *, select: Sequence[str] | None = None, ignore: Sequence[str] = (),
               fix: bool = False, config: bool | LintConfig = True) -> LintResult:
    """Lint files, folders (every ``*.py`` under them) and ``file.py:factory`` model targets.

    A model target is imported and its factory called (it must return ``(model, example_inputs)``); the model is
    exported with ``torch.export`` and its graph checked with the dtype rules. Plain files are only parsed.

    Args:
        paths: files, folders and targets.
        select: rule ids or prefixes to run; overrides the config's ``select``.
        ignore: rule ids or prefixes to drop, added to the config's ``ignore``.
        fix: rewrite the files with the autofixable findings' fixes (those that compute the same function).
        config: True reads ``[tool.floatscope.lint]`` from the nearest ``pyproject.toml`` above the first path;
            False reads none; or a ``LintConfig``.

    Returns:
        A ``LintResult``; with ``fix``, the findings that remain and how many rewrites were applied.

    Raises:
        UsageError: a path does not exist, a rule id is unknown, or the config is malformed.

    Example:
        >>> from floatscope.lint import lint_paths
        >>> lint_paths(["src/floatscope/examples/zero_norm_div.py"]).findings[0].rule
        'FS112'
    """
    if not paths:
        raise UsageError("give at least one file, folder or file.py:factory target to lint")
    if config is True:
        first = Path(paths[0].split(":")[0] if _TARGET.match(paths[0]) else paths[0])
        cfg = find_config(first if first.exists() else Path.cwd())
    elif config is False:
        cfg = LintConfig()
    else:
        cfg = config
    sel = check_codes(list(select), "--select") if select is not None else cfg.select
    ign = cfg.ignore + check_codes(list(ignore), "--ignore")
    files, targets = _files(paths, cfg)
    findings: list[Finding] = []
    notes: list[str] = []
    fixed = 0
    seen: set[Path] = set()
    for path, shown in files:
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        file_findings, n = _lint_file(path, shown, sel, ign, fix)
        findings += file_findings
        fixed += n
    for target in targets:
        from floatscope._lint.graph import lint_target

        path_text = _TARGET.match(target)["path"]  # type: ignore[index]
        path = Path(path_text)
        if path.resolve() not in seen:
            seen.add(path.resolve())
            file_findings, n = _lint_file(path, path_text, sel, ign, fix)
            findings += file_findings
            fixed += n
        graph_findings, graph_notes = lint_target(target)
        notes += graph_notes
        have = {(f.rule, Path(f.file).resolve(), f.line) for f in findings}
        ignored_by_file: dict[Path, dict[int, set[str] | None]] = {}
        for f in graph_findings:
            f = replace(f, file=_display(f.file))  # the graph's frames are absolute: show them as the sources
            where = Path(f.file).resolve()
            if (f.rule, where, f.line) in have:
                continue
            if where not in ignored_by_file:
                try:
                    ignored_by_file[where] = ignored_codes(where.read_text(encoding="utf-8"))
                except OSError:
                    ignored_by_file[where] = {}
            if _keep(f, sel, ign, ignored_by_file[where]):
                findings.append(f)
                have.add((f.rule, where, f.line))
    findings.sort(key=lambda f: (f.file, f.line, f.col, f.rule))
    seen |= {Path(f.file).resolve() for f in findings}  # a graph finding can point at a file not given
    return LintResult(tuple(findings), len(seen), fixed, tuple(notes))


def _display(file: str) -> str:
    """A path relative to the current directory when it lies under it (as given paths are), else as it is."""
    path = Path(file)
    if not path.is_absolute():
        return file
    try:
        return path.relative_to(Path.cwd()).as_posix() if path.is_relative_to(Path.cwd()) else file
    except (ValueError, OSError):
        return file


def _lint_file(path: Path, shown: str, select: tuple[str, ...] | None, ignore: tuple[str, ...],
               fix: bool) -> tuple[list[Finding], int]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{shown}: cannot read: {exc.strerror or exc}") from None
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [Finding("FS001", shown, 1, 1, "error", f"not UTF-8 ({exc.reason} at byte {exc.start}); the file was "
                        f"not checked", None, False)], 0
    fixed = 0
    for _ in range(4 if fix else 1):
        ignored = ignored_codes(source)
        findings = [f for f in analyze_source(source, shown) if _keep(f, select, ignore, ignored)]
        edits = [f.edit for f in findings if f.autofixable and f.edit is not None]
        if not fix or not edits:
            break
        from floatscope._lint.fix import apply_edits

        new, n = apply_edits(source, edits)
        if n == 0 or new == source:
            break
        source = new
        fixed += n
        path.write_text(source, encoding="utf-8")
    return findings, fixed
