"""``floatscope run [OPTIONS] SCRIPT [ARGS...]``: run a training script unchanged, watched."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
import runpy
import sys
import traceback
from pathlib import Path
from typing import Any

from floatscope._cli.render import console, print_result, write_json
from floatscope._errors import NonFiniteError, Terminated, UsageError
from floatscope._results import RunResult
from floatscope._store.sqlite import DEFAULT_STORE

__all__ = ["add_parser", "main", "run_script", "EXIT_INCIDENT"]

EXIT_CLEAN = 0
EXIT_SCRIPT_ERROR = 1
EXIT_USAGE = 2
EXIT_INCIDENT = 3
EXIT_INTERRUPTED = 130   # 128 + SIGINT
EXIT_TERMINATED = 143    # 128 + SIGTERM
EXIT_CODES = """exit status:
  0    the script finished and every watched value stayed finite
  1    the script raised, or exited 1 (or with the incident status, which is floatscope's)
  2    bad floatscope input: arguments, store, --json path (a message says what and how to fix it)
  3    a NaN/Inf incident was found (--incident-exit-code N to choose another status)
  130  interrupted (SIGINT, Ctrl-C); the run is recorded as interrupted
  143  terminated (SIGTERM: SLURM, docker stop, kill); the run is recorded as terminated
  N    any other status the script passed to sys.exit(N)
The JSON "status" field is the source of truth: clean, nonfinite, error, unwatched, interrupted or terminated."""


def add_store_option(parser: argparse.ArgumentParser, *, reads: bool = False) -> None:
    what = "to read (opened read-only; never created)" if reads else "to record into"
    parser.add_argument("--store", default=str(DEFAULT_STORE), metavar="PATH",
                        help=f"run store (SQLite) {what} (default: {DEFAULT_STORE})")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="run a training script unchanged and find where the first NaN/Inf is born",
                       description="Run SCRIPT as 'python SCRIPT ARGS' would, watching every model, optimizer and "
                                   "GradScaler it uses.",
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="write the result as JSON to PATH")
    add_store_option(p)
    p.add_argument("--no-store", action="store_true", help="do not record the run in a store")
    p.add_argument("--keep-going", action="store_true",
                   help="record the first incident and let the script continue instead of stopping it")
    p.add_argument("--max-consecutive-skips", type=int, default=32, metavar="N",
                   help="GradScaler skips in a row that count as a loss-scale collapse (default 32)")
    p.add_argument("--no-replay", action="store_true", help="do not replay a failing step to name the op")
    p.add_argument("--exact-optimizer", action="store_true",
                   help="copy parameters and optimizer state before each step so an optimizer-made NaN/Inf is "
                        "replayed op by op (costs a copy of the optimizer's memory per step)")
    p.add_argument("--health-every", type=int, default=None, metavar="N",
                   help="sample per-layer health every N steps (0 = off; default 50)")
    p.add_argument("--incident-exit-code", type=int, default=EXIT_INCIDENT, metavar="N",
                   help=f"exit status for a NaN/Inf incident (default {EXIT_INCIDENT}; 3-255, not 130 or 143)")
    p.add_argument("--sync", choices=("auto", "step", "lazy"), default="auto",
                   help="when to read the device: auto (at each step on the CPU, one step late on a GPU, which "
                        "never waits), step (at each step: exact replays on a GPU too), lazy (always one step late)")
    p.add_argument("script", help="the Python script to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    p.set_defaults(handler=main)


def run_script(script: str | os.PathLike[str], argv: list[str], *, store: str | None, keep_going: bool = False,
               replay: bool = True, max_consecutive_skips: int = 32, run_name: str | None = None,
               health_every: int | None = None, exact_optimizer: bool = False,
               sync: str = "auto", incident_exit_code: int = EXIT_INCIDENT) -> tuple[int, RunResult]:
    """Run ``script`` as ``__main__`` under a global watch; return (exit status, result).

    Exit statuses: see ``EXIT_CODES``. ``incident_exit_code`` is the status for a NaN/Inf incident; a
    script that exits with that status itself gets 1 instead, so the two never read the same.

    The script's ``sys.argv``, ``sys.path[0]`` and working directory are what ``python SCRIPT ARGS``
    would give it; all are restored afterwards.
    """
    from floatscope._engines.watch import DEFAULT_HEALTH_EVERY, Watch

    path = Path(script)
    if not path.is_file():
        raise UsageError(f"script '{script}' does not exist or is not a file")
    if max_consecutive_skips < 1:
        raise UsageError("--max-consecutive-skips must be at least 1")
    if health_every is not None and health_every < 0:
        raise UsageError("--health-every must be 0 (off) or a positive number of steps")
    from floatscope._store.sqlite import RunStore

    command = " ".join(["floatscope", "run", str(script), *argv])
    run_store = RunStore(store) if store is not None else None  # a bad store fails here, before the script runs
    watcher = Watch(None, None, on_anomaly="record" if keep_going else "raise", store=run_store,
                    run_name=run_name or path.stem, command=command, replay=replay,
                    max_consecutive_skips=max_consecutive_skips,
                    health_every=DEFAULT_HEALTH_EVERY if health_every is None else health_every,
                    exact_optimizer=exact_optimizer, sync=sync)  # type: ignore[arg-type]
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [str(path), *argv]
    sys.path.insert(0, str(path.resolve().parent))
    code = EXIT_CLEAN
    script_code: int | None = None
    try:
        try:
            with watcher:
                runpy.run_path(str(path), run_name="__main__")
        except NonFiniteError:
            code = incident_exit_code
        except SystemExit as exc:
            script_code = code = _exit_code(exc.code)
        except KeyboardInterrupt:
            code = EXIT_INTERRUPTED
        except Terminated:
            code = EXIT_TERMINATED
        except BaseException as exc:  # the script's own failure: show its traceback, as python would
            _print_script_traceback(exc, path)
            code = EXIT_SCRIPT_ERROR
        finally:
            sys.argv, sys.path = saved_argv, saved_path
        result = watcher.result
        assert result is not None
        if result.incident is not None:
            code = incident_exit_code
        elif code == incident_exit_code:
            # The script's own sys.exit(N) must never read as "NaN/Inf found": N is floatscope's.
            sys.stderr.write(f"floatscope: the script exited with status {code}, which floatscope run reserves for a "
                             f"NaN/Inf incident; exiting {EXIT_SCRIPT_ERROR} instead (the JSON has script_exit_code "
                             f"{code})\n")
            code = EXIT_SCRIPT_ERROR
        result = replace(result, exit_code=code, script_exit_code=script_code)
        watcher.result = result
        if run_store is not None and result.run_id:
            run_store.set_exit_code(result.run_id, code)
    finally:
        if run_store is not None:
            run_store.close()
    return code, result


def _exit_code(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    sys.stderr.write(f"{code}\n")
    return 1


def _print_script_traceback(exc: BaseException, script: Path) -> None:
    tb = exc.__traceback__
    target = str(script.resolve())
    walk = tb
    while walk is not None and os.path.abspath(walk.tb_frame.f_code.co_filename) != target:
        walk = walk.tb_next
    traceback.print_exception(type(exc), exc, walk or tb, file=sys.stderr)


def main(args: argparse.Namespace) -> int:
    store = None if args.no_store else args.store
    if not 3 <= args.incident_exit_code <= 255 or args.incident_exit_code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        raise UsageError(f"--incident-exit-code {args.incident_exit_code}: choose a status from 3 to 255 other than "
                         f"130 (SIGINT) and 143 (SIGTERM); 0, 1 and 2 mean clean, the script failed and bad input")
    code, result = run_script(args.script, args.args, store=store, keep_going=args.keep_going,
                              replay=not args.no_replay, max_consecutive_skips=args.max_consecutive_skips,
                              health_every=args.health_every, exact_optimizer=args.exact_optimizer,
                              sync=args.sync, incident_exit_code=args.incident_exit_code)
    if args.json:  # first: a closed pipe on the terminal output must not lose it
        try:
            write_json(args.json, result.to_dict())
        except UsageError as exc:  # the path broke while the script ran: report it, keep the run's status
            print(f"floatscope: error: {exc} (the run's own exit status {code} is kept)", file=sys.stderr)
    try:
        print_result(result, console(stderr=True), store_path=store)
    except BrokenPipeError:  # floatscope run ... 2>&1 | head
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stderr.fileno())
    return code
