"""The precision report: error per module, local error vs amplification, headroom, growth over time."""

from __future__ import annotations

import math
from pathlib import Path

from floatscope._engines.precision import PrecisionResult
from floatscope._report.page import Page, finite_or_none, plotly

__all__ = ["write_precision_report"]


def write_precision_report(result: PrecisionResult, path: str | Path) -> Path:
    go = plotly()
    page = Page(f"floatscope precision: {result.dtype} ({result.mode}) against float64")
    page.paragraph(
        f"Output relative error {result.output_error:.3g} (tolerance {result.tolerance:.3g}); "
        f"{result.output_nonfinite} non-finite output values. Flagged modules: "
        f"{', '.join(result.flagged) or 'none'}.", css="bad" if result.flagged else "ok")
    rec = result.recommendation
    if rec is not None:
        page.heading("Recommendation")
        page.paragraph(
            f"Keep {rec.keep_fp32 or 'no module'} in float32: output error {rec.output_error_before:.3g} -> "
            f"{rec.output_error_after:.3g} ({'meets' if rec.tolerance_met else 'does not meet'} the tolerance "
            f"{rec.tolerance:.3g}); {rec.fp32_param_fraction:.1%} of parameters stay in float32; "
            f"{rec.evaluations} verification runs.", css="ok" if rec.tolerance_met else "bad")
        if rec.reason:
            page.paragraph(rec.reason)
        page.code(rec.snippet)
    modules = [m for m in result.modules if m.name]
    names = [m.name for m in modules]
    flagged = set(result.flagged)
    labels = [f"<b>{n}</b> ⚑" if n in flagged else n for n in names]
    # Horizontal bars: one row per module, names readable however many there are; flagged rows in bold.
    height = max(320, 60 + 26 * len(modules))

    page.heading("Error per module")
    page.paragraph("Propagated error: the low-precision run against float64 at the module's output. Local error: "
                   "the module alone, on float64 inputs rounded to the target. The dashed line is the tolerance; "
                   "⚑ marks the flagged modules. Missing bars are non-finite values (see the table).")
    fig = go.Figure()
    fig.add_bar(name="propagated error", y=labels, x=finite_or_none([m.propagated_error for m in modules]),
                orientation="h")
    fig.add_bar(name="local error", y=labels, x=finite_or_none([m.local_error for m in modules]), orientation="h",
                marker_color=["#d62728" if n in flagged else "#ff7f0e" for n in names])
    fig.add_vline(x=result.tolerance, line_dash="dash", line_color="#444",
                  annotation_text=f"tolerance {result.tolerance:.3g}", annotation_position="top")
    fig.update_layout(barmode="group", xaxis_type="log", xaxis_title="relative error (log scale)",
                      yaxis_title="module", yaxis_autorange="reversed", height=height,
                      xaxis_exponentformat="power", legend_orientation="h", legend_y=-0.15)
    page.figure(fig, "error-per-module")

    page.heading("Local error against amplification")
    page.paragraph("Top right: modules that lose bits themselves and also amplify what they receive.")
    pts = [m for m in modules if m.amplification is not None and math.isfinite(m.local_error) and m.local_error > 0]
    fig = go.Figure(go.Scatter(x=[m.local_error for m in pts], y=[m.amplification for m in pts],
                               text=[m.name for m in pts], mode="markers+text", textposition="top center"))
    fig.update_layout(xaxis_type="log", yaxis_type="log", xaxis_title="local error (log scale)",
                      yaxis_title="amplification (error out / error in)", height=420,
                      xaxis_exponentformat="power", yaxis_exponentformat="power")
    page.figure(fig, "local-vs-amplification")

    page.heading("Headroom to the format's limits")
    page.paragraph("Bits between each module's largest reference output and the format's max (0 = overflow). "
                   "Modules under the dashed line (1 bit) are flagged: a slightly larger input overflows them. "
                   "The markers give the fraction of outputs below the smallest normal (flushed or subnormal).")
    fig = go.Figure()
    bits = [m.headroom_bits for m in modules]
    fig.add_bar(name="headroom (bits)", y=labels, x=finite_or_none(bits), orientation="h",
                marker_color=["#d62728" if b < 1.0 else "#1f77b4" for b in bits],
                text=[f"{b:.2g}" if math.isfinite(b) else "" for b in bits], textposition="outside")
    fig.add_scatter(name="fraction below smallest normal", y=labels, x=[m.subnormal_fraction for m in modules],
                    xaxis="x2", mode="markers", marker_symbol="diamond")
    fig.add_vline(x=1.0, line_dash="dash", line_color="#d62728", annotation_text="1 bit: flagged",
                  annotation_position="bottom right")
    fig.update_layout(xaxis_title="bits to the format's max", yaxis_title="module", yaxis_autorange="reversed",
                      height=height, legend_orientation="h", legend_y=-0.15,
                      xaxis2={"overlaying": "x", "side": "top", "title": "fraction below smallest normal",
                              "range": [0, 1], "dtick": 0.25, "tickformat": ".2f", "showgrid": False})
    page.figure(fig, "headroom")

    page.heading("Error growth over time steps")
    if result.accumulations:
        fig = go.Figure()
        for acc in result.accumulations:
            label = acc.module or "<output>"
            fig.add_scatter(name=f"{label} ({acc.describe()})",
                            y=finite_or_none(acc.error), mode="lines")
        fig.update_layout(xaxis_title="time step", yaxis_title="relative error (log scale)", yaxis_type="log",
                          height=420, yaxis_exponentformat="power")
        page.figure(fig, "accumulation")
    else:
        page.paragraph("No recurrent module or --sequence-dim: nothing to plot over time.")

    page.heading("Modules")
    page.table(["module", "type", "calls", "propagated", "local", "amplification", "bits", "max ulp", "headroom",
                "below normal", "non-finite"],
               [[m.name or "<root>", m.type, m.calls, m.propagated_error, m.local_error, m.amplification,
                 m.bits_correct, m.max_ulp, m.headroom_bits, m.subnormal_fraction, m.nonfinite]
                for m in result.modules])
    return page.write(path)
