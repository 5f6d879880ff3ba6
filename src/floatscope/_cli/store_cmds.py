"""``floatscope runs`` and ``floatscope show RUN``: read the run store."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from floatscope._cli.render import console, print_incident, write_json
from floatscope._cli.run import add_store_option
from floatscope._errors import StoreError
from floatscope._store.sqlite import RunStore

__all__ = ["add_parsers"]


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("runs", help="list the runs in the store")
    add_store_option(p)
    p.set_defaults(handler=runs_main)
    s = sub.add_parser("show", help="reprint a run's diagnosis")
    s.add_argument("run", help="run id, id prefix, or 'last'")
    s.add_argument("--json", metavar="PATH", help="write the run's result JSON to PATH")
    add_store_option(s)
    s.set_defaults(handler=show_main)


def _open(path: str) -> RunStore:
    if not Path(path).exists():
        raise StoreError(f"no run store at {path}; run 'floatscope run SCRIPT' first, or pass --store PATH")
    return RunStore(path)


def runs_main(args: argparse.Namespace) -> int:
    from rich.table import Table

    store = _open(args.store)
    try:
        table = Table(title=f"runs in {args.store}", title_justify="left")
        for col in ("run", "started", "status", "steps", "skipped"):
            table.add_column(col, no_wrap=True)
        for col in ("origin", "command"):
            table.add_column(col, overflow="fold")
        for r in store.runs():
            inc = r.incident
            origin = f"{inc.op} ({inc.phase}, step {inc.step})" if inc else ""
            colour = {"clean": "green", "nonfinite": "red", "error": "yellow"}.get(r.status, "white")
            table.add_row(r.id, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started)),
                          f"[{colour}]{r.status}[/]", str(r.steps), str(r.skipped_steps), origin, r.command or "")
        console().print(table)
    finally:
        store.close()
    return 0


def show_main(args: argparse.Namespace) -> int:
    store = _open(args.store)
    try:
        record = store.get(args.run)
        steps = store.steps(record.id)
    finally:
        store.close()
    out = console()
    out.print(f"run [bold]{record.id}[/] ({record.status}): {record.command or ''}")
    env = record.env
    out.print(f"  torch {env.get('torch')}, python {env.get('python')}, device {env.get('device')}, "
              f"default dtype {env.get('default_dtype')}, deterministic {env.get('deterministic_algorithms')}")
    out.print(f"  {record.steps} steps, {record.skipped_steps} skipped by GradScaler")
    if steps:
        last = steps[-5:]
        out.print("  last steps: " + "; ".join(
            f"{s.step}: loss {_num(s.loss)} grad-norm {_num(s.grad_norm)}" + (" (skipped)" if s.skipped else "")
            for s in last))
    incident = record.incident
    if incident is not None:
        print_incident(incident, out)
    elif record.status == "running":
        out.print("  [yellow]this run never finished (the process was killed); data up to its last commit is shown[/]")
    else:
        out.print("  [green]no NaN/Inf incident[/]")
    if args.json:
        write_json(args.json, record.result or {"status": record.status, "run_id": record.id})
    return 3 if incident is not None else 0


def _num(x: float | None) -> str:
    return "nan/none" if x is None else f"{x:.4g}"
