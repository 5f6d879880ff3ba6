"""``floatscope health RUN``, ``floatscope diff A B``, ``floatscope env``, ``floatscope report RUN``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from floatscope._cli.render import console, step_span, write_json
from floatscope._cli.run import add_store_option
from floatscope._cli.store_cmds import store_and_run
from floatscope._errors import UsageError

__all__ = ["add_parsers"]


def add_parsers(sub: Any) -> None:
    h = sub.add_parser("health", help="findings about a run's numerical health (vanishing/exploding gradients, ...)")
    h.add_argument("run", help="run id, id prefix, or 'last'")
    h.add_argument("--json", metavar="PATH", help="write the findings as JSON")
    add_store_option(h, reads=True)
    h.set_defaults(handler=health_main)

    d = sub.add_parser("diff", help="why two runs differ: configuration, then the first divergent step and tensor",
                       description="A and B are run ids (or prefixes, or 'last'), optionally as STORE:RUN to read a "
                                   "run from another store.")
    d.add_argument("run_a", metavar="A")
    d.add_argument("run_b", metavar="B")
    d.add_argument("--exact", action="store_true", help="compare fingerprints bitwise instead of within --tolerance")
    d.add_argument("--tolerance", type=float, default=1e-6, metavar="X",
                   help="relative tolerance for fingerprints (default 1e-6)")
    d.add_argument("--json", metavar="PATH")
    d.add_argument("--report", metavar="PATH", help="write an HTML page with both runs overlaid")
    add_store_option(d, reads=True)
    d.set_defaults(handler=diff_main)

    e = sub.add_parser("env", help="print the environment a run records (versions, device, determinism flags)")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(handler=env_main)

    r = sub.add_parser("report", help="write a self-contained HTML report of a run")
    r.add_argument("run", help="run id, id prefix, or 'last'")
    r.add_argument("-o", "--output", default="floatscope-report.html", metavar="PATH")
    add_store_option(r, reads=True)
    r.set_defaults(handler=report_main)


def health_main(args: argparse.Namespace) -> int:
    from floatscope._diagnose.health import findings_for

    store, run = store_and_run(args.run, args.store)
    try:
        record = store.get(run)
        findings = findings_for(store, record.id)
    finally:
        store.close()
    out = console()
    partial = (f" (still running: {record.steps} step(s) up to its last commit)" if record.status == "running"
               else "")
    out.print(f"run [bold]{record.id}[/]: {len(findings)} finding(s){partial}")
    colours = {"error": "red", "warning": "yellow", "info": "cyan"}
    for f in findings:
        where = f" in {', '.join(f.layers[:5])}" if f.layers else ""
        steps = f" ({step_span(f.steps)})" if f.steps else ""
        out.print(f"[{colours[f.severity]}]{f.severity}[/] [bold]{f.kind}[/]{where}{steps}")
        out.print(f"  why: {f.explanation}")
        for s in f.suggestions:
            out.print(f"  [green]- {s}[/]")
    if not findings and record.steps == 0:
        out.print("no finding, and nothing to judge: the run completed no training step")
    elif not findings:
        out.print("[green]no finding: gradients, activations, updates and the loss scale look healthy[/]")
    if args.json:
        write_json(args.json, {"run_id": record.id, "findings": [f.to_dict() for f in findings]})
    return 0


def diff_main(args: argparse.Namespace) -> int:
    from floatscope._diagnose.diff import diff_runs

    if not args.tolerance >= 0:
        raise UsageError("--tolerance must be a non-negative number")
    store_a, run_a = store_and_run(args.run_a, args.store)
    store_b, run_b = store_and_run(args.run_b, args.store)
    try:
        result = diff_runs(store_a, run_a, store_b, run_b, exact=args.exact, tolerance=args.tolerance)
        if args.report:
            from floatscope._report.run import write_diff_report

            write_diff_report(store_a, store_b, result, args.report)
    finally:
        store_a.close()
        if store_b is not store_a:
            store_b.close()
    out = console()
    out.print(f"diff [bold]{result.run_a}[/] vs [bold]{result.run_b}[/]")
    if result.run_a == result.run_b and store_a.path.resolve() == store_b.path.resolve():
        out.print(f"[yellow]A and B are the same run[/] ({args.run_a} and {args.run_b} both name {result.run_a}): "
                  f"pass two run ids, e.g. from floatscope runs")
    if result.config_differences:
        from rich.table import Table

        table = Table(title="configuration differences", title_justify="left")
        for col in ("key", "A", "B"):
            table.add_column(col, overflow="fold")
        for d in result.config_differences[:40]:
            table.add_row(d.key, _short(d.a), _short(d.b))
        out.print(table)
    if result.first_divergent_step is None:
        out.print(f"[green]no divergent step[/] in the {result.compared_steps} step(s) both runs recorded")
    else:
        out.print(f"first divergent step [bold]{result.first_divergent_step}[/]: {result.first_divergent_tensor}")
    out.print(result.explanation)
    if args.json:
        write_json(args.json, result.to_dict())
    return 0


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 60 else text[:57] + "..."


def env_main(args: argparse.Namespace) -> int:
    from floatscope._store.env import capture_env

    env = capture_env().to_dict()
    if args.json:
        print(json.dumps(env, indent=2))
        return 0
    out = console()
    width = max(len(k) for k in env)
    for key, value in env.items():
        out.print(f"{key:<{width}}  {value}")
    return 0


def report_main(args: argparse.Namespace) -> int:
    from floatscope._report.run import write_run_report

    store, run = store_and_run(args.run, args.store)
    try:
        record = store.get(run)
        path = write_run_report(store, record.id, args.output)
    finally:
        store.close()
    console().print(f"report for run {record.id} written to {path}")
    return 0
