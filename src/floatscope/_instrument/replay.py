"""The replayer: re-execute what a window recorded under op-level tracing, and put everything back.

A window's events run again in order: each root model call with its inputs, RNG and autocast
state (through ``functional_call`` when it was called that way), each top-level torch call with
the tensors the replay made in place of the originals, each ``backward()`` as ``torch.autograd.grad``
(nothing accumulates into ``.grad``) and each ``torch.autograd.grad``. Tensors the window did not
make (the batch, the parameters) are used as they are. The replay stops after the event that made
the value being explained. RNG states and the root models' buffers are restored afterwards, and
the capture records nothing while it runs.

An optimizer step can be replayed too, from a snapshot of parameters, gradients and state taken
before it (``exact_optimizer``); the parameters and state as the step left them are put back.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from floatscope._instrument.autocast import restore_autocast
from floatscope._instrument.capture import Backward, Call, Pass, RngMark, StepCapture, Window
from floatscope._instrument.channel import Subject
from floatscope._instrument.tracer import OpTracer

__all__ = ["Replayer", "ReplayResult", "OptimizerSnapshot", "snapshot_optimizer"]


@dataclass
class ReplayResult:
    """The tracer after a replay, the replayed values of the subjects, and what was (not) replayed."""

    tracer: OpTracer
    sinks: list[torch.Tensor | None]  # the replayed value of each target (None: not replayed)
    replayed: int                     # events re-executed
    skipped: list[str] = field(default_factory=list)  # what could not be replayed, in words


@dataclass(eq=False)
class OptimizerSnapshot:
    """Parameters, gradients and optimizer state as they were before one optimizer step."""

    iteration: int
    params: list[torch.Tensor]
    values: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    state: dict[int, dict[str, Any]]


def _clone_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in state.items()}


def snapshot_optimizer(optimizer: torch.optim.Optimizer, iteration: int) -> OptimizerSnapshot:
    params = [p for g in optimizer.param_groups for p in g["params"] if isinstance(p, torch.Tensor)]
    return OptimizerSnapshot(
        iteration=iteration, params=params, values=[p.detach().clone() for p in params],
        grads=[p.grad.detach().clone() if p.grad is not None else None for p in params],
        state={id(p): _clone_state(optimizer.state[p]) for p in params if p in optimizer.state})


class Replayer:
    """Replays a :class:`Window` of a :class:`StepCapture`."""

    def __init__(self, capture: StepCapture) -> None:
        self.capture = capture

    def replay(self, window: Window, targets: list[Subject]) -> ReplayResult:
        """Re-execute ``window`` up to the latest event of ``targets`` under an :class:`OpTracer`."""
        capture = self.capture
        roots = list(capture.leaves.roots)
        until = max((s.order for s in targets if s.window == window.index), default=len(window.events) - 1)
        if any(s.role in ("grad", "param", "update") for s in targets):
            until = len(window.events) - 1
        tracer = OpTracer(boundary=_BOUNDARY)
        for root in roots:
            tracer.add_root(root)
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        buffers = [(b, b.detach().clone()) for root in roots for b in root.buffers()]
        mapping: dict[int, Any] = {}
        grads: dict[int, torch.Tensor] = {}
        skipped: list[str] = []
        replayed = 0
        capture.suspended = True
        try:
            torch.set_rng_state(window.rng)
            if window.cuda_rng is not None:
                torch.cuda.set_rng_state_all(window.cuda_rng)
            with tracer:
                for event in window.events[: until + 1]:
                    if isinstance(event, Pass):
                        _run_pass(tracer, event, mapping)
                    elif isinstance(event, Call):
                        note = _run_call(tracer, event, mapping)
                        if note:
                            skipped.append(note)
                            continue
                    elif isinstance(event, Backward):
                        _run_backward(tracer, event, mapping, grads, capture)
                    elif isinstance(event, RngMark):
                        torch.set_rng_state(event.rng)
                        if event.cuda_rng is not None:
                            torch.cuda.set_rng_state_all(event.cuda_rng)
                        continue
                    replayed += 1
        finally:
            capture.suspended = False
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
        sinks: list[torch.Tensor | None] = []
        for s in targets:
            sink = None
            if s.role == "grad":
                owner = _owner_of_grad(capture, s.tensor)
                if owner is not None and id(owner) in grads:
                    sink = grads[id(owner)]
            elif isinstance(mapping.get(id(s.tensor)), torch.Tensor):
                sink = mapping[id(s.tensor)]
            sinks.append(sink)
        if window.truncated:
            skipped.append(f"the window held more than {len(window.events)} recorded calls; later ones were "
                           "not recorded")
        return ReplayResult(tracer, sinks, replayed, skipped)

    def replay_optimizer(self, optimizer: torch.optim.Optimizer, snapshot: OptimizerSnapshot,
                         roots: list[torch.nn.Module]) -> OpTracer:
        """Re-run one optimizer step from ``snapshot`` under op tracing; put the current state back.

        The sinks to ask the tracer about are ``snapshot.params`` (their values after the replay).
        """
        params = snapshot.params
        now_values = [p.detach().clone() for p in params]
        now_grads = [p.grad for p in params]
        now_state = {id(p): optimizer.state[p] for p in params if p in optimizer.state}
        tracer = OpTracer(phase="optimizer", optimizer=optimizer)
        for root in roots:
            tracer.add_root(root)
        self.capture.suspended = True
        try:
            with torch.no_grad():
                for p, value, grad in zip(params, snapshot.values, snapshot.grads, strict=True):
                    p.copy_(value)
                    p.grad = grad.clone() if grad is not None else None
            for p in params:
                if id(p) in snapshot.state:
                    optimizer.state[p] = _clone_state(snapshot.state[id(p)])
                elif p in optimizer.state:
                    del optimizer.state[p]
            with tracer:
                optimizer.step()
        finally:
            self.capture.suspended = False
            with torch.no_grad():
                for p, value, grad in zip(params, now_values, now_grads, strict=True):
                    p.copy_(value)
                    p.grad = grad
            for p in params:
                if id(p) in now_state:
                    optimizer.state[p] = now_state[id(p)]
        return tracer


def _owner_of_grad(capture: StepCapture, grad: torch.Tensor) -> torch.Tensor | None:
    for _, leaf in capture.leaves.items():
        if leaf.grad is grad:
            return leaf
    return None


def _sub(mapping: dict[int, Any]) -> Any:
    def sub(x: Any) -> Any:
        return mapping.get(id(x), x) if isinstance(x, torch.Tensor) else x

    return sub


def _remember(mapping: dict[int, Any], old_tree: Any, new_tree: Any) -> None:
    if isinstance(old_tree, torch.Tensor):
        mapping[id(old_tree)] = new_tree
        return
    old_leaves = pytree.tree_leaves(old_tree)
    new_leaves = pytree.tree_leaves(new_tree)
    if len(old_leaves) != len(new_leaves):
        return
    for old, new in zip(old_leaves, new_leaves, strict=True):
        if isinstance(old, torch.Tensor):
            mapping[id(old)] = new


def _run_pass(tracer: OpTracer, p: Pass, mapping: dict[int, Any]) -> None:
    sub = _sub(mapping)
    torch.set_rng_state(p.rng)
    if p.cuda_rng is not None:
        torch.cuda.set_rng_state_all(p.cuda_rng)
    args = pytree.tree_map(sub, p.args)
    kwargs = pytree.tree_map(sub, p.kwargs)
    with tracer.calling(fallback=p.call_site, phase="forward"), restore_autocast(p.autocast), \
            torch.set_grad_enabled(p.grad_enabled):
        if p.functional is not None:
            from torch.nn.utils.stateless import _functional_call

            params, options = p.functional
            out = _functional_call(p.module, pytree.tree_map(sub, params), args, kwargs, **options)
        else:
            out = p.module(*args, **kwargs)
    _remember(mapping, p.outputs, out)


def _run_call(tracer: OpTracer, call: Call, mapping: dict[int, Any]) -> str | None:
    sub = _sub(mapping)
    if call.inplace and call.args and isinstance(call.args[0], torch.Tensor) and id(call.args[0]) not in mapping:
        if call.before is None:
            return f"the in-place {getattr(call.func, '__name__', 'call')} at {call.frame.file}:{call.frame.line}"
        mapping[id(call.args[0])] = call.before.clone()
    args = pytree.tree_map(sub, call.args)
    kwargs = pytree.tree_map(sub, call.kwargs)
    if call.rng is not None:
        torch.set_rng_state(call.rng)
    with tracer.calling(frame=call.frame, phase="forward"), restore_autocast(call.autocast), \
            torch.set_grad_enabled(call.grad_enabled):
        out = call.func(*args, **kwargs)
    _remember(mapping, call.out, out)
    if call.inplace and call.args and isinstance(call.args[0], torch.Tensor) and isinstance(out, torch.Tensor):
        mapping[id(call.args[0])] = out
    return None


def _run_backward(tracer: OpTracer, event: Backward, mapping: dict[int, Any], grads: dict[int, torch.Tensor],
                  capture: StepCapture) -> None:
    sub = _sub(mapping)
    roots = [sub(t) for t in event.roots]
    keep = [i for i, t in enumerate(roots) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not keep:
        return
    grad_outputs = None
    if event.grad_outputs is not None:
        given = [sub(g) for g in event.grad_outputs]
        grad_outputs = [given[i] if i < len(given) else None for i in keep]
    roots = [roots[i] for i in keep]
    if event.kind == "grad":
        inputs = [sub(t) for t in event.inputs or []]
        with tracer.calling(fallback=event.frame, phase="forward"), restore_autocast(event.autocast):
            out = torch.autograd.grad(roots, inputs, grad_outputs=grad_outputs, retain_graph=True,
                                      create_graph=bool(event.options.get("create_graph", False)),
                                      allow_unused=True)
        _remember(mapping, event.out, out)
        return
    leaves = event.inputs if event.inputs is not None else [t for _, t in capture.leaves.items()]
    leaves = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    if not leaves:
        return
    with tracer.calling(fallback=event.frame, phase="forward"), restore_autocast(event.autocast):
        out = torch.autograd.grad(roots, leaves, grad_outputs=grad_outputs, retain_graph=True,
                                  create_graph=bool(event.options.get("create_graph", False)), allow_unused=True)
    for leaf, g in zip(leaves, out, strict=True):
        if g is None:
            continue
        grads[id(leaf)] = grads[id(leaf)] + g if id(leaf) in grads else g
        if leaf.grad is not None:
            mapping[id(leaf.grad)] = grads[id(leaf)]


_BOUNDARY = frozenset({_run_pass.__code__, _run_call.__code__, _run_backward.__code__, Replayer.replay.__code__})
