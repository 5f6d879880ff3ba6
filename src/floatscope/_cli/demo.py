"""``floatscope demo``: run the bundled buggy training scripts under the watch."""

from __future__ import annotations

import argparse
import contextlib
import io
import time
from pathlib import Path
from typing import Any

from floatscope._cli.render import console, print_incident
from floatscope._cli.run import add_store_option, run_script

__all__ = ["add_parser", "EXAMPLES", "examples_dir"]

# (script, what it shows)
EXAMPLES: list[tuple[str, str]] = [
    ("lstm_divergence", "an LSTM rollout whose error compounds over time steps until training diverges"),
    ("log_softmax_underflow", "log of a softmax that underflows to 0"),
    ("fp16_exp_overflow", "exp overflowing float16 in hand-written attention"),
    ("sqrt_at_zero", "sqrt at zero: finite forward, infinite gradient (backward only)"),
    ("zero_norm_div", "0/0 when normalising an all-zero row"),
    ("adam_fp16_eps", "Adam's eps rounding to 0 on pure float16 parameters (optimizer step)"),
]


def examples_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "examples"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the bundled examples of real numerical bugs under the watch",
                       description="Runs each bundled example script under 'floatscope run', prints each "
                                   "diagnosis and records each run in the store. Exit status 0 when every example "
                                   "was diagnosed as expected.")
    add_store_option(p)
    p.add_argument("--only", metavar="NAME", action="append", choices=[n for n, _ in EXAMPLES],
                   help="run only this example (repeatable)")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from rich.table import Table

    out = console()
    summary = Table(title="floatscope demo", title_justify="left")
    for col in ("example", "phase", "step"):
        summary.add_column(col, no_wrap=True)
    for col in ("op", "module / parameter", "where", "category"):
        summary.add_column(col, overflow="fold")
    failures = 0
    total_start = time.perf_counter()
    for name, what in EXAMPLES:
        if args.only and name not in args.only:
            continue
        script = examples_dir() / f"{name}.py"
        out.rule(f"[bold]{name}[/]: {what}")
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            code, result = run_script(script, [], store=args.store, run_name=f"demo:{name}")
        elapsed = time.perf_counter() - start
        incident = result.incident
        if incident is None:
            failures += 1
            out.print(f"[red]no incident found (exit {code})[/]")
            summary.add_row(name, "-", "-", "-", "-", "-", "[red]missed[/]")
            continue
        print_incident(incident, out)
        out.print(f"run {result.run_id}, {elapsed:.1f} s")
        where = f"{Path(incident.file).name}:{incident.line}"
        summary.add_row(name, incident.phase, str(incident.step), incident.op,
                        incident.param or (incident.module if incident.module is not None else "-"), where,
                        incident.category)
    out.print(summary)
    out.print(f"{time.perf_counter() - total_start:.1f} s in all; runs recorded in {args.store}")
    out.print("next: 'floatscope runs' lists them, 'floatscope show last' reprints a diagnosis, "
              "'floatscope report last -o report.html' writes a page, 'floatscope health last' lists findings")
    return 1 if failures else 0
