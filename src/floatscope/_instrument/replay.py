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
    mapping: dict[int, Any] = field(default_factory=dict)  # id(original tensor) -> its replayed value


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

    def replay(self, window: Window, targets: list[Subject], labels: dict[int, str] | None = None,
               history: list[Window] = ()) -> ReplayResult:  # type: ignore[assignment]
        """Re-execute ``window`` up to the latest event of ``targets`` under an :class:`OpTracer`.

        ``labels`` names the root models (``{id(root): label}``) in the events the tracer records.
        ``history`` holds the earlier windows of the same iteration: the events of theirs that made
        graph-carrying tensors this window uses (a GAN's ``fake = G(z)`` before the discriminator
        step) are replayed first, so a backward through them works and is traced.
        """
        capture = self.capture
        roots = list(capture.leaves.roots)
        events = self.plan(window, targets)
        tracer = OpTracer(boundary=_BOUNDARY)
        tracer.root_labels.update(labels or {})
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
            update_phase = _update_calls(window, capture)
            with tracer:
                for event in [*_prefix(window, history), *events]:
                    if isinstance(event, Pass):
                        _run_pass(tracer, event, mapping)
                    elif isinstance(event, Call):
                        # A call without grad after a backward is part of a hand-written update.
                        note = _run_call(tracer, event, mapping, "optimizer" if id(event) in update_phase else "forward")
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
        return ReplayResult(tracer, sinks, replayed, skipped, mapping)

    def plan(self, window: Window, targets: list[Subject]) -> list[Any]:
        """The events of ``window`` the targets' values depend on, in order (RNG marks kept)."""
        events = window.events
        until = max((s.order for s in targets if s.window == window.index and s.order >= 0), default=len(events) - 1)
        if any(s.role in ("grad", "param", "update", "initial") for s in targets):
            until = len(events) - 1
        until = min(until, len(events) - 1)
        makers: dict[int, list[int]] = {}
        for i, e in enumerate(events[: until + 1]):
            for t in _outputs_of(e):
                makers.setdefault(id(t), []).append(i)
        wanted: set[int] = set()
        stack: list[tuple[int, int]] = []  # (tensor id, before event index)

        def want(key: int, before: int) -> None:
            for i in reversed(makers.get(key, [])):
                if i < before:
                    stack.append((key, i))
                    return

        for s in targets:
            if s.role == "grad" or s.role in ("param", "update", "initial"):
                for i, e in enumerate(events[: until + 1]):
                    if isinstance(e, Backward) and e.kind == "backward":
                        wanted.add(i)
            else:
                want(id(s.tensor), until + 1)
        for i in list(wanted):
            for t in _inputs_of(events[i]):
                want(id(t), i)
        while stack:
            _, i = stack.pop()
            if i in wanted:
                continue
            wanted.add(i)
            for t in _inputs_of(events[i]):
                want(id(t), i)
        return [e for i, e in enumerate(events[: until + 1]) if i in wanted or isinstance(e, RngMark)]

    def stale(self, window: Window, targets: list[Subject]) -> bool:
        """Was a parameter or leaf that the replay of ``targets`` would read written after the window began?"""
        capture = self.capture
        events = self.plan(window, targets)
        owners = {id(e.module) for e in events if isinstance(e, Pass)}
        read = {id(t) for e in events if isinstance(e, (Call, Backward)) for t in _inputs_of(e)}
        for key, when in capture.written_at.items():
            if when <= window.writes:
                continue
            owner = capture.leaves.owner.get(key)
            if (owner is not None and id(owner) in owners) or key in read:
                return True
        return False

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


def _update_calls(window: Window, capture: StepCapture) -> set[int]:
    """ids of the window's calls that are part of a parameter update (the ``optimizer`` phase).

    After a backward, a call that builds no graph (no_grad, or only gradients and detached data as
    inputs, as in ``p.data.add_(-lr * p.grad)``) is part of the update when it reads a gradient the
    update read, a parameter, or what such a call made. Other such calls (the next micro-batch's
    data, a mask made from labels) are data: the ``forward`` phase.
    """
    first_backward = next((i for i, e in enumerate(window.events) if isinstance(e, Backward)), None)
    if first_backward is None:
        return set()
    tainted = set(window.grads)
    found: set[int] = set()
    for e in window.events[first_backward + 1:]:
        if not isinstance(e, Call):
            continue
        inputs = _inputs_of(e)
        if e.grad_enabled and any(t.requires_grad for t in inputs):
            continue  # builds a graph: the forward of the next micro-batch
        if any(id(t) in tainted or capture.leaves.lookup(t) is not None for t in inputs):
            found.add(id(e))
            tainted.update(id(t) for t in _outputs_of(e))
    return found


def _inputs_of(event: Any) -> list[torch.Tensor]:
    if isinstance(event, Pass):
        tree: Any = (event.args, event.kwargs, event.functional)
    elif isinstance(event, Call):
        tree = (event.args, event.kwargs)
    elif isinstance(event, Backward):
        tree = (event.roots, event.grad_outputs, event.inputs)
    else:
        return []
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _outputs_of(event: Any) -> list[torch.Tensor]:
    if isinstance(event, Pass):
        tree: Any = event.outputs
    elif isinstance(event, Call):
        tree = (event.out, event.args[0] if event.inplace and event.args else None)
    elif isinstance(event, Backward):
        tree = event.out
    else:
        return []
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _prefix(window: Window, history: list[Window]) -> list[Any]:
    """Events of earlier windows that made the graph-carrying tensors ``window`` uses, with their inputs' makers."""
    needed = {id(t) for e in window.events for t in _inputs_of(e)
              if t.grad_fn is not None and id(t) not in window.produced}
    prefix: list[Any] = []
    for earlier in sorted(history, key=lambda w: w.index, reverse=True):
        if not needed:
            break
        makers: dict[int, int] = {}
        for i, e in enumerate(earlier.events):
            for t in _outputs_of(e):
                makers[id(t)] = i
        wanted: set[int] = set()
        stack = [makers[k] for k in needed if k in makers]
        while stack:
            i = stack.pop()
            if i in wanted:
                continue
            wanted.add(i)
            stack.extend(makers[id(t)] for t in _inputs_of(earlier.events[i]) if id(t) in makers)
        events = [earlier.events[i] for i in sorted(wanted) if not isinstance(earlier.events[i], Backward)
                  or earlier.events[i].kind == "grad"]
        needed -= {id(t) for e in events for t in _outputs_of(e)}
        needed |= {id(t) for e in events for t in _inputs_of(e) if t.grad_fn is not None and id(t) not in earlier.produced}
        prefix = events + prefix
    return prefix


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


def _run_call(tracer: OpTracer, call: Call, mapping: dict[int, Any], phase: str = "forward") -> str | None:
    sub = _sub(mapping)
    if call.inplace and call.args and isinstance(call.args[0], torch.Tensor) and id(call.args[0]) not in mapping:
        if call.before is None:
            return f"the in-place {getattr(call.func, '__name__', 'call')} at {call.frame.file}:{call.frame.line}"
        mapping[id(call.args[0])] = call.before.clone()
    for t, version in call.external:
        if id(t) not in mapping and t._version != version:
            return (f"the {getattr(call.func, '__name__', 'call')} at {call.frame.file}:{call.frame.line} "
                    f"(an input was changed in place after it ran)")
    args = pytree.tree_map(sub, call.args)
    kwargs = pytree.tree_map(sub, call.kwargs)
    if call.rng is not None:
        torch.set_rng_state(call.rng)
    with tracer.calling(frame=call.frame, phase=phase), restore_autocast(call.autocast), \
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
