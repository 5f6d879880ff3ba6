"""Run reports: loss and loss scale, gradient norms per parameter, headroom, findings, incident; run diffs.

Every chart over steps marks the incident step (a red dashed line named ``incident``), every chart
says in its title how its data were sampled, and every numeric axis has a title and short ticks:
steps as integers, log axes one label per power (of 2 for the loss scale, of 10 otherwise).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from floatscope._diagnose.diff import RunDiff, _as_float
from floatscope._diagnose.health import findings_for
from floatscope._report.page import Page, finite_or_none, plotly
from floatscope._results import Incident
from floatscope._store.schema import ActivationSample, RunConfig, StepRecord
from floatscope._store.sqlite import RunStore

__all__ = ["write_run_report", "write_diff_report"]

_RED = "#c92a2a"
_HEADROOM_CAP = 140.0   # bits; float64's 1024 would flatten every float16/float32 bar
_MAX_HEADROOM_LAYERS = 40
_MARGIN = {"t": 60, "b": 50, "l": 70, "r": 30}


# ----------------------------------------------------------------------------------- axes and marks
def _log10(values: list[Any]) -> list[float | None]:
    out: list[float | None] = []
    for v in values:
        if isinstance(v, (int, float)) and math.isfinite(v) and v > 0:
            out.append(math.log10(v))
        else:
            out.append(None)
    return out


def _step_axis(steps: Sequence[int]) -> dict[str, Any]:
    """An integer step axis: one tick per step for short runs, never a fractional step."""
    axis: dict[str, Any] = {"title": {"text": "step"}, "tickformat": "d" if not steps or max(steps) < 100_000 else "~s"}
    if steps and max(steps) - min(steps) <= 10:
        axis.update(tick0=0, dtick=1)
    return axis


def _decade_axis(values: Sequence[float]) -> dict[str, Any]:
    """A log axis labelled at powers of ten, at most about eight of them (plotly's default labels the
    in-between digits of narrow ranges alone: '2', '5', which read as values)."""
    finite = [v for v in values if math.isfinite(v) and v > 0]
    if not finite:
        return {"type": "log", "exponentformat": "power"}
    decades = math.ceil(math.log10(max(finite))) - math.floor(math.log10(min(finite)))
    return {"type": "log", "exponentformat": "power", "tick0": 0, "dtick": max(1, math.ceil(decades / 8))}


def _pow2_label(k: int) -> str:
    return f"2<sup>{k}</sup>"


def _scale_axis(scales: Sequence[float]) -> dict[str, Any]:
    """The GradScaler's scale is a power of two: label it at powers of two, at most about seven."""
    finite = [s for s in scales if math.isfinite(s) and s > 0]
    lo = math.floor(math.log2(min(finite)))
    hi = math.ceil(math.log2(max(finite)))
    if hi - lo < 2:
        lo, hi = lo - 1, hi + 1
    stride = max(1, math.ceil((hi - lo) / 6))
    ks = list(range(lo - lo % stride, hi + 1, stride))
    ks = [k for k in ks if lo <= k <= hi] or [lo, hi]
    pad = max(0.15, 0.04 * (hi - lo)) * math.log10(2)  # in decades: room for the skipped-step crosses
    return {"type": "log", "title": {"text": "loss scale"}, "tickmode": "array",
            "tickvals": [2.0 ** k for k in ks], "ticktext": [_pow2_label(k) for k in ks],
            "range": [lo * math.log10(2) - pad, hi * math.log10(2) + pad]}


