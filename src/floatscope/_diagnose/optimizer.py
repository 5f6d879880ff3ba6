"""Explain a non-finite value that an optimizer update wrote into a parameter."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from floatscope._numerics.formats import format_of
from floatscope._numerics.stats import operand_stats
from floatscope._results import Incident

__all__ = ["optimizer_findings", "state_findings", "with_optimizer_context"]


def _hyper(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, Any]:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    return optimizer.defaults


def optimizer_findings(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> tuple[list[str], str, list[str]]:
    """Inspect ``param``'s optimizer state after an update made it non-finite.

    Returns ``(state_lines, explanation, suggestions)``. The state lines name each state tensor
    with its statistics; the explanation names the state and hyperparameter that made the update
    divide by zero or overflow (e.g. Adam's ``eps`` rounding to 0 in float16).
    """
    state = optimizer.state.get(param, {})
    group = _hyper(optimizer, param)
    name = type(optimizer).__name__
    dtype = param.dtype
    fmt = format_of(dtype) if param.is_floating_point() else None
    lines = []
    zero_second_moment = None
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 1:
            stats = operand_stats(value)
            lines.append(f"{key}: {stats.describe()}")
            if key in {"exp_avg_sq", "square_avg", "sum", "max_exp_avg_sq"}:
                zero_second_moment = (key, stats)
    eps = group.get("eps")
    lr = group.get("lr")
    if isinstance(eps, (tuple, list)):
        eps = eps[0]
    suggestions: list[str] = []
    if eps is not None and fmt is not None and float(torch.tensor(float(eps), dtype=dtype)) == 0.0:
        key, stats = zero_second_moment if zero_second_moment else ("exp_avg_sq", None)
        zeros = f"{stats.zeros} of {stats.numel} entries of {key} are 0" if stats else f"{key} has zeros"
        dname = str(dtype).removeprefix("torch.")
        grad = param.grad
        zero_grads = int((grad == 0).sum()) if isinstance(grad, torch.Tensor) and grad.layout == torch.strided else 0
        guard = ("eps=0 leaves nothing to guard the division" if float(eps) == 0.0 else
                 f"eps={eps:g} itself rounds to 0 in {dname} (smallest subnormal {fmt.smallest_subnormal:.2g})")
        if stats is not None and stats.zeros and (zero_grads or fmt.bits >= 32):
            explanation = (
                f"{zeros}: those weights' gradients were exactly 0 (weights the steps did not use: embedding rows "
                f"absent from the batch, dead units, masked inputs), so {name}'s exp_avg and {key} are 0 there and "
                f"{guard}: the update exp_avg / (sqrt({key}) + eps) is 0/0 = NaN.")
        else:
            explanation = (
                f"{name} keeps its state in the parameter's dtype {dname}: squared gradients below "
                f"{fmt.smallest_subnormal:.2g} flush to 0 ({zeros}), and {guard}, so the update "
                f"exp_avg / (sqrt({key}) + eps) divides by zero.")
        if fmt.bits >= 32:
            suggestions = [f"use a positive eps: {name}'s default eps=1e-8 keeps exp_avg / (sqrt({key}) + eps) "
                           f"finite where the gradient is 0"]
        else:
            suggestions = [
                "keep float32 master weights: leave the model in float32 and train under "
                "torch.autocast(device_type, dtype=torch.float16) with a torch.amp.GradScaler",
                f"or raise eps to at least {fmt.smallest_normal:.1e} (the smallest {dname} normal), e.g. eps=1e-4",
                "or use bfloat16 parameters with an optimizer that keeps float32 state",
            ]
    elif zero_second_moment is not None and zero_second_moment[1].nan + zero_second_moment[1].inf > 0:
        key, stats = zero_second_moment
        explanation = f"{name}'s state {key} is non-finite ({stats.nan} nan, {stats.inf} inf): a gradient overflowed."
        suggestions = ["clip gradients before the step: torch.nn.utils.clip_grad_norm_(params, max_norm)"]
    else:
        pstats = operand_stats(param)
        explanation = (
            f"the {name} update (lr={lr}) drove the parameter beyond {str(dtype).removeprefix('torch.')}'s range: "
            f"{pstats.inf} inf, {pstats.nan} nan after the step."
        )
        suggestions = ["lower the learning rate or add a warm-up",
                       "clip gradients: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)"]
    return lines, explanation, suggestions


def with_optimizer_context(incident: Incident, optimizer: torch.optim.Optimizer | None,
                           param: torch.Tensor | None, param_name: str | None) -> Incident:
    """Add the parameter name, optimizer state and an optimizer-specific explanation."""
    if optimizer is None or param is None:
        return replace(incident, param=param_name)
    lines, explanation, suggestions = optimizer_findings(optimizer, param)
    return replace(incident, param=param_name, optimizer_state=lines, explanation=explanation,
                   suggestions=suggestions, category="optimizer")


def state_findings(optimizer: torch.optim.Optimizer, param: torch.Tensor, key: str,
                   grad_absmax: float | None) -> tuple[list[str], str, list[str]]:
    """Explain optimizer state that went non-finite while the parameter stayed finite.

    Adam's ``exp_avg_sq`` is the usual one: a finite gradient above ~1e19 squares past float32's
    range, the second moment is Inf from then on (beta2 * inf = inf), and every update
    ``exp_avg / sqrt(inf)`` is 0: those weights silently stop training.
    """
    state = optimizer.state.get(param, {})
    name = type(optimizer).__name__
    lines = [f"{k}: {operand_stats(v).describe()}" for k, v in state.items()
             if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() > 1]
    value = state.get(key)
    stats = operand_stats(value) if isinstance(value, torch.Tensor) else None
    dtype = str(value.dtype).removeprefix("torch.") if isinstance(value, torch.Tensor) else "float32"
    count = f"{stats.inf} Inf and {stats.nan} NaN" if stats else "non-finite values"
    if grad_absmax is None:
        seen = ""
    elif grad_absmax >= 3e38:
        seen = " (this step's gradient norm overflowed float32: elements beyond ~1.8e19)"
    else:
        seen = f" (this step's gradient norm reached {grad_absmax:.3g})"
    if key in {"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"} and stats is not None and not stats.nan:
        explanation = (f"{name}'s {key} for this parameter holds {count}: a finite gradient squared past "
                       f"{dtype}'s range{seen}, and a running second moment never recovers from Inf "
                       f"(beta2 * inf = inf). The update exp_avg / sqrt({key}) is now 0 for those entries: they "
                       f"stopped training while every weight stays finite, so nothing else shows it.")
    else:
        explanation = (f"{name}'s {key} for this parameter holds {count}{seen}; the next updates will carry them "
                       f"into the weights.")
    suggestions = ["clip gradients before the step: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)",
                   "find the batch that produced the huge gradient (an outlier or unnormalised sample) and fix the "
                   "data or normalise the inputs",
                   f"reset the broken state: optimizer.state[param]['{key}'].nan_to_num_(posinf=0.0), or re-create "
                   f"the optimizer from a checkpoint before the step"]
    return lines, explanation, suggestions
