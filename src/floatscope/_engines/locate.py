"""``floatscope.locate``: run one callable under op-level tracing and return the origin."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from floatscope._diagnose.diagnose import incident_from_event
from floatscope._diagnose.optimizer import with_optimizer_context
from floatscope._events import OriginEvent
from floatscope._instrument.hooks import HookSet
from floatscope._instrument.tracer import OpTracer
from floatscope._results import Incident

__all__ = ["locate", "trace_call", "incident_for"]


def trace_call(tracer: OpTracer, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` under ``tracer``, marking ops inside ``optimizer.step`` as the optimizer phase."""

    def enter_step(optimizer: torch.optim.Optimizer, a: Any, k: Any) -> None:
        tracer.phase, tracer.optimizer = "optimizer", optimizer

    def leave_step(optimizer: torch.optim.Optimizer, a: Any, k: Any) -> None:
        tracer.phase = "forward"

    with HookSet() as hooks:
        hooks.add(register_optimizer_step_pre_hook(enter_step))
        hooks.add(register_optimizer_step_post_hook(leave_step))
        hooks.enter(tracer)
        return fn(*args, **kwargs)


def incident_for(tracer: OpTracer, sinks: list[torch.Tensor], *, step: int, exact: bool = True,
                 replay_seconds: float | None = None) -> Incident | None:
    """Build the incident for the origin that reached ``sinks`` (or the first origin)."""
    found = tracer.origin_for(sinks)
    if found is None:
        return None
    root, last = found
    incident = incident_from_event(root, last, step=step, exact=exact, replay_seconds=replay_seconds)
    if root.phase == "optimizer":
        incident = _optimizer_incident(tracer, root, incident)
    return incident


def _optimizer_incident(tracer: OpTracer, event: OriginEvent, incident: Incident) -> Incident:
    keys = ([event.output_key] if event.output_key else []) + event.input_keys
    for key in keys:
        name = tracer.param_name(key)
        if name is not None:
            return with_optimizer_context(incident, tracer.optimizer, _param_at(tracer, name), name)
    return with_optimizer_context(incident, tracer.optimizer, None, None)


def _param_at(tracer: OpTracer, name: str) -> torch.Tensor | None:
    for root in tracer.roots:
        for n, p in root.named_parameters(remove_duplicate=False):
            if n == name:
                return p
    return None


def locate(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Incident | None:
    """Run ``fn(*args, **kwargs)`` under op-level tracing; return where the first NaN/Inf was born.

    Every aten op of the forward pass, of any ``backward()`` and of any ``optimizer.step()`` that
    ``fn`` runs is checked. The origin is the first op that produced NaN from NaN-free inputs, or
    Inf from Inf-free inputs, whose values reach ``fn``'s result (or, if none does, the first such
    op). Intentional infinities (``masked_fill(-inf)``, ``finfo.min`` masks) are not origins.
    Tracing is slow (Python and a device sync per op); use :func:`floatscope.watch` to watch
    training and let it replay a failing step through this machinery.

    Returns:
        The :class:`Incident`, with ``step`` 0, or None when every value stayed finite.

    Example:
        >>> import torch, floatscope
        >>> x = torch.tensor([0.0, 1.0], requires_grad=True)
        >>> incident = floatscope.locate(lambda: torch.sqrt(x).sum().backward())
        >>> incident.op, incident.phase, incident.backward_node
        ('aten.sqrt.default', 'backward', 'SqrtBackward0')
    """
    tracer = OpTracer()
    start = time.perf_counter()
    result = trace_call(tracer, fn, *args, **kwargs)
    sinks = [t for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
    return incident_for(tracer, sinks, step=0, replay_seconds=time.perf_counter() - start)