def _mark_incident(fig: Any, incident: Incident | None, steps: Sequence[int], *, label: str = "incident") -> None:
    """A red dashed line at the incident's step across the whole plot, with its op as the label.

    The line lies on a white one, so that it shows on a red (NaN/Inf) heatmap column too; the label is
    anchored towards the middle of the axis, so that it never hangs past the plot's edge.
    """
    if incident is None:
        return
    x = incident.step
    for name, line in (("incident-halo", {"color": "white", "width": 5}),
                       ("incident", {"color": _RED, "dash": "dash", "width": 2})):
        fig.add_shape(type="line", name=name, xref="x", yref="paper", x0=x, x1=x, y0=0, y1=1, line=line,
                      layer="above")
    middle = (min(steps) + max(steps)) / 2 if steps else x
    fig.add_annotation(name="incident", xref="x", yref="paper", x=x, y=1.0, yanchor="bottom",
                       xanchor="right" if x > middle else "left",
                       text=f"{label}: step {x}, {incident.phase} {_short_op(incident.op)}",
                       showarrow=False, font={"color": _RED, "size": 12}, bgcolor="rgba(255,255,255,0.85)")


def _short_op(op: str) -> str:
    return op.removesuffix(".default").removeprefix("aten.")


def _steps_text(steps: Sequence[int], limit: int = 6) -> str:
    """'0, 10, 20' or '0, 10, ..., 1990' (first three, last)."""
    steps = sorted(steps)
    if len(steps) <= limit:
        return ", ".join(map(str, steps))
    return f"{steps[0]}, {steps[1]}, {steps[2]}, ..., {steps[-1]}"


def _ranges(steps: Sequence[int]) -> str:
    """'0-3, 11, 18' for sorted steps."""
    out: list[str] = []
    steps = sorted(steps)
    i = 0
    while i < len(steps):
        j = i
        while j + 1 < len(steps) and steps[j + 1] == steps[j] + 1:
            j += 1
        out.append(str(steps[i]) if i == j else f"{steps[i]}-{steps[j]}")
        i = j + 1
    return ", ".join(out)


def _steps_label(steps: Sequence[int]) -> str:
    """'step 2' or 'steps 0-3, 11'."""
    return ("step " if len(steps) == 1 else "steps ") + _ranges(steps)


def _layout(fig: Any, title: str, **kwargs: Any) -> None:
    """The chart's title (which says how its data were sampled), margins and a legend under the plot."""
    fig.update_layout(title={"text": title, "x": 0, "xref": "paper", "xanchor": "left", "font": {"size": 14}},
                      margin=_MARGIN, legend={"orientation": "h", "yanchor": "top", "y": -0.18, "x": 0}, **kwargs)


# ----------------------------------------------------------------------------------- the run report
def write_run_report(store: RunStore, run_id: str, path: str | Path) -> Path:
    go = plotly()
    record = store.get(run_id)
    steps = store.steps(record.id)
    config = store.config(record.id)
    incident = record.incident
    page = Page(f"floatscope run {record.id} ({record.status})")
    page.paragraph(f"{record.command or ''} - {record.steps} steps, {record.skipped_steps} skipped by GradScaler; "
                   f"torch {record.env.get('torch')} on {record.env.get('device')}")
    if incident is not None:
        page.paragraph(f"Incident at step {incident.step}: {'NaN' if incident.kind == 'nan' else 'Inf'}"
                       f" born in {incident.phase} at {incident.op}"
                       + (f" (module '{incident.module}')" if incident.module is not None else "")
                       + ". The red dashed line marks it on every chart over steps; the diagnosis is at the end.",
                       css="bad")

    page.heading("Loss and loss scale")
    _loss_section(page, go, steps, incident)
    page.heading("Gradient norm per parameter")
    _gradient_section(page, go, store, record.id, config, steps, incident)
    page.heading("Headroom per layer")
    _headroom_section(page, go, store.activations(record.id), config, incident)

    page.heading("Findings")
    findings = findings_for(store, record.id)
    if findings:
        page.table(["severity", "kind", "layers", "steps", "explanation", "fix"],
                   [[f.severity, f.kind, ", ".join(f.layers[:5]), f"{f.steps[0]}..{f.steps[-1]}" if f.steps else "",
                     f.explanation, "; ".join(f.suggestions)] for f in findings])
    else:
        page.paragraph("No finding.", css="ok")

    page.heading("Incident")
    if incident is not None:
        page.code(incident.diagnosis())
    else:
        page.paragraph("No NaN/Inf incident.", css="ok")
    return page.write(path)


