"""``floatscope formats [--value V]``: the float formats, and how a value is stored in each."""

from __future__ import annotations

import argparse
import math
from typing import Any

from floatscope._cli.render import console
from floatscope._errors import UsageError

__all__ = ["add_parser"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("formats", help="print the float formats, or how a value is stored in each")
    p.add_argument("--value", metavar="V", help="a number to round into every format (e.g. 0.1, 65519, 1e-8)")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from rich.table import Table

    from floatscope._numerics.errors import round_to_format
    from floatscope._numerics.formats import FORMATS

    out = console()
    if args.value is None:
        from rich import box

        table = Table(title="floating-point formats (exp, man: exponent and stored mantissa bits)",
                      title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        rows = [[f.name, str(f.bits), str(f.exponent_bits), str(f.mantissa_bits), f"{f.eps:.3g}", f"{f.max:.4g}",
                 f"{f.smallest_normal:.3g}", f"{f.smallest_subnormal:.3g}", f"{f.decimal_digits:.2f}"]
                for f in FORMATS.values()]
        heads = ("format", "bits", "exp", "man", "epsilon", "max", "min normal", "min subnormal", "digits")
        for k, col in enumerate(heads):
            # Values are never cut or folded (a narrow terminal wraps the headers instead).
            table.add_column(col, justify="right" if k else "left", no_wrap=False,
                             min_width=max(len(r[k]) for r in rows))
        for r in rows:
            table.add_row(*r)
        out.print(table)
        return 0
    try:
        value = float(args.value)
    except ValueError:
        raise UsageError(f"--value '{args.value}' is not a number") from None
    table = Table(title=f"{args.value} stored in each format", title_justify="left")
    for col in ("format", "stored value", "relative error", "status"):
        table.add_column(col, no_wrap=True)
    for f in FORMATS.values():
        stored = round_to_format(value, f)
        if math.isinf(stored) and math.isfinite(value):
            status, err = f"[red]overflows[/] (max {f.max:.4g})", "inf"
        elif math.isnan(stored) and not math.isnan(value):
            status, err = f"[red]overflows to NaN[/] (max {f.max:.4g}, no inf in this format)", "nan"
        elif abs(stored) == f.max and abs(value) > f.max * (1 + f.eps / 2):
            limit = f"{'-' if stored < 0 else ''}{f.max:.4g}"
            status = (f"[red]saturates[/] at {limit} (no inf in this format)" if math.isinf(value)
                      else f"[red]saturates[/] at {limit}")
            err = "inf" if math.isinf(value) else f"{abs(stored - value) / abs(value):.3g}"
        elif stored == 0.0 and value != 0.0:
            status, err = f"[red]flushes to 0[/] (smallest subnormal {f.smallest_subnormal:.3g})", "1"
        else:
            rel = abs(stored - value) / abs(value) if value not in (0.0,) and math.isfinite(value) else 0.0
            err = f"{rel:.3g}"
            status = ("[yellow]subnormal[/] (lost precision)" if 0 < abs(stored) < f.smallest_normal
                      else ("exact" if rel == 0 else "rounded"))
        table.add_row(f.name, repr(stored), err, status)
    out.print(table)
    return 0
