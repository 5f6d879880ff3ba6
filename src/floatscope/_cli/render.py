"""Terminal rendering (rich, imported lazily)."""

from __future__ import annotations

import sys
from typing import Any

from floatscope._results import Incident, RunResult

__all__ = ["console", "print_incident", "print_result", "check_json_path", "write_json", "plural", "step_span"]


def console(stderr: bool = False) -> Any:
    """A rich console; when writing to a pipe or file, 160 columns, so tables are not squeezed."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 160
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)


def print_incident(incident: Incident, out: Any) -> None:
    """A panel with the full diagnosis."""
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    what = "NaN" if incident.kind == "nan" else "Inf"
    if incident.category == "parameter":
        title = (f"[bold red]{what} in parameter[/] [bold]{incident.param}[/] before step [bold]{incident.step}[/] "
                 "used it")
    else:
        title = f"[bold red]first {what}[/] born in [bold]{incident.phase}[/] at step [bold]{incident.step}[/]"
    body = Table.grid(padding=(0, 1))
    body.add_column(style="bold cyan", no_wrap=True)
    body.add_column(overflow="fold")
    op = incident.op + (f"  (autograd node {incident.backward_node})" if incident.backward_node else "")
    body.add_row("op", Text(op, style="bold"))
    if incident.module is not None:
        body.add_row("module", (incident.module or "<root>") + (f" of {incident.model}" if incident.model else ""))
    if incident.param:
        body.add_row("parameter", incident.param)
    body.add_row("where", f"{incident.file}:{incident.line}")
    if incident.code:
        body.add_row("", Text(incident.code, style="yellow"))
    category = incident.category + ("" if incident.exact else "  (not replayed to an op: see why)")
    body.add_row("category", Text(category, style="magenta"))
    for i, operand in enumerate(incident.operands):
        body.add_row(f"input {i}", operand.describe())
    if incident.output is not None:
        body.add_row("output", incident.output.describe())
    for line in incident.optimizer_state:
        body.add_row("state", line)
    body.add_row("why", incident.explanation)
    if incident.consequence:
        body.add_row("then", incident.consequence)
    for k, fix in enumerate(incident.suggestions):
        body.add_row("fix" if k == 0 else "", Text("- " + fix, style="green"))
    if incident.replay_seconds is not None:
        body.add_row("replay", f"{incident.replay_seconds:.2f} s")
    out.print(Panel(body, title=title, title_align="left", border_style="red", expand=False))


def print_result(result: RunResult, out: Any, *, store_path: str | None = None) -> None:
    """The end-of-run summary line, and the incident when there is one."""
    if result.incident is not None:
        print_incident(result.incident, out)
    if result.status == "unwatched":
        out.print("[yellow]nothing was watched[/]: no model call, torch call, backward() or optimizer step ran "
                  "under floatscope (is the training in another process or thread?)")
        return
    colour = {"clean": "green", "nonfinite": "red", "error": "yellow"}.get(result.status, "yellow")
    scale = f", loss scale {result.loss_scale:g}" if result.loss_scale is not None else ""
    where = f" in {store_path}" if store_path and result.run_id else ""
    out.print(f"[{colour}]{result.status}[/]: {plural(result.steps, 'step')}, {result.skipped_steps} skipped by GradScaler"
              f"{scale}; run [bold]{result.run_id or '-'}[/]{where}")
    for c in result.contained:
        what = "NaN" if c.kind == "nan" else "Inf"
        out.print(f"[yellow]note[/]: {what} computed by {c.op} at {c.file}:{c.line} (step {c.step}, {c.category}) "
                  f"never reached a loss, gradient, parameter or a value the script read")


def fail(message: str) -> int:
    """Print one clean error line and return exit status 2."""
    sys.stderr.write(f"floatscope: error: {message}\n")
    return 2


def fmt_num(x: float | None) -> str:
    """A number for a table cell: 3 significant digits; "-" for None; nan/inf spelled out."""
    if x is None:
        return "-"
    if x != x:
        return "nan"
    if x in (float("inf"), float("-inf")):
        return "inf" if x > 0 else "-inf"
    return f"{x:.3g}"


def plural(n: int, noun: str) -> str:
    """``1 step``, ``2 steps``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def step_span(steps: list[int]) -> str:
    """``step 23``, ``steps 23..40``."""
    return "" if not steps else (f"step {steps[0]}" if steps[0] == steps[-1] else f"steps {steps[0]}..{steps[-1]}")


def check_json_path(path: str) -> None:
    """Refuse a ``--json PATH`` that cannot be written, before any work: every command creates a missing folder."""
    import os
    from pathlib import Path

    from floatscope._errors import UsageError

    target = Path(path)
    if target.is_dir():
        raise UsageError(f"--json {path} is a folder; give a file path such as {target / 'result.json'}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--json {path}: cannot create the folder {target.parent}: {exc.strerror or exc}") from None
    if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UsageError(f"--json {path}: {'the file' if target.exists() else 'the folder ' + str(target.parent)} "
                         f"is not writable for this user; pick another path")
    if not target.exists():
        # os.access says yes to root everywhere (/proc, read-only bind mounts): create the file to be sure.
        try:
            target.touch(exist_ok=False)
        except FileExistsError:
            return
        except OSError as exc:
            raise UsageError(f"--json {path}: cannot create the file: {exc.strerror or exc}; pick another "
                             f"path") from None
        try:
            target.unlink()
        except OSError:
            pass


def write_json(path: str, data: Any) -> None:
    """Write strict JSON (non-finite floats already null) for a ``--json PATH`` option."""
    import json
    from pathlib import Path

    from floatscope._errors import UsageError

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    except OSError as exc:
        raise UsageError(f"cannot write JSON to {path}: {exc.strerror or exc}") from None
