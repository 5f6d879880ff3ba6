"""Incidents the replay does not name by itself: broken data, broken parameters, the optimizer,
loss-scale collapse, diverging runs, and origins that could not be pinned to an op.

Pure functions from what the watch observed to an :class:`Incident` and its explanation. Every
diagnosis text the watch writes lives here or in :mod:`floatscope._diagnose.diagnose`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

from floatscope._events import UNKNOWN_FRAME, OriginEvent, UserFrame
from floatscope._results import Incident, OperandStats, Phase

__all__ = ["input_incident", "intended_incident", "parameter_incident", "manual_update_incident", "optimizer_incident",
           "coarse_incident", "collapse_incident", "with_divergence", "with_read", "refine_input",
           "contained_reached"]


def _what(stats: OperandStats) -> str:
    return f"{stats.nan} NaN" if stats.nan else f"{stats.inf} Inf"


def input_incident(*, step: int, stats: OperandStats, what: str, frame: UserFrame, model: str | None,
                   module: str | None, consumer: str | None = None) -> Incident:
    """The batch (or another step input) already held NaN/Inf before any op of the step ran."""
    explanation = (f"{what} ({stats.dtype}, shape {stats.shape}) already held {_what(stats)} before any op of the "
                   f"step ran: the data, not the model, produced it.")
    if consumer:
        explanation += f" The first op to turn it into NaN was {consumer}."
    return Incident(
        step=step, phase="forward", kind="nan" if stats.nan else "inf", op="<input>", backward_node=None,
        module=module, param=None, file=frame.file, line=frame.line, category="input", explanation=explanation,
        suggestions=["check the data pipeline for this batch (missing values, division by a zero std in "
                     "normalisation, log of 0 in feature engineering)",
                     "validate batches: assert torch.isfinite(x).all(), or torch.nan_to_num(x)"],
        operands=[stats], code=frame.code or None, function=frame.function, model=model,
    )


def refine_input(incident: Incident, *, what: str, stats: OperandStats, frame: UserFrame, model: str | None,
                 module: str | None) -> Incident:
    """A replayed origin whose non-finite operand was a step input: the input is the origin."""
    where = f" in module '{incident.module}'" if incident.module else ""
    consumer = f"{incident.op}{where} at {incident.file}:{incident.line}"
    return replace(input_incident(step=incident.step, stats=stats, what=what, frame=frame, model=model,
                                  module=module, consumer=consumer),
                   replay_seconds=incident.replay_seconds)


def intended_incident(*, step: int, event: OriginEvent, reached: str, stats: OperandStats,
                      seconds: float | None) -> Incident:
    """A NaN or Inf written on purpose (a literal, a mask fill) that reached a value that must be finite."""
    frame = event.frame
    if event.kind == "nan":
        explanation = (f"a NaN was written on purpose by {event.op} at {frame.file}:{frame.line} (a NaN literal: "
                       f"a placeholder for a missing value in the step's input data) and reached {reached}; no op "
                       f"computed it.")
        fixes = ["fill or drop missing values before training: torch.nan_to_num(x, nan=0.0), or mask them out of "
                 "the loss", "validate batches: assert torch.isfinite(x).all()"]
    else:
        explanation = (f"an infinity written on purpose by {event.op} at {frame.file}:{frame.line} (a mask or "
                       f"sentinel value) reached {reached}, which must be finite.")
        fixes = ["mask with torch.finfo(dtype).min instead of -inf, or make sure masked entries never reach the loss",
                 "apply the mask after the reduction, or use torch.where to exclude masked entries"]
    return Incident(
        step=step, phase=event.phase, kind=event.kind, op=event.op, backward_node=None, module=event.module,
        param=None, file=frame.file, line=frame.line, category="input", explanation=explanation,
        suggestions=fixes, operands=[stats], output=event.output, code=frame.code or None,
        function=event.frame.function if event.frame.known else None, call=event.function, replay_seconds=seconds,
        model=event.model if event.module is not None else None,
    )


def parameter_incident(*, step: int, name: str, module: str | None, model: str | None, stats: OperandStats,
                       frame: UserFrame, history: str) -> Incident:
    """A parameter that was non-finite before the step that used it (a checkpoint, an init, a write)."""
    return Incident(
        step=step, phase="forward", kind="nan" if stats.nan else "inf", op="<parameter>", backward_node=None,
        module=module, param=name, file=frame.file, line=frame.line, category="parameter",
        explanation=(f"parameter '{name}' ({stats.dtype}, shape {stats.shape}) already held {_what(stats)} before "
                     f"this step's first op: {history}"),
        suggestions=["check the checkpoint: torch.isfinite(t).all() for every tensor of the state_dict before "
                     "load_state_dict",
                     "check custom initialisation code (a division by a zero fan-in, log of 0) and any code that "
                     "writes to parameters between steps"],
        operands=[stats], code=frame.code or None, function=frame.function, model=model,
    )


def manual_update_incident(*, step: int, op: str, name: str, module: str | None, model: str | None,
                           frame: UserFrame, before: OperandStats | None, operands: list[OperandStats],
                           after: OperandStats) -> Incident:
    """An in-place update of a parameter outside any optimizer (``W -= lr * W.grad``) made it non-finite."""
    step_size = max((o.absmax for o in operands if not math.isnan(o.absmax)), default=math.nan)
    if any(o.nan or o.inf for o in operands):
        why = (f"the update written into '{name}' already held non-finite values "
               f"({', '.join(o.describe() for o in operands if o.nan or o.inf)}): the gradient it was made from "
               f"was not finite.")
        fixes = ["check the gradient before updating: torch.isfinite(W.grad).all()",
                 "clip gradients: torch.nn.utils.clip_grad_norm_([W, ...], max_norm=1.0)"]
    else:
        why = (f"the update written into '{name}' is finite (|update| <= {step_size:.4g}) but the result overflowed "
               f"{after.dtype} (max {after.dtype_max:.4g}): the step size is far too large for these weights.")
        fixes = ["lower the learning rate", "clip the gradient before the update"]
    return Incident(
        step=step, phase="optimizer", kind="nan" if after.nan else "inf", op=op, backward_node=None, module=module,
        param=name, file=frame.file, line=frame.line, category="optimizer", explanation=why, suggestions=fixes,
        operands=([before] if before is not None else []) + operands, output=after, code=frame.code or None,
        function=frame.function, model=model,
    )


def optimizer_incident(*, step: int, optimizer_name: str, name: str | None, module: str | None,
                       model: str | None, frame: UserFrame, output: OperandStats | None, state_lines: list[str],
                       explanation: str, suggestions: list[str], replayed: bool) -> Incident:
    """A ``torch.optim`` step made a parameter non-finite, known without an op-by-op replay."""
    if not replayed:
        explanation += (" (The update itself was not replayed; run with --exact-optimizer / "
                        "watch(..., exact_optimizer=True) to name the op.)")
    kind: Literal["nan", "inf"] = "nan" if output is not None and output.nan > 0 else "inf"
    return Incident(
        step=step, phase="optimizer", kind=kind, op=f"{optimizer_name}.step", backward_node=None, module=module,
        param=name, file=frame.file, line=frame.line, category="optimizer", explanation=explanation,
        suggestions=suggestions, operands=[], output=output, code=frame.code or None, function=frame.function,
        optimizer_state=state_lines, model=model, exact=replayed,
    )


def coarse_incident(*, step: int, phase: Phase, found: str, reason: str, stats: OperandStats | None,
                    frame: UserFrame, model: str | None, module: str | None, seconds: float | None) -> Incident:
    """The finest origin known when the op could not be named, with what was and was not replayed."""
    fixes = ["run the failing step under floatscope.locate(step_fn) to trace it op by op",
             "make the step deterministic (floatscope demo shows scripts that replay exactly)"]
    if "replay is disabled" in reason:
        fixes = ["rerun without --no-replay (watch(..., replay=True)): the replay names the op"]
    elif "sync='lazy'" in reason:
        fixes = ["rerun with --sync step (watch(..., sync='step')): the step is read before the parameters change"]
    return Incident(
        step=step, phase=phase, kind="nan" if stats is None or stats.nan else "inf", op="<unknown>",
        backward_node=None, module=module, param=None, file=frame.file, line=frame.line, category="unknown",
        explanation=f"non-finite values were found in {found}, but the op could not be named: {reason}.",
        suggestions=fixes, operands=[stats] if stats else [], exact=False, replay_seconds=seconds, code=frame.code or None,
        function=frame.function if frame.known else None, model=model,
    )


def collapse_incident(*, step: int, scale: float, history: list[float], skips: int,
                      detail: Incident | None, seconds: float) -> Incident:
    """The GradScaler's loss scale collapsed; ``detail`` is the replay of the last skipped step."""
    shown = ", ".join(f"{s:g}" for s in history[-6:])
    why = "fell below 1" if scale < 1.0 else f"was skipped {skips} steps in a row"
    explanation = (f"the GradScaler's loss scale {why} (recent scales: {shown}); every skipped step means inf/NaN "
                   f"gradients, and a scale below 1 shrinks gradients instead of protecting them from underflow.")
    if detail is not None:
        explanation += (f" Replaying the last skipped step: {detail.op} in {detail.phase} made the first non-finite "
                        f"value ({detail.category}): {detail.explanation}")
    suggestions = (detail.suggestions if detail else []) + [
        "gradients that overflow at every scale come from a NaN/Inf in the model, not from scaling: fix that op",
        "or train in bfloat16 (no GradScaler needed)"]
    base = detail or Incident(step=step, phase="backward", kind="inf", op="GradScaler.update", backward_node=None,
                              module=None, param=None, file=UNKNOWN_FRAME.file, line=0,
                              category="loss-scale-collapse", explanation="", suggestions=[], operands=[],
                              exact=False)
    return replace(base, step=step, category="loss-scale-collapse", explanation=explanation,
                   suggestions=suggestions, replay_seconds=seconds)


