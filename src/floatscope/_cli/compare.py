"""``floatscope compare TARGET --runtime onnxruntime``: PyTorch against the deployment runtime."""

from __future__ import annotations

import argparse
import math
from typing import Any

from floatscope._cli.render import console, fmt_num, write_json
from floatscope._engines.target import load_target
from floatscope._errors import UsageError

__all__ = ["add_parser"]

_MARKS = {"agrees": "[green]ok[/]", "explained": "[yellow]{dtype} rounding[/]", "divergent": "[red]DIVERGES[/]",
          "nonfinite": "[red]NON-FINITE[/]"}
_WORDS = {"agrees": "agrees", "explained": "explained", "divergent": "diverges", "nonfinite": "non-finite"}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("compare", help="compare PyTorch with ONNX Runtime module by module (fp32 or fp16 deployment)",
                       description="TARGET is path/to/file.py:factory returning (model, example_inputs). Each module "
                                   "is judged against PyTorch float64 by what the deployment format's rounding "
                                   "explains. Needs pip install 'floatscope[onnx]'.")
    p.add_argument("target", metavar="TARGET")
    p.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--opt-level", default="basic", choices=["none", "basic", "all"],
                   help="ONNX Runtime graph optimizations (default basic)")
    p.add_argument("--atol", type=float, help="fixed absolute tolerance for 'passed' (default 1e-5 fp32, 1e-3 fp16)")
    p.add_argument("--rtol", type=float, help="fixed relative tolerance for 'passed' (default 1e-4 fp32, 1e-2 fp16)")
    p.add_argument("--slack", type=float, default=8.0,
                   help="a module is explained while its error is within SLACK times the emulated rounding error "
                        "of the deployment format (default 8)")
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
    if not args.slack >= 1:
        raise UsageError(f"--slack must be 1 or more, not {args.slack:g}")
    model, inputs = load_target(args.target)
    result = compare_onnxruntime(model, inputs, dtype=args.dtype, opt_level=args.opt_level, atol=args.atol,
                                 rtol=args.rtol, perturb=args.perturb, slack=args.slack)
    _print(result, console())
    if args.json:
        write_json(args.json, result.to_dict())
    if args.report:
        _report(result, args.report)
        console().print(f"report written to {args.report}")
    return 0


def _output_lines(result: Any) -> list[str]:
    """Output agreement, fixed tolerance and the two graph effects, as the text and the page show them."""
    o, tol, req = result.output, result.tolerance, result.required_tolerance
    if o.top1_flip_rate is None:
        top1 = "no class axis to compare top-1 predictions on"
    else:
        top1 = (f"top-1 agreement {o.top1_agreement:.1%} ({o.flipped} of {o.predictions} predictions flipped"
                f"{', counting non-finite rows as flipped' if o.nonfinite else ''})")
    nonfinite = f"; {o.nonfinite} non-finite values" if o.nonfinite else ""
    fusion_rel = "" if result.fusion_effect_rel is None else f" (normwise {fmt_num(result.fusion_effect_rel)})"
    exposure_rel = "" if result.exposure_effect_rel is None else f" (normwise {fmt_num(result.exposure_effect_rel)})"
    output = (f"output: {top1}; normwise error {fmt_num(o.rel_error)} against PyTorch float64, {result.dtype} "
              f"rounding explains up to {fmt_num(o.explained_rel_error)}; max abs {fmt_num(o.max_abs)} and max logit "
              f"change {fmt_num(o.max_logit_change)} against PyTorch fp32{nonfinite}")
    failing = sum(1 for m in result.modules if not m.passed)
    verdict = "every module passes it" if not failing else f"{failing} of {len(result.modules)} module(s) fail it"
    slack = (f"every module would have been explained with slack {fmt_num(result.required_slack)} "
             f"(used {result.budget.slack:g})" if result.required_slack is not None and
             math.isfinite(result.required_slack) else "non-finite values cannot be explained by any slack")
    tolerance = (f"fixed tolerance atol={tol['atol']:g} rtol={tol['rtol']:g} (the 'passed' column): {verdict}; it "
                 f"would pass with atol={fmt_num(req['atol'])} (rtol 0) or rtol={fmt_num(req['rtol'])} (atol 0); "
                 f"{slack}")
    other = "all" if result.opt_level != "all" else "none"
    effects = (f"fusion effect: graph optimizations ({result.opt_level} against {other}) change the output by "
               f"{fmt_num(result.fusion_effect)} max abs{fusion_rel}; exposure effect: exposing intermediate outputs "
               f"changes it by {fmt_num(result.exposure_effect)}{exposure_rel}")
    return [output, tolerance, effects]


def _print(result: Any, out: Any) -> None:
    from rich.table import Table

    table = Table(title=f"PyTorch float64 vs ONNX Runtime {result.dtype} (opt {result.opt_level}, {result.exporter} "
                        f"exporter): {result.matched_modules}/{result.total_modules} modules matched",
                  title_justify="left")
    for col in ("module", "type", "normwise err", "explained", "ulp err", "explained ulps", "max abs", "headroom",
                "verdict"):
        table.add_column(col, no_wrap=col != "module")
    for m in result.modules:
        mark = _MARKS[m.verdict].format(dtype=result.dtype)
        if m.name == result.first_divergent:
            mark = "[bold red]FIRST NON-FINITE[/]" if m.verdict == "nonfinite" else "[bold red]FIRST DIVERGENT[/]"
        table.add_row(m.name, m.type, fmt_num(m.rel_error), fmt_num(m.explained_rel_error), fmt_num(m.ulp_error),
                      fmt_num(m.explained_ulp_error), fmt_num(m.max_abs), _bits(m.headroom_bits), mark)
    out.print(table)
    out.print("normwise err = ||y - r||/||r|| against PyTorch float64; ulp err = max |y - r| in ULPs of "
              f"{result.dtype} at the module's largest value; explained = what {result.dtype} rounding explains "
              f"({result.budget.slack:g}x an emulation with every op correctly rounded); headroom = bits of range left",
              highlight=False)
    for line in _output_lines(result):
        out.print(line, highlight=False)
    findings = result.findings()
    for line in findings:
        out.print(f"[red]{line}[/]", highlight=False)
    if not findings:
        out.print(f"[green]no module disagrees beyond what {result.dtype} rounding explains[/]")


