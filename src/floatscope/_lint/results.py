"""Lint results: a ``Finding`` per unstable spot, a ``LintResult`` per run. The JSON schema is ``to_dict``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from floatscope._lint.rules import Severity

__all__ = ["Edit", "Finding", "LintResult"]


@dataclass(frozen=True)
class Edit:
    """A rewrite of one expression: its source span (1-based lines, 0-based character columns) and new text."""

    line: int
    col: int
    end_line: int
    end_col: int
    text: str


@dataclass(frozen=True)
class Finding:
    """One unstable spot.

    Attributes:
        rule: the rule id (``FS101``..), see ``floatscope.lint.RULES``.
        file: the file as given (a path under a folder given on the command line).
        line: 1-based line.
        col: 1-based column (characters, as editors count).
        severity: ``error`` (NaN or Inf) or ``warning`` (precision loss).
        message: what is unstable, when it fails (with the numbers), and why.
        fix: the stable rewrite: the exact replacement text when ``autofixable``, otherwise a suggestion.
        autofixable: whether ``--fix`` applies ``fix`` (only rewrites that compute the same function do).
    """

    rule: str
    file: str
    line: int
    col: int
    severity: Severity
    message: str
    fix: str | None
    autofixable: bool
    edit: Edit | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "file": self.file, "line": self.line, "col": self.col, "severity": self.severity,
                "message": self.message, "fix": self.fix, "autofixable": self.autofixable}

    def location(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class LintResult:
    """Every finding of one run, sorted by file, line and column, and how many files were read.

    Attributes:
        findings: the findings left (after ``--fix``, the ones it could not apply).
        files: the number of Python files linted.
        fixed: the number of rewrites ``--fix`` applied (0 without ``--fix``).
        notes: lines for the user that are not findings (why a model graph could not be made).
    """

    findings: tuple[Finding, ...]
    files: int
    fixed: int = 0
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"findings": [f.to_dict() for f in self.findings], "files": self.files}

    @property
    def clean(self) -> bool:
        return not self.findings
