"""``floatscope precision TARGET``: what fp16/bf16/fp32 cost a model, module by module."""

from __future__ import annotations

import argparse
from typing import Any

from floatscope._cli.render import console, fmt_num, write_json
from floatscope._engines.target import load_target
from floatscope._errors import UsageError

__all__ = ["add_parser"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("precision", help="measure fp16/bf16/fp32 error per module and op against float64",
                       description="TARGET is path/to/file.py:factory; factory() returns (model, example_inputs).")
    p.add_argument("target", metavar="TARGET")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--mode", default="cast", choices=["cast", "autocast"],
                   help="cast: model and inputs in DTYPE; autocast: float32 model under torch.autocast(DTYPE)")
    p.add_argument("--tolerance", type=float, metavar="X",
                   help="output relative error to meet (default: 1e-2 fp16, 5e-2 bf16, 1e-5 fp32)")
    p.add_argument("--sequence-dim", type=int, metavar="D", help="report the output's error per step along dim D")
    p.add_argument("--sequence-module", action="append", default=[], metavar="NAME",
                   help="also report this module's error per step along --sequence-dim (repeatable)")
    p.add_argument("--no-search", action="store_true", help="skip the ranking runs and the policy search")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON")
    p.add_argument("--report", metavar="PATH", help="write a self-contained HTML report with plots")
    p.add_argument("--top", type=int, default=15, metavar="N", help="modules shown in the terminal (default 15)")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from floatscope._engines.precision import analyze

    if args.tolerance is not None and not (args.tolerance > 0):
        raise UsageError("--tolerance must be a positive number")
    model, inputs = load_target(args.target)
    result = analyze(model, inputs, dtype=args.dtype, mode=args.mode, tolerance=args.tolerance,
                     sequence_dim=args.sequence_dim, sequence_modules=args.sequence_module,
                     search=not args.no_search)
    _print(result, console(), args.top)
    if args.json:
        write_json(args.json, result.to_dict())
    if args.report:
        from floatscope._report.precision import write_precision_report

        write_precision_report(result, args.report)
        console().print(f"report written to {args.report}")
    return 0




def _print(result: Any, out: Any, top: int) -> None:
    from rich.table import Table

    table = Table(title=f"{result.dtype} ({result.mode}) against float64: output error {fmt_num(result.output_error)}"
                        f" (tolerance {fmt_num(result.tolerance)})", title_justify="left")
    for col in ("rank", "module", "type", "propagated", "local", "amplif.", "bits", "max ulp", "headroom", "non-fin"):
        table.add_column(col, no_wrap=col not in ("module",), justify="left" if col in ("module", "type") else "right")
    order = {name: i for i, name in enumerate(result.ranking)}
    modules = sorted((m for m in result.modules if m.name), key=lambda m: order.get(m.name, len(order)))
    for m in modules[:top]:
        flag = "[red]" if m.name in result.flagged else ""
        table.add_row(str(order.get(m.name, -1) + 1), f"{flag}{m.name}", m.type, fmt_num(m.propagated_error),
                      fmt_num(m.local_error), fmt_num(m.amplification), f"{m.bits_correct:.1f}", fmt_num(m.max_ulp),
                      fmt_num(m.headroom_bits), str(m.nonfinite))
    out.print(table)
    if result.flagged:
        out.print(f"[red]flagged[/]: {', '.join(result.flagged)} (local error above tolerance, or within 1 bit "
                  f"of the format's max)")
    else:
        out.print("[green]nothing flagged[/]")
    for acc in result.accumulations[:3]:
        out.print(f"error over {len(acc.error)} time steps in '{acc.module or '<output>'}': {fmt_num(acc.error[0])} -> "
                  f"{fmt_num(acc.error[-1])}, {acc.describe()}")
    rec = result.recommendation
    if rec is not None:
        verdict = "[green]meets[/]" if rec.tolerance_met else "[red]does not meet[/]"
        out.print(f"keep in float32: {rec.keep_fp32 or 'nothing'}; output error {fmt_num(rec.output_error_before)} -> "
                  f"{fmt_num(rec.output_error_after)}, {verdict} {fmt_num(rec.tolerance)}; "
                  f"{rec.fp32_param_fraction:.1%} of parameters in float32")
        if rec.reason:
            out.print(rec.reason, highlight=False, markup=False)
        out.print(rec.snippet, highlight=False, markup=False)