def _bits(value: float) -> str:
    return "inf" if value == float("inf") else ("-inf" if value == float("-inf") else f"{value:.1f} b")


def _report(result: Any, path: str) -> None:
    from floatscope._report.page import Page, finite_or_none, plotly

    plotly()  # says how to install plotly when it is missing
    from plotly.subplots import make_subplots
    page = Page(f"floatscope compare: PyTorch vs ONNX Runtime {result.dtype}")
    page.heading("Findings")
    findings = result.findings()
    for line in findings:
        page.paragraph(line, css="bad")
    if not findings:
        page.paragraph(f"No module disagrees beyond what {result.dtype} rounding explains.", css="ok")
    page.heading("Output agreement and graph effects")
    for line in _output_lines(result):
        page.paragraph(line)
    o = result.output
    page.table(["measure", "value"], [
        ["top-1 agreement", "-" if o.top1_agreement is None else f"{o.top1_agreement:.2%}"],
        ["flipped predictions", "-" if o.flipped is None else f"{o.flipped} of {o.predictions}"],
        ["normwise output error against float64", o.rel_error],
        [f"explained by {result.dtype} rounding up to", o.explained_rel_error],
        ["non-finite output values", o.nonfinite],
        ["max abs against PyTorch fp32", o.max_abs],
        ["max logit change against PyTorch fp32", o.max_logit_change],
        ["fusion effect (max abs / normwise)", f"{fmt_num(result.fusion_effect)} / {fmt_num(result.fusion_effect_rel)}"],
        ["exposure effect (max abs / normwise)",
         f"{fmt_num(result.exposure_effect)} / {fmt_num(result.exposure_effect_rel)}"],
    ])

    page.heading("Module by module")
    names = [m.name for m in result.modules]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("normwise relative error against PyTorch float64",
                                        "largest absolute error against PyTorch fp32"))
    colours = {"agrees": "#2b8a3e", "explained": "#e67700", "divergent": "#c92a2a", "nonfinite": "#000000"}
    fig.add_bar(name="ONNX Runtime", x=names, y=finite_or_none([m.rel_error or None for m in result.modules]),
                marker_color=[colours[m.verdict] for m in result.modules],
                hovertext=[m.verdict for m in result.modules], row=1, col=1)
    fig.add_scatter(name=f"explained by {result.dtype} rounding", x=names,
                    y=finite_or_none([m.explained_rel_error for m in result.modules]), mode="lines+markers",
                    line={"dash": "dash", "color": "#495057"}, row=1, col=1)
    broken = [m.name for m in result.modules if m.verdict == "nonfinite"]
    if broken:  # no bar can show Inf: mark those modules above the others
        finite = [v for m in result.modules for v in (m.rel_error, m.explained_rel_error) if 0 < v < float("inf")]
        fig.add_scatter(name="non-finite output", x=broken, y=[2 * max(finite, default=1.0)] * len(broken),
                        mode="markers", marker={"symbol": "x", "size": 12, "color": colours["nonfinite"]}, row=1, col=1)
    fig.add_bar(name="max |y − r32|", x=names, y=finite_or_none([m.max_abs or None for m in result.modules]),
                marker_color="#1c7ed6", row=2, col=1)
    fig.add_hline(y=result.tolerance["atol"], line_dash="dot", annotation_text=f"atol {result.tolerance['atol']:g}",
                  row=2, col=1)
    fig.update_yaxes(type="log", title_text="‖y − r‖ / ‖r‖ (relative)", row=1, col=1)
    fig.update_yaxes(type="log", title_text="max |y − r| (absolute)", row=2, col=1)
    fig.update_xaxes(title_text="module (execution order)", row=2, col=1)
    fig.update_layout(height=640, legend={"orientation": "h", "y": -0.25})
    page.figure(fig, "agreement")
    page.paragraph("Bars are coloured by verdict (green agrees, orange explained by rounding, red diverges, black "
                   "non-finite); a missing bar is an exact match or a non-finite value, which the table spells out.")
    page.table(["module", "type", "verdict", "normwise error", "explained up to", "ulp error", "explained ulps",
                "max abs (fp32)", "max rel (fp32)", "headroom bits", "passed fixed tolerance"],
               [[m.name, m.type, _WORDS[m.verdict], m.rel_error, m.explained_rel_error,
                 m.ulp_error, m.explained_ulp_error, m.max_abs, m.max_rel, m.headroom_bits, m.passed]
                for m in result.modules])
    b = result.budget
    emulation = (f"an emulation with weights, inputs and every op correctly rounded to {result.dtype}"
                 if b.emulation == "rounded" else "the model in PyTorch float32")
    page.paragraph(f"Reference: PyTorch {b.reference}. Explained error: {b.slack:g} × the error of {emulation}, at least {b.floor_rel:.3g} normwise (the unit roundoff) and {b.floor_ulp:g} ULP elementwise. "
                   f"ULP errors are measured at each module's largest value, so elements near zero cannot decide.")
    page.write(path)