def _loss_section(page: Page, go: Any, steps: list[StepRecord], incident: Incident | None) -> None:
    from plotly.subplots import make_subplots

    xs = [s.step for s in steps]
    bad_loss = [s.step for s in steps if s.loss is None or not math.isfinite(s.loss)]
    skipped = [s for s in steps if s.skipped]
    scales = [s for s in steps if s.loss_scale is not None and math.isfinite(s.loss_scale) and s.loss_scale > 0]
    text = (f"Recorded every step ({len(steps)} steps). NaN/Inf or missing losses are drawn as gaps: "
            f"{len(bad_loss)} ({_ranges(bad_loss) or 'none'}).")
    if skipped:
        text += (f" GradScaler skipped {len(skipped)} step(s) ({_ranges([s.step for s in skipped])}): their "
                 "gradients held Inf/NaN at that scale; red crosses mark them on the scale curve.")
    page.paragraph(text)

    finite = [s.loss for s in steps if s.loss is not None and math.isfinite(s.loss) and s.loss > 0]
    wide = bool(finite) and max(finite) / min(finite) > 1e3  # a diverging run: show every decade
    if scales:
        fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.6, 0.4], vertical_spacing=0.06)
    else:
        fig = go.Figure()
    rows = {"row": 1, "col": 1} if scales else {}
    fig.add_scatter(name="loss", x=xs, y=finite_or_none([s.loss for s in steps]),
                    mode="lines+markers" if len(steps) <= 50 else "lines",  # a short run's isolated points show
                    hovertemplate="step %{x}<br>loss %{y:.6g}<extra></extra>", **rows)
    loss_axis: dict[str, Any] = {"title": {"text": "loss (log scale)" if wide else "loss"}}
    if wide:
        loss_axis.update(_decade_axis(finite))
    unscaled_skips = [s for s in skipped if s.loss_scale is None or not math.isfinite(s.loss_scale)]
    on_loss = [s for s in unscaled_skips if s.loss is not None and math.isfinite(s.loss)]
    if on_loss:  # no scale recorded for them: mark them on the loss curve
        fig.add_scatter(name="skipped step", x=[s.step for s in on_loss], y=[s.loss for s in on_loss],
                        mode="markers", marker={"symbol": "x", "size": 9, "color": _RED}, **rows)
    if scales:
        fig.add_scatter(name="loss scale", x=[s.step for s in scales], y=[s.loss_scale for s in scales],
                        mode="lines", line={"shape": "hv", "color": "#e8590c"}, row=2, col=1,
                        hovertemplate="step %{x}<br>scale %{y:.6g}<extra></extra>")
        marked = [s for s in skipped if s not in unscaled_skips]
        if marked:
            fig.add_scatter(name="skipped step", x=[s.step for s in marked],
                            y=[s.loss_scale for s in marked], mode="markers", row=2, col=1,
                            marker={"symbol": "x", "size": 9, "color": _RED},
                            hovertemplate="step %{x} skipped<br>scale %{y:.6g}<extra></extra>")
        fig.update_yaxes(loss_axis, row=1, col=1)
        fig.update_yaxes(_scale_axis([s.loss_scale for s in scales if s.loss_scale is not None]), row=2, col=1)
        fig.update_xaxes(_step_axis(xs), row=2, col=1)
        fig.update_xaxes({k: v for k, v in _step_axis(xs).items() if k != "title"}, row=1, col=1)
        height = 520
    else:
        fig.update_layout(yaxis=loss_axis, xaxis=_step_axis(xs))
        height = 400
    _mark_incident(fig, incident, xs)
    title = "Loss" + (" and GradScaler loss scale" if scales else "") + f", every step ({len(steps)} recorded)"
    _layout(fig, title, height=height)
    page.figure(fig, "loss")


