"""``floatscope gradcheck TARGET``: check a backward against central finite differences in float64."""

from __future__ import annotations

import argparse
from typing import Any

from floatscope._cli.render import console, fmt_num, plural, write_json

__all__ = ["add_parser"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "gradcheck", help="check gradients (functions, custom autograd.Functions, modules) against float64 finite "
                          "differences and name the wrong elements",
        description="Check the backward of a function, a custom autograd.Function or a module (its parameters "
                    "included) against central finite differences in float64, localised to the wrong elements. "
                    "Exit status: 0 passed, 1 a wrong gradient, 2 bad input.")
    p.add_argument("target", metavar="TARGET",
                   help="path/to/file.py:factory; factory() returns (fn, inputs) or (module, inputs); inputs with "
                        "requires_grad (and the module's parameters) are checked")
    p.add_argument("--eps", type=float, default=None,
                   help="relative step (default: cube root of the working precision's epsilon, 6.1e-6 in float64)")
    p.add_argument("--atol", type=float, default=0.0, help="absolute slack per Jacobian entry (default 0)")
    p.add_argument("--rtol", type=float, default=None,
                   help="relative slack per Jacobian entry (default 1e-7 in float64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random projections and of every call (default 0)")
    p.add_argument("--max-reported", type=int, default=5, metavar="N",
                   help="stop localising a tensor after N wrong elements (default 5)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from floatscope._engines.target import load_callable_target
    from floatscope._engines.gradcheck import gradcheck

    fn, inputs = load_callable_target(args.target)
    result = gradcheck(fn, *inputs, eps=args.eps, atol=args.atol, rtol=args.rtol, seed=args.seed,
                       max_reported=args.max_reported)
    if args.json:
        write_json(args.json, result.to_dict())
    print_gradcheck(result, console())
    return 0 if result.passed else 1


def print_gradcheck(result: Any, out: Any) -> None:
    """Per checked tensor: the verdict, a table of the worst elements, and the likely cause."""
    from rich.table import Table
    from rich.text import Text

    colour = {"pass": "green", "kink": "yellow", "fail": "red", "unreliable": "yellow"}
    for c in result.inputs:
        label = f"{c.kind} {c.index}" + (f" [bold]{c.name}[/]" if c.name else "")
        dtype = c.dtype.replace("torch.", "")
        size = "x".join(str(s) for s in c.shape) or "scalar"
        extra = ""
        if c.verdict == "fail":
            extra = (f": {plural(c.bad_elements, 'wrong element')}"
                     + ("" if c.complete else f", at least {c.bad_elements_at_least} in all"))
        elif c.verdict == "kink":
            extra = f": {plural(c.kinks, 'element')} at a non-differentiable point"
        out.print(f"{label} ({size}, {dtype}, step {c.step:.2g}): [{colour[c.verdict]}]{c.verdict}[/]{extra}")
        if c.worst:
            table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
            for name in ("element", "output", "analytic", "numeric", "abs error", "rel error", "tolerance", "kind"):
                table.add_column(name, justify="right" if name not in ("element", "output", "kind") else "left",
                                 no_wrap=True)
            many_outputs = any(w.output_tensor for w in c.worst)
            for w in c.worst:
                output = "?" if w.output is None else _index(w.output)
                if many_outputs:
                    output = f"#{w.output_tensor} {output}"
                table.add_row(_index(w.element), output, f"{w.analytic:.9g}", f"{w.numeric:.9g}",
                              fmt_num(w.abs_error), fmt_num(w.rel_error), fmt_num(w.tolerance),
                              Text(w.kind, style="red" if w.kind == "wrong" else "yellow"))
            out.print(table)
        if c.cause:
            out.print(Text(f"  cause: {c.cause}", style="magenta"))
    for note in result.notes:
        out.print(f"[yellow]note[/]: {note}")
    verdict = "[green]passed[/]" if result.passed else "[red]FAILED[/]"
    out.print(f"gradcheck {verdict}: {plural(len(result.inputs), 'checked tensor')}, {result.evaluations} forward and "
              f"{result.backward_passes} backward evaluations, {result.seconds:.3g} s")


def _index(index: list[int]) -> str:
    return "[" + ", ".join(str(i) for i in index) + "]"
