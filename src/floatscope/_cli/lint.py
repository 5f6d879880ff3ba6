"""``floatscope lint PATH...``: unstable numerical code patterns, from the source (and a model graph for targets)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from floatscope._cli.render import plural, write_json

__all__ = ["add_parser"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "lint", help="find unstable numerical code (log(softmax), exp without max, x / norm, ...) without running it",
        description="Find unstable numerical patterns in Python source (nothing is run), with the failure each causes "
                    "and its stable rewrite. A file.py:factory target also exports the model with torch.export and "
                    "checks the graph's dtypes (epsilons that round to 0, mask constants beyond the dtype's range).",
        epilog="Exit status: 0 no findings, 1 findings, 2 bad input (a missing path, an unknown rule), 4 floatscope "
               "failed on a statement (an FS002 internal error, to report; the findings elsewhere are printed). Configure "
               "with [tool.floatscope.lint] select/ignore/exclude in pyproject.toml; silence one line with "
               "# floatscope: ignore[FS101].")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files, folders, or file.py:factory model targets")
    p.add_argument("--format", choices=("text", "json", "sarif"), default="text",
                   help="what to print on stdout (default text; sarif for code scanning)")
    p.add_argument("--json", metavar="OUT", help="also write the findings as JSON to OUT")
    p.add_argument("--select", action="append", metavar="RULES",
                   help="comma-separated rule ids or prefixes to run (FS101,FS2); overrides the config's select")
    p.add_argument("--ignore", action="append", metavar="RULES",
                   help="comma-separated rule ids or prefixes to skip, added to the config's ignore")
    p.add_argument("--fix", action="store_true",
                   help="rewrite files with the fixes that compute the same function (log1p, log_softmax, ...); "
                        "the others stay suggestions")
    p.add_argument("--no-config", action="store_true", help="do not read [tool.floatscope.lint] from pyproject.toml")
    p.set_defaults(handler=main)


def _codes(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [c.strip() for v in values for c in v.split(",") if c.strip()]


def main(args: argparse.Namespace) -> int:
    from floatscope._lint.engine import lint_paths
    from floatscope._lint.sarif import to_sarif

    result = lint_paths(args.paths, select=_codes(args.select), ignore=_codes(args.ignore) or [], fix=args.fix,
                        config=not args.no_config)
    for note in result.notes:
        sys.stderr.write(f"floatscope: note: {note}\n")
    if args.json:
        write_json(args.json, result.to_dict())
    if args.format == "json":
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
    elif args.format == "sarif":
        sys.stdout.write(json.dumps(to_sarif(result), indent=2) + "\n")
    else:
        _print_text(result, fixing=args.fix)
    if any(f.rule == "FS002" for f in result.findings):
        return 4  # floatscope's own failure: not a clean run, and not the user's findings alone
    return 1 if result.findings else 0


def _print_text(result: Any, *, fixing: bool) -> None:
    out = sys.stdout
    for f in result.findings:
        out.write(f"{f.location()}: {f.rule} {f.severity}: {f.message}\n")
        if f.fix:
            label = "fix" if f.autofixable else "suggested"
            out.write(f"    {label}: {f.fix}\n")
    errors = sum(f.severity == "error" for f in result.findings)
    warnings = len(result.findings) - errors
    fixable = sum(f.autofixable for f in result.findings)
    fixed = f"fixed {plural(result.fixed, 'finding')}; " if fixing else ""
    if result.findings:
        tail = f"; {fixable} fixable with floatscope lint --fix" if fixable and not fixing else ""
        out.write(f"{fixed}{plural(len(result.findings), 'finding')} ({plural(errors, 'error')}, "
                  f"{plural(warnings, 'warning')}) in {plural(result.files, 'file')}{tail}\n")
    else:
        out.write(f"{fixed}no findings in {plural(result.files, 'file')}\n")
