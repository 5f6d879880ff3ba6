"""``floatscope`` entry point: parses arguments and dispatches to one module per subcommand."""

from __future__ import annotations

import argparse
import sys

from floatscope._cli import compare, demo, determinism, formats, health_cmds, precision, run, store_cmds
from floatscope._cli import lint
from floatscope._cli import gradcheck
from floatscope._cli.render import check_json_path, fail
from floatscope._errors import FloatscopeError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="floatscope",
        description="Find, explain and fix floating-point failures in PyTorch models.",
        epilog=("Exit status of every command: 0 success (no incident, no finding), 2 bad input or a missing "
                "optional dependency, 3 a NaN/Inf incident (floatscope run, show), 1 findings (floatscope lint) or a "
                "failed check (floatscope gradcheck), 4 floatscope lint could not analyse a statement (an internal "
                "error, reported as FS002). floatscope run adds 1 (the script failed), 130 (SIGINT), "
                "143 (SIGTERM) and the script's own sys.exit status; see 'floatscope run --help'."),
    )
    from floatscope import __version__

    parser.add_argument("--version", action="version", version=f"floatscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run.add_parser(sub)
    store_cmds.add_parsers(sub)
    health_cmds.add_parsers(sub)
    precision.add_parser(sub)
    compare.add_parser(sub)
    determinism.add_parser(sub)
    formats.add_parser(sub)
    lint.add_parser(sub)
    gradcheck.add_parser(sub)
    demo.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # "--value -1e-8" / "--value -inf": argparse reads a token that starts with "-" as an option unless it
    # looks like a plain negative number; a number after --value is always its argument.
    for i, token in enumerate(argv[:-1]):
        if token == "--value" and argv[i + 1].startswith("-") and _is_number(argv[i + 1]):
            argv[i:i + 2] = [f"--value={argv[i + 1]}"]
            break
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        json_path = getattr(args, "json", None)
        if isinstance(json_path, str):
            check_json_path(json_path)  # before any work: a script must not train to the end for nothing
        return int(args.handler(args))
    except FloatscopeError as exc:
        if isinstance(exc, (ValueError, OSError, ImportError)):
            return fail(str(exc))
        raise


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
