"""``floatscope.lint``: unstable numerical code patterns, found in the source before they run.

Source rules (``FS1xx``) read the AST and run nothing; dtype rules (``FS2xx``) fire from the source when it shows
the dtype (``x.half()`` in the same function) and from a ``torch.export`` graph of a ``file.py:factory`` target.

Example:
    >>> import floatscope
    >>> result = floatscope.lint.lint_source("import torch\\nz = torch.log(1 + x)\\n")
    >>> result.findings[0].rule, result.findings[0].fix, result.findings[0].autofixable
    ('FS110', 'torch.log1p(x)', True)
"""

from __future__ import annotations

from floatscope._lint.config import LintConfig
from floatscope._lint.engine import lint_paths, lint_source
from floatscope._lint.results import Finding, LintResult
from floatscope._lint.rules import RULES, Rule
from floatscope._lint.sarif import to_sarif

__all__ = ["Finding", "LintConfig", "LintResult", "RULES", "Rule", "lint_paths", "lint_source", "lint_target",
           "to_sarif"]


def lint_target(target: str) -> LintResult:
    """Export ``file.py:factory``'s model with ``torch.export`` and check the graph's dtypes (FS2xx rules).

    Returns:
        A ``LintResult`` of the graph findings only; ``notes`` says why a graph could not be made, if so.

    Example:
        >>> from floatscope.lint import lint_target
        >>> lint_target("src/floatscope/examples/lstm_accumulation.py:make").findings
        ()
    """
    from floatscope._lint.graph import lint_target as graph_lint

    findings, notes = graph_lint(target)
    return LintResult(tuple(findings), 1, 0, tuple(notes))
