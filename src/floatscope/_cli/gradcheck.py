"""``floatscope gradcheck TARGET``: check a backward against central finite differences in float64."""

from __future__ import annotations

import argparse
from typing import Any

from floatscope._cli.render import console, write_json

__all__ = ["add_parser"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "gradcheck", help="check gradients (functions, custom autograd.Functions, modules) against float64 finite "
                          "differences and name the wrong elements",
        description="Check the backward of a function, a custom autograd.Function or a module (its parameters "
                    "included) against central finite differences in float64, localised to the wrong elements. "
                    "Exit status: 0 passed (kinks included), 1 failed (a wrong gradient, or unreliable: the function "
                    "is not deterministic or its finite differences never converged), 2 bad input (no JSON written).")
    p.add_argument("target", metavar="TARGET",
                   help="path/to/file.py:factory; factory() returns (fn, inputs) or (module, inputs); inputs with "
                        "requires_grad (and the module's parameters) are checked")
    p.add_argument("--eps", type=float, default=None,
                   help="relative step (default: cube root of the working precision's epsilon, 6.1e-6 in float64)")
    p.add_argument("--atol", type=float, default=0.0, help="absolute slack per Jacobian entry (default 0)")
    p.add_argument("--rtol", type=float, default=None,
                   help="relative slack per Jacobian entry (default 1e-7 in float64, 8 eps when the function computes in lower precision)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random projections and of every call (default 0)")
    p.add_argument("--max-reported", type=int, default=5, metavar="N",
                   help="stop localising a tensor after N wrong elements (default 5)")
    p.add_argument("--max-evaluations", type=int, default=4000, metavar="N",
                   help="budget of forward calls in all (default 4000); below what a check needs (11 + 4 per checked tensor) is refused, exit 2")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from floatscope._engines.target import load_callable_target
    from floatscope._engines.gradcheck import gradcheck

    fn, inputs = load_callable_target(args.target)
    result = gradcheck(fn, *inputs, eps=args.eps, atol=args.atol, rtol=args.rtol, seed=args.seed,
                       max_reported=args.max_reported, max_evaluations=args.max_evaluations)
    if args.json:
        write_json(args.json, result.to_dict())
    print_gradcheck(result, console())
    return 0 if result.passed else 1


def print_gradcheck(result: Any, out: Any) -> None:
    """The report of ``print(result)`` (the same lines), with the verdicts coloured."""
    from rich.text import Text

    from floatscope._engines.gradcheck import report_lines

    colour = {"pass": "green", "kink": "yellow", "fail": "red", "unreliable": "yellow", "passed": "green",
              "FAILED": "red", "wrong": "red", "jump": "yellow", "unresolved": "yellow"}
    for line in report_lines(result):
        text = Text(line)
        if line.startswith("  cause: "):
            text.stylize("magenta")
        elif line.startswith("note: "):
            text.stylize("yellow", 0, 4)
        else:
            words = line.rstrip().split(" ")
            last = words[-1]
            if line.startswith("gradcheck "):
                text.stylize(colour[words[1].rstrip(":")], 10, 10 + len(words[1]) - 1)
            elif "): " in line:
                start = line.index("): ") + 3
                verdict = line[start:].split(":")[0]
                text.stylize(colour.get(verdict, ""), start, start + len(verdict))
            elif last in colour:
                text.stylize(colour[last], len(line.rstrip()) - len(last), len(line.rstrip()))
        out.print(text)
