"""``floatscope runs`` and ``floatscope show RUN``: read the run store (read-only, never waiting on writers)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from floatscope._cli.render import check_json_path, console, plural, print_incident, write_json
from floatscope._cli.run import add_store_option
from floatscope._store.sqlite import RunStore, StoreMissing

__all__ = ["add_parsers", "open_reader"]

_COLOURS = {"clean": "green", "nonfinite": "red", "error": "yellow", "running": "cyan", "died": "red",
            "interrupted": "yellow", "terminated": "yellow", "unwatched": "yellow"}


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("runs", help="list the runs in the store")
    p.add_argument("--json", metavar="PATH", help="write the list as JSON to PATH")
    add_store_option(p, reads=True)
    p.set_defaults(handler=runs_main)
    s = sub.add_parser("show", help="reprint a run's diagnosis")
    s.add_argument("run", help="run id, id prefix, or 'last'; STORE:RUN reads another store")
    s.add_argument("--json", metavar="PATH", help="write the run's result JSON to PATH")
    add_store_option(s, reads=True)
    s.set_defaults(handler=show_main)


def open_reader(path: str) -> RunStore:
    """The store at ``path``, read-only; a missing store is an error naming the fix."""
    try:
        return RunStore(path, readonly=True)
    except StoreMissing as exc:
        raise StoreMissing(f"{exc}") from None


def store_and_run(spec: str, default_store: str) -> tuple[RunStore, str]:
    """A run given as ``STORE:RUN`` (an existing store file, then the run) or as a run of ``default_store``."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and Path(head).is_file():
        return open_reader(head), tail
    return open_reader(default_store), spec


def runs_main(args: argparse.Namespace) -> int:
    from rich.table import Table

    if args.json:
        check_json_path(args.json)
    try:
        store = RunStore(args.store, readonly=True)
    except StoreMissing:
        records = []
    else:
        try:
            records = store.runs()
        finally:
            store.close()
    if args.json:
        write_json(args.json, {"runs": [r.to_dict() for r in records]})
    out = console()
    if not records:
        out.print(f"no runs yet in {args.store} (floatscope run SCRIPT records one)")
        return 0
    rows = []
    for r in records:
        inc = r.incident
        what = f"{inc.op} ({inc.phase}, step {inc.step})" if inc else (r.command or "")
        rows.append((r.id, time.strftime("%m-%d %H:%M", time.localtime(r.started)), r.status, str(r.steps), what))
    # The fixed columns keep their width; the last one (a command can be any length) gets what is left.
    fixed = [max(len(head), *(len(row[k]) for row in rows)) for k, head in enumerate(("run", "started", "status",
                                                                                      "steps"))]
    room = max(16, out.width - sum(fixed) - 3 * 5 - 1)
    table = Table(title=f"runs in {args.store}", title_justify="left")
    for head, width in zip(("run", "started", "status", "steps"), fixed, strict=True):
        table.add_column(head, no_wrap=True, min_width=width, justify="right" if head == "steps" else "left")
    table.add_column("origin / command", overflow="ellipsis", no_wrap=True, max_width=room)
    for run_id, started, status, steps, what in rows:
        what = what if len(what) <= room else what[: room - 1] + "…"
        table.add_row(run_id, started, f"[{_COLOURS.get(status, 'white')}]{status}[/]", steps, what)
    out.print(table)
    return 0


def show_main(args: argparse.Namespace) -> int:
    if args.json:
        check_json_path(args.json)
    store, run = store_and_run(args.run, args.store)
    try:
        record = store.get(run)
        steps = store.steps(record.id)
    finally:
        store.close()
    out = console()
    out.print(f"run [bold]{record.id}[/] ({record.status}): {record.command or ''}")
    env = record.env
    out.print(f"  torch {env.get('torch')}, python {env.get('python')}, device {env.get('device')}, "
              f"default dtype {env.get('default_dtype')}, deterministic {env.get('deterministic_algorithms')}")
    out.print(f"  {plural(record.steps, 'step')}, {record.skipped_steps} skipped by GradScaler")
    if steps:
        last = steps[-5:]
        out.print("  last steps: " + "; ".join(
            f"{s.step}: loss {_num(s.loss)} grad-norm {_num(s.grad_norm)}" + (" (skipped)" if s.skipped else "")
            for s in last))
    incident = record.incident
    if incident is not None:
        print_incident(incident, out)
    elif record.status == "running":
        out.print(f"  [cyan]still running[/] (pid {record.pid} on {record.host}); data up to its last commit is shown")
    elif record.status == "died":
        out.print(f"  [red]the process died[/] (pid {record.pid} on {record.host} is gone) before the run ended; "
                  "data up to its last commit is shown")
    elif record.status in ("interrupted", "terminated"):
        out.print(f"  [yellow]{record.status}[/] by a signal; everything recorded before it is shown")
    else:
        out.print("  [green]no NaN/Inf incident[/]")
    if args.json:
        write_json(args.json, record.result or {"status": record.status, "run_id": record.id})
    return 3 if incident is not None else 0


def _num(x: float | None) -> str:
    return "nan/none" if x is None else f"{x:.4g}"
