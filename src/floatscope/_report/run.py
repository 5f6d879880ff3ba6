"""Run reports: loss and loss scale, gradient norms per layer, headroom, findings, incident; run diffs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from floatscope._diagnose.diff import RunDiff, _as_float
from floatscope._diagnose.health import findings_for
from floatscope._report.page import Page, finite_or_none, plotly
from floatscope._store.sqlite import RunStore

__all__ = ["write_run_report", "write_diff_report"]


def _log10(values: list[Any]) -> list[float | None]:
    out: list[float | None] = []
    for v in values:
        if isinstance(v, (int, float)) and math.isfinite(v) and v > 0:
            out.append(math.log10(v))
        else:
            out.append(None)
    return out


def write_run_report(store: RunStore, run_id: str, path: str | Path) -> Path:
    go = plotly()
    record = store.get(run_id)
    steps = store.steps(record.id)
    config = store.config(record.id)
    page = Page(f"floatscope run {record.id} ({record.status})")
    page.paragraph(f"{record.command or ''} - {record.steps} steps, {record.skipped_steps} skipped by GradScaler; "
                   f"torch {record.env.get('torch')} on {record.env.get('device')}")

    page.heading("Loss and loss scale")
    page.paragraph("NaN/Inf losses are drawn as gaps and counted here: "
                   f"{sum(1 for s in steps if s.loss is None or not math.isfinite(s.loss))} non-finite or missing.")
    fig = go.Figure()
    fig.add_scatter(name="loss", x=[s.step for s in steps], y=finite_or_none([s.loss for s in steps]), mode="lines")
    scales = [s for s in steps if s.loss_scale is not None]
    if scales:
        fig.add_scatter(name="loss scale", x=[s.step for s in scales], y=[s.loss_scale for s in scales], yaxis="y2",
                        mode="lines")
        fig.update_layout(yaxis2={"overlaying": "y", "side": "right", "type": "log", "title": "loss scale"})
    skipped = [s.step for s in steps if s.skipped]
    if skipped:
        fig.add_scatter(name="skipped step", x=skipped, y=[None] * 0 + [0] * len(skipped), mode="markers")
    finite = [s.loss for s in steps if s.loss is not None and math.isfinite(s.loss) and s.loss > 0]
    wide = bool(finite) and max(finite) / min(finite) > 1e3  # a diverging run: show every decade
    fig.update_layout(xaxis_title="step", yaxis_title="loss" + (" (log scale)" if wide else ""), height=380,
                      yaxis_type="log" if wide else "linear")
    page.figure(fig, "loss")

    page.heading("Gradient norm per layer")
    grads = store.fingerprints(record.id, "grad")
    names = config.fingerprint_params
    if grads and names:
        ordered = sorted(grads)
        z = [[None] * len(ordered) for _ in names]
        for j, step in enumerate(ordered):
            for i, value in enumerate(_log10([_as_float(v) for v in grads[step]])[: len(names)]):
                z[i][j] = value
        fig = go.Figure(go.Heatmap(z=z, x=ordered, y=names, colorscale="Viridis",
                                   colorbar={"title": "log10 |grad|"}))
        fig.update_layout(xaxis_title="step", height=max(300, 18 * len(names) + 120))
        page.figure(fig, "grad-heatmap")
    else:
        page.paragraph("No gradient fingerprints were recorded (no optimizer step, or no store).")

    page.heading("Headroom per layer")
    rows = store.activations(record.id)
    if rows:
        layers: dict[str, tuple[float, str]] = {}
        for a in rows:
            h = -1.0 if a.inf else a.headroom_bits
            if h is not None and (a.layer not in layers or h < layers[a.layer][0]):
                layers[a.layer] = (h, a.dtype or "?")
        fig = go.Figure()
        fig.add_bar(x=list(layers), y=[min(h, 140.0) for h, _ in layers.values()],
                    text=[dt for _, dt in layers.values()], name="lowest headroom (bits)")
        fig.add_hline(y=2.0, line_dash="dash", annotation_text="overflow-risk margin (2 bits)")
        fig.update_layout(yaxis_title="bits to the dtype's max (lowest over samples)", height=400)
        page.figure(fig, "headroom")
    else:
        page.paragraph("No health samples were recorded (health_every=0, or no store).")

    page.heading("Findings")
    findings = findings_for(store, record.id)
    if findings:
        page.table(["severity", "kind", "layers", "steps", "explanation", "fix"],
                   [[f.severity, f.kind, ", ".join(f.layers[:5]), f"{f.steps[0]}..{f.steps[-1]}" if f.steps else "",
                     f.explanation, "; ".join(f.suggestions)] for f in findings])
    else:
        page.paragraph("No finding.", css="ok")

    page.heading("Incident")
    incident = record.incident
    if incident is not None:
        page.code(incident.diagnosis())
    else:
        page.paragraph("No NaN/Inf incident.", css="ok")
    return page.write(path)


def write_diff_report(store_a: RunStore, store_b: RunStore, diff: RunDiff, path: str | Path) -> Path:
    go = plotly()
    page = Page(f"floatscope diff {diff.run_a} vs {diff.run_b}")
    page.paragraph(diff.explanation, css="bad" if not diff.identical else "ok")
    page.heading("Both runs")
    fig = go.Figure()
    for store, run_id, label in ((store_a, diff.run_a, "A"), (store_b, diff.run_b, "B")):
        steps = store.steps(run_id)
        fig.add_scatter(name=f"loss {label} ({run_id})", x=[s.step for s in steps],
                        y=finite_or_none([s.loss for s in steps]), mode="lines")
    if diff.first_divergent_step is not None:
        fig.add_vline(x=diff.first_divergent_step, line_dash="dash", line_color="red",
                      annotation_text=f"first divergence: {diff.first_divergent_tensor}")
    fig.update_layout(xaxis_title="step", yaxis_title="loss", height=400)
    page.figure(fig, "loss-overlay")
    page.heading("Divergence")
    points = [p for p in diff.divergence if p.weight_rel_diff is not None]
    fig = go.Figure(go.Scatter(x=[p.step for p in points], y=finite_or_none([p.weight_rel_diff for p in points]),
                               mode="lines+markers", name="max relative difference of weight norms"))
    fig.update_layout(xaxis_title="step", yaxis_title="relative difference", height=360)
    page.figure(fig, "divergence")
    page.heading("Configuration differences")
    page.table(["key", "A", "B"], [[d.key, str(d.a), str(d.b)] for d in diff.config_differences] or [["-", "", ""]])
    return page.write(path)

