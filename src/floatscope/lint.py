"""Lint: unstable numerical code patterns, found in the source (and a model graph) before they run.

Example:
    >>> import floatscope.lint
    >>> result = floatscope.lint.lint_source("import torch\\ny = torch.log(torch.sigmoid(z))\\n")
    >>> [(f.rule, f.fix) for f in result.findings]
    [('FS103', 'torch.nn.functional.logsigmoid(z)')]
"""

from floatscope._lint import (
    RULES,
    Finding,
    LintConfig,
    LintResult,
    Rule,
    lint_paths,
    lint_source,
    lint_target,
    to_sarif,
)

__all__ = ["Finding", "LintConfig", "LintResult", "RULES", "Rule", "lint_paths", "lint_source", "lint_target",
           "to_sarif"]
