"""``floatscope`` entry point: parses arguments and dispatches to one module per subcommand."""

from __future__ import annotations

import argparse
import sys

from floatscope._cli import compare, demo, determinism, formats, health_cmds, precision, run, store_cmds
from floatscope._cli.render import fail
from floatscope._errors import FloatscopeError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="floatscope",
        description="Find, explain and fix floating-point failures in PyTorch models.",
        epilog="Exit status: 0 clean, 1 the script failed, 2 bad input or a missing optional dependency, "
               "3 a NaN/Inf incident was found.",
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
    demo.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.handler(args))
    except FloatscopeError as exc:
        if isinstance(exc, (ValueError, OSError, ImportError)):
            return fail(str(exc))
        raise


if __name__ == "__main__":
    sys.exit(main())