def _gradient_section(page: Page, go: Any, store: RunStore, run_id: str, config: RunConfig,
                      steps: list[StepRecord], incident: Incident | None) -> None:
    grads = store.fingerprints(run_id, "grad")
    width = max((len(v) for v in grads.values()), default=0)
    if not grads or width == 0:
        page.paragraph("No gradient fingerprints were recorded (no optimizer step, or no store).")
        return
    names = list(config.fingerprint_params)[:width]
    note = ""
    if len(names) < width:
        # Rows without their names: take the model's parameter order, the order the watch reads them in.
        model_names = list(config.model.parameters) if config.model is not None else []
        extra = model_names[len(names):width] if len(model_names) >= width else []
        names += extra or [f"parameter {i}" for i in range(len(names), width)]
        note = " The run recorded no names for some parameters; they are shown in the model's order."
    ordered = sorted(grads)
    z: list[list[float | None]] = [[None] * len(ordered) for _ in names]
    bad: list[list[float | None]] = [[None] * len(ordered) for _ in names]
    for j, step in enumerate(ordered):
        values = [_as_float(v) for v in grads[step]][:width]
        for i, value in enumerate(_log10(values)):
            z[i][j] = value
        for i, value in enumerate(values):
            if value is not None and not math.isfinite(value):
                bad[i][j] = 1.0
    bad_steps = [ordered[j] for j in range(len(ordered)) if any(row[j] is not None for row in bad)]
    skipped = [s.step for s in steps if s.skipped]
    text = (f"log10 of each parameter's gradient L2 norm, recorded every step ({len(ordered)} steps, "
            f"{len(names)} parameters). Red: a NaN/Inf gradient"
            + (f" ({_steps_label(bad_steps)})" if bad_steps else " (none)") + "; blank: an exact 0 or no value.")
    if skipped:
        text += f" Skipped by GradScaler: {_steps_label(skipped)} (their gradients are the scaled ones)."
    if incident is not None:
        if incident.step in grads:
            text += f" The incident step {incident.step} is included."
        else:
            text += (f" The incident step {incident.step} has no gradient row: the run stopped before its "
                     "gradients were read.")
    page.paragraph(text + note)
    fig = go.Figure()
    fig.add_heatmap(z=z, x=ordered, y=names, colorscale="Viridis", name="log10 |grad|",
                    colorbar={"title": {"text": "log10 |grad|"}},
                    hovertemplate="step %{x}<br>%{y}<br>log10 |grad| %{z:.3g}<extra></extra>")
    if bad_steps:
        fig.add_heatmap(z=bad, x=ordered, y=names, colorscale=[[0, _RED], [1, _RED]], showscale=False,
                        name="NaN/Inf gradient", hovertemplate="step %{x}<br>%{y}: NaN/Inf<extra></extra>")
    columns = ordered + ([incident.step] if incident is not None else [])
    fig.update_layout(xaxis={**_step_axis(ordered), "range": [min(columns) - 0.5, max(columns) + 0.5]},
                      yaxis={"title": {"text": "parameter"}, "type": "category", "automargin": True})
    _mark_incident(fig, incident, ordered)
    _layout(fig, f"Gradient norm per parameter, every step ({len(ordered)} recorded)",
            height=max(320, 20 * len(names) + 160))
    page.figure(fig, "grad-heatmap")


def _incident_output(incident: Incident | None) -> tuple[str, float, str] | None:
    """(module, headroom bits, label) of a forward incident's output: -1 bits when it overflowed."""
    if incident is None or incident.phase != "forward" or incident.module is None or incident.output is None:
        return None
    out = incident.output
    if out.inf:
        finite = f" (finite values: {out.headroom_bits:.1f} bits)" if math.isfinite(out.headroom_bits) else ""
        return incident.module, -1.0, f"{out.dtype}: Inf{finite}"
    if math.isfinite(out.headroom_bits):
        return incident.module, out.headroom_bits, f"{out.dtype}: {out.headroom_bits:.1f}"
    return None


