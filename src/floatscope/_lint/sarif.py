"""SARIF 2.1.0 output, for GitHub code scanning and other SARIF viewers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from floatscope._lint.results import LintResult
from floatscope._lint.rules import RULES

__all__ = ["to_sarif"]

_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
_LEVEL = {"error": "error", "warning": "warning"}
_ROOT = "%SRCROOT%"


def to_sarif(result: LintResult) -> dict[str, Any]:
    """A SARIF 2.1.0 log with one run: every rule in ``tool.driver.rules``, one result per finding.

    Example:
        >>> from floatscope.lint import lint_source, to_sarif
        >>> log = to_sarif(lint_source("import torch\\ny = torch.log(1 + x)\\n", "a.py"))
        >>> log["version"], log["runs"][0]["results"][0]["ruleId"]
        ('2.1.0', 'FS110')
    """
    from floatscope._version import __version__

    rules = list(RULES.values())
    index = {rule.id: i for i, rule in enumerate(rules)}
    driver = {
        "name": "floatscope",
        "version": __version__,
        "rules": [{
            "id": rule.id,
            "name": rule.name,
            "shortDescription": {"text": rule.pattern},
            "fullDescription": {"text": f"{rule.pattern}: {rule.why}."},
            "help": {"text": f"Rewrite: {rule.rewrite}.", "markdown": f"Rewrite: `{rule.rewrite}`."},
            "defaultConfiguration": {"level": _LEVEL[rule.severity]},
            "properties": {"autofix": rule.autofix},
        } for rule in rules],
    }
    results = []
    for f in result.findings:
        uri, base = _uri(f.file)
        entry: dict[str, Any] = {
            "ruleId": f.rule,
            "ruleIndex": index[f.rule],
            "level": _LEVEL[f.severity],
            "message": {"text": f.message + (f" Fix: {f.fix}" if f.fix else "")},
            "locations": [{"physicalLocation": {
                "artifactLocation": {"uri": uri, **base},
                "region": {"startLine": f.line, "startColumn": f.col},
            }}],
        }
        if f.autofixable and f.edit is not None:
            e = f.edit
            entry["fixes"] = [{
                "description": {"text": f"replace with {e.text}"},
                "artifactChanges": [{"artifactLocation": {"uri": uri, **base}, "replacements": [{
                    "deletedRegion": {"startLine": e.line, "startColumn": e.col + 1, "endLine": e.end_line,
                                      "endColumn": e.end_col + 1},
                    "insertedContent": {"text": e.text},
                }]}],
            }]
        results.append(entry)
    run: dict[str, Any] = {"tool": {"driver": driver}, "results": results, "columnKind": "unicodeCodePoints"}
    run["originalUriBaseIds"] = {_ROOT: {"uri": Path.cwd().resolve().as_uri() + "/"}}
    return {"$schema": _SCHEMA, "version": "2.1.0", "runs": [run]}


def _uri(file: str) -> tuple[str, dict[str, str]]:
    """A repository-relative URI (forward slashes, relative to the current directory, ``uriBaseId`` %SRCROOT%)
    for a file under the current directory; an absolute ``file://`` URI for one outside it."""
    path = Path(file)
    if not path.is_absolute():
        path = Path.cwd() / path
    path = Path(os.path.normpath(path))
    root = Path(os.path.normpath(Path.cwd().resolve()))
    for candidate in (path, path.resolve()):
        if candidate.is_relative_to(root):
            return quote(candidate.relative_to(root).as_posix()), {"uriBaseId": _ROOT}
        if candidate.is_relative_to(Path.cwd()):
            return quote(candidate.relative_to(Path.cwd()).as_posix()), {"uriBaseId": _ROOT}
    return path.as_uri(), {}