def with_divergence(incident: Incident, grad_norms: list[float]) -> Incident:
    """Name a diverging run: an overflow preceded by gradient norms growing step over step."""
    finite = [g for g in grad_norms if math.isfinite(g) and g > 0]
    if incident.category != "overflow" or len(finite) < 3 or finite[-1] < 10 * finite[0]:
        return incident
    growth = (finite[-1] / finite[0]) ** (1 / (len(finite) - 1))
    shown = finite[-6:]
    trend = ", ".join(f"{g:.3g}" for g in shown)
    if len(shown) < len(finite):
        trend = f"the last {len(shown)}: {trend}"
    healthy = min(finite[: max(1, len(finite) // 2)])
    explanation = (incident.explanation + f" Training was diverging: the gradient norm grew {growth:.3g}x per step "
                   f"over the last {len(finite)} steps ({trend}), so weights and activations grew until they "
                   f"overflowed.")
    suggestions = [f"clip gradients: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={healthy:.3g}) "
                   "(the norm before the growth)",
                   "lower the learning rate (or add warm-up); the growth is the signature of a step size too large "
                   "for the curvature"] + incident.suggestions
    return replace(incident, explanation=explanation, suggestions=suggestions)


def with_read(incident: Incident, frame: UserFrame) -> Incident:
    """Say where the script read the non-finite value (and acted on it) when that is not the origin."""
    if (frame.file, frame.line) == (incident.file, incident.line) or not frame.known:
        return incident
    note = f"the script read the non-finite value at {frame.file}:{frame.line}."
    consequence = f"{incident.consequence} Then {note}" if incident.consequence else note[0].upper() + note[1:]
    return replace(incident, consequence=consequence)


def contained_reached(incident: Incident, *, reached: str | None, step: int, failed: bool = False) -> Incident:
    """An earlier non-finite value, diagnosed where it was computed, that later reached ``reached`` at ``step``.

    ``reached`` None: it never reached a loss, gradient or parameter, but the run ended with it
    unreported (the script failed, or it was a model's output).
    """
    if reached is not None:
        note = (f"It was computed at step {incident.step} and reached {reached} at step {step}."
                if step != incident.step else f"It reached {reached}.")
    elif failed:
        note = "It never reached a loss or gradient, but the script failed with it unreported."
    else:
        note = "It never reached a loss or gradient; the run ended with it in a model's output."
    consequence = f"{incident.consequence} {note}" if incident.consequence else note
    return replace(incident, consequence=consequence)