def _headroom_section(page: Page, go: Any, rows: list[ActivationSample], config: RunConfig,
                      incident: Incident | None) -> None:
    sampled = sorted({a.step for a in rows})
    at_incident = _incident_output(incident)
    if not rows and at_incident is None:
        page.paragraph("No health samples were recorded (health_every=0, or no store).")
        return
    every = config.health_every
    lowest: dict[str, tuple[float, str, int]] = {}
    for a in rows:
        h = -1.0 if a.inf else a.headroom_bits
        if h is not None and math.isfinite(h) and (a.layer not in lowest or h < lowest[a.layer][0]):
            lowest[a.layer] = (h, a.dtype or "?", a.step)
    layers = list(lowest)
    if at_incident is not None and at_incident[0] not in lowest:
        layers.append(at_incident[0])
    shown_note = ""
    if len(layers) > _MAX_HEADROOM_LAYERS:
        keep = set(sorted(lowest, key=lambda k: lowest[k][0])[:_MAX_HEADROOM_LAYERS])
        if at_incident is not None:
            keep.add(at_incident[0])
        shown_note = f" Shown: the {len(keep)} layers with the least headroom, of {len(layers)}."
        layers = [name for name in layers if name in keep]

    sampling = (f"sampled every {every} steps" if every else "sampled") + (
        f": {len(sampled)} sample(s), steps {_steps_text(sampled)}" if sampled else ": no sample")
    text = (f"Bits between each layer's largest output and its dtype's max, the lowest over the health samples "
            f"({sampling}); -1 means the output held an Inf. The dashed line is the overflow-risk margin (2 bits). "
            f"Bars are capped at {_HEADROOM_CAP:g} bits.")
    if incident is not None:
        if at_incident is not None:
            ins = ", ".join(f"{o.headroom_bits:.1f}" for o in incident.operands if math.isfinite(o.headroom_bits))
            unit = " bits" if at_incident[1] >= 0 else ""
            text += (f" Red: the incident's own output at step {incident.step} (module '{at_incident[0]}', "
                     f"{at_incident[2]}{unit})" + (f"; its inputs had {ins} bits" if ins else "") + ".")
        else:
            text += (f" The incident (step {incident.step}, {incident.phase}) is not a layer's forward output, so "
                     "it has no bar here.")
        if incident.step not in sampled:
            text += f" Step {incident.step} itself was not a sampling step."
    page.paragraph(text + shown_note)

    fig = go.Figure()
    ys = [name for name in layers if name in lowest]
    fig.add_bar(orientation="h", y=ys, x=[min(lowest[n][0], _HEADROOM_CAP) for n in ys],
                text=[f"{lowest[n][1]}, step {lowest[n][2]}" for n in ys], textposition="auto",
                name=f"lowest over {len(sampled)} health sample(s)", marker={"color": "#4c6ef5"},
                hovertemplate="%{y}<br>%{x:.1f} bits (%{text})<extra></extra>")
    order = list(ys)
    if at_incident is not None and incident is not None:
        # Its own row, under its layer's: the output that overflowed, at the step it did.
        row = f"{at_incident[0]} at the incident"
        order.insert(order.index(at_incident[0]) + 1 if at_incident[0] in order else len(order), row)
        fig.add_scatter(y=[row], x=[min(at_incident[1], _HEADROOM_CAP)], mode="markers+text",
                        text=[f"step {incident.step}: {at_incident[2].split(': ', 1)[1]}"
                              + (" bits" if at_incident[1] >= 0 else "")],
                        textposition="middle right", textfont={"color": _RED},
                        marker={"color": _RED, "symbol": "x", "size": 14},
                        name=f"incident output, step {incident.step}",
                        hovertemplate="%{y}<br>%{x:.1f} bits<extra></extra>")
    fig.add_vline(x=2.0, line_dash="dash", line_color="#495057")
    fig.add_annotation(x=2.0, xref="x", y=1.0, yref="paper", yanchor="bottom", xanchor="left", showarrow=False,
                       text="overflow-risk margin (2 bits)", font={"size": 11, "color": "#495057"})
    top = max([min(v[0], _HEADROOM_CAP) for v in lowest.values()] + [at_incident[1] + 20 if at_incident else 0.0, 4.0])
    title = f"Lowest headroom per layer, {sampling}" + (
        f" + the incident's output (step {incident.step})" if at_incident is not None and incident else "")
    fig.update_layout(xaxis={"title": {"text": "bits to the dtype's max"}, "range": [-top * 0.04 - 2, top * 1.12]},
                      yaxis={"title": {"text": "layer (module path)"}, "type": "category", "autorange": "reversed",
                             "categoryorder": "array", "categoryarray": order, "automargin": True})
    _layout(fig, title, height=max(320, 28 * len(order) + 170))
    page.figure(fig, "headroom")


