"""``floatscope compare TARGET --runtime onnxruntime``: PyTorch against the deployment runtime."""

from __future__ import annotations

import argparse
from typing import Any

from floatscope._cli.render import console, fmt_num, write_json
from floatscope._cli.target import load_target
from floatscope._errors import UsageError

__all__ = ["add_parser"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("compare", help="compare PyTorch with ONNX Runtime module by module (fp32 or fp16 deployment)",
                       description="TARGET is path/to/file.py:factory returning (model, example_inputs). Needs "
                                   "pip install 'floatscope[onnx]'.")
    p.add_argument("target", metavar="TARGET")
    p.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--opt-level", default="basic", choices=["none", "basic", "all"],
                   help="ONNX Runtime graph optimizations (default basic)")
    p.add_argument("--atol", type=float, help="absolute tolerance (default 1e-5 fp32, 1e-3 fp16)")
    p.add_argument("--rtol", type=float, help="relative tolerance (default 1e-4 fp32, 1e-2 fp16)")
    p.add_argument("--perturb", type=int, default=0, metavar="N",
                   help="also measure top-1 flips on N noisy copies of the inputs")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--report", metavar="PATH", help="write a self-contained HTML page")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from floatscope._engines.compare import compare_onnxruntime, require_onnx

    require_onnx()  # before loading the target: say what to install first
    if args.perturb < 0:
        raise UsageError("--perturb must be 0 or more")
    model, inputs = load_target(args.target)
    result = compare_onnxruntime(model, inputs, dtype=args.dtype, opt_level=args.opt_level, atol=args.atol,
                                 rtol=args.rtol, perturb=args.perturb)
    _print(result, console())
    if args.json:
        write_json(args.json, result.to_dict())
    if args.report:
        _report(result, args.report)
        console().print(f"report written to {args.report}")
    return 0




def _print(result: Any, out: Any) -> None:
    from rich.table import Table

    table = Table(title=f"PyTorch fp32 vs ONNX Runtime {result.dtype} (opt {result.opt_level}, {result.exporter} "
                        f"exporter): {result.matched_modules}/{result.total_modules} modules matched",
                  title_justify="left")
    for col in ("module", "type", "max abs", "max rel", "max ulp", ""):
        table.add_column(col, no_wrap=col != "module")
    for m in result.modules:
        mark = "[green]ok[/]" if m.passed else "[red]DIVERGES[/]"
        if m.name == result.first_divergent:
            mark = "[bold red]FIRST DIVERGENT[/]"
        table.add_row(m.name, m.type, fmt_num(m.max_abs), fmt_num(m.max_rel), fmt_num(m.max_ulp), mark)
    out.print(table)
    tol = result.tolerance
    req = result.required_tolerance
    out.print(f"tolerance atol={tol['atol']:g} rtol={tol['rtol']:g}; would have passed with atol={fmt_num(req['atol'])} "
              f"(rtol 0) or rtol={fmt_num(req['rtol'])} (atol 0)")
    o = result.output
    flips = "-" if o.top1_flip_rate is None else f"{o.top1_flip_rate:.1%}"
    out.print(f"output: max abs {fmt_num(o.max_abs)}, max rel {fmt_num(o.max_rel)}; top-1 flips {flips} over {o.samples} "
              f"samples, max logit change {fmt_num(o.max_logit_change)}")
    out.print(f"graph optimizations change the output by {fmt_num(result.fusion_effect)}; exposing intermediate "
              f"outputs changes it by {fmt_num(result.exposure_effect)}")
    if result.first_divergent:
        out.print(f"[red]first divergent module: {result.first_divergent}[/]")


def _report(result: Any, path: str) -> None:
    from floatscope._report.page import Page, finite_or_none, plotly

    go = plotly()
    page = Page(f"floatscope compare: PyTorch fp32 vs ONNX Runtime {result.dtype}")
    page.paragraph(f"first divergent module: {result.first_divergent or 'none'}; required tolerance "
                   f"{result.required_tolerance}")
    names = [m.name for m in result.modules]
    fig = go.Figure()
    fig.add_bar(name="max abs", x=names, y=finite_or_none([m.max_abs if m.max_abs > 0 else None for m in result.modules]))
    fig.add_bar(name="max rel", x=names, y=finite_or_none([m.max_rel if m.max_rel > 0 else None for m in result.modules]))
    fig.add_hline(y=result.tolerance["atol"], line_dash="dash", annotation_text="atol")
    fig.update_layout(yaxis_type="log", barmode="group", height=420)
    page.figure(fig, "agreement")
    page.table(["module", "type", "max abs", "max rel", "max ulp", "passed"],
               [[m.name, m.type, m.max_abs, m.max_rel, m.max_ulp, m.passed] for m in result.modules])
    page.write(path)