# ----------------------------------------------------------------------------------- the diff report
def write_diff_report(store_a: RunStore, store_b: RunStore, diff: RunDiff, path: str | Path) -> Path:
    go = plotly()
    page = Page(f"floatscope diff {diff.run_a} vs {diff.run_b}")
    page.paragraph(diff.explanation, css="bad" if not diff.identical else "ok")
    page.heading("Both runs")
    page.paragraph("Losses of both runs, every step. The dashed line marks the first divergence; a red line "
                   "marks a run's NaN/Inf incident.")
    fig = go.Figure()
    all_steps: list[int] = []
    losses: list[float] = []
    incidents: list[tuple[str, Incident]] = []
    for store, run_id, label in ((store_a, diff.run_a, "A"), (store_b, diff.run_b, "B")):
        steps = store.steps(run_id)
        all_steps += [s.step for s in steps]
        losses += [s.loss for s in steps if s.loss is not None and math.isfinite(s.loss) and s.loss > 0]
        fig.add_scatter(name=f"loss {label} ({run_id})", x=[s.step for s in steps],
                        y=finite_or_none([s.loss for s in steps]), mode="lines")
        incident = store.get(run_id).incident
        if incident is not None:
            incidents.append((label, incident))
    if diff.first_divergent_step is not None:
        fig.add_vline(x=diff.first_divergent_step, line_dash="dash", line_color="#495057",
                      annotation_text=f"first divergence: {diff.first_divergent_tensor}")
    for label, incident in incidents:
        _mark_incident(fig, incident, all_steps, label=f"incident {label}")
    wide = bool(losses) and max(losses) / min(losses) > 1e3
    fig.update_layout(xaxis=_step_axis(all_steps), yaxis={"title": {"text": "loss (log scale)" if wide else "loss"},
                                                          **(_decade_axis(losses) if wide else {})})
    _layout(fig, "Loss of both runs, every step", height=400)
    page.figure(fig, "loss-overlay")
    page.heading("Divergence")
    points = [p for p in diff.divergence if p.weight_rel_diff is not None]
    fig = go.Figure(go.Scatter(x=[p.step for p in points], y=finite_or_none([p.weight_rel_diff for p in points]),
                               mode="lines+markers", name="max relative difference of weight norms"))
    for label, incident in incidents:
        _mark_incident(fig, incident, [p.step for p in points] or all_steps, label=f"incident {label}")
    fig.update_layout(xaxis=_step_axis([p.step for p in points]),
                      yaxis={"title": {"text": "relative difference"}, "exponentformat": "power"})
    _layout(fig, "Largest relative difference of the weight norms, on the steps with weight fingerprints",
            height=360)
    page.figure(fig, "divergence")
    page.heading("Configuration differences")
    page.table(["key", "A", "B"], [[d.key, str(d.a), str(d.b)] for d in diff.config_differences] or [["-", "", ""]])
    return page.write(path)
