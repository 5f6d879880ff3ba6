"""``floatscope.watch``: watch training cheaply; replay a failing step exactly.

The watch is a façade over parts with one job each:

* :class:`~floatscope._instrument.capture.StepCapture` records what each step computes: root model
  calls, torch calls outside modules (loss code, raw-tensor models), ``backward()`` and
  ``torch.autograd.grad``, optimizer steps and in-place parameter updates, and the values the
  script reads;
* :class:`~floatscope._instrument.scaler.ScalerProbe` follows GradScalers (skipped steps, the scale);
* :class:`~floatscope._instrument.channel.StepChannel` is the one transfer per step: the L2 norm of
  every value to check and the numbers to record, in one read (late by a step on a GPU);
* :class:`~floatscope._engines.recorder.RunRecorder` is the only writer of the run store;
* :class:`~floatscope._instrument.replay.Replayer` re-executes a failing window op by op;
* :mod:`floatscope._diagnose.triage` and :mod:`floatscope._diagnose.diagnose` turn what was found into
  the diagnosis.

No Python runs per op of a model on the cheap path; a few microseconds run per torch call made
outside modules. When a value is non-finite, its window (the events since the parameters last
changed) is replayed under op-level tracing and the op that produced the first NaN/Inf is named.
"""

from __future__ import annotations

import math
import operator
import shlex
import sys
import time
import warnings
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch

from floatscope._diagnose import triage
from floatscope._diagnose.diagnose import incident_from_event
from floatscope._diagnose.optimizer import optimizer_findings, state_findings, with_optimizer_context
from floatscope._errors import NonFiniteError, Terminated, UsageError
from floatscope._engines.signals import TermHandler
from floatscope._events import UNKNOWN_FRAME, UserFrame
from floatscope._engines.recorder import RunRecorder
from floatscope._instrument.capture import (Backward, Call, CaptureListener, Pass, StepCapture, Update, Window,
                                            inplace_target)
from floatscope._instrument.channel import Group, Payload, Reading, StepChannel, Subject, SyncPolicy
from floatscope._instrument.frames import frame_from, user_stacklevel
from floatscope._instrument import ops as kinds
from floatscope._instrument.health import HealthSampler
from floatscope._instrument.hooks import HookSet
from floatscope._instrument.modules import float_leaves
from floatscope._instrument.replay import OptimizerSnapshot, Replayer, snapshot_optimizer
from floatscope._instrument.scaler import ScalerProbe
from floatscope._numerics.stats import operand_stats
from floatscope._results import Incident, RunResult
from floatscope._store.schema import RunConfig
from floatscope._store.sqlite import DEFAULT_STORE, RunStore

__all__ = ["Watch", "watch", "DEFAULT_HEALTH_EVERY"]

OnAnomaly = Literal["raise", "warn", "record"]

# Health sampled every this many steps: chosen so the watch stays within budget on
# benchmarks/overhead.py (see the README's figures).
DEFAULT_HEALTH_EVERY = 50
_RECENT_NORMS = 16
_STRIDED = torch.strided
_EARLY_WEIGHTS = 3
_MAX_CONTAINED_REFS = 16


def _guarded(method: Callable[..., Any]) -> Callable[..., Any]:
    """Hooks never break the user's training: an internal error disables the watch with a warning."""

    def hook(self: "Watch", *args: Any, **kwargs: Any) -> Any:
        if self._broken:
            return None
        try:
            return method(self, *args, **kwargs)
        except NonFiniteError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported, never swallowed silently
            self._broken = True
            warnings.warn(f"floatscope stopped watching after an internal error in {method.__name__}: "
                          f"{type(exc).__name__}: {exc}. Training continues unwatched; please report this.",
                          RuntimeWarning, stacklevel=2)
            return None

    hook.__name__ = method.__name__
    return hook


class Watch(CaptureListener):
    """Watch a model's training for the first NaN/Inf; a context manager.

    Args:
        model: The model (or models) to watch. ``None`` watches every module called at top level
            (what ``floatscope run`` does). Torch calls made outside the models (the loss, raw
            tensors) are watched either way.
        optimizer: The optimizer (or optimizers). ``None`` watches every ``torch.optim`` optimizer.
        scaler: A ``torch.amp.GradScaler``. ``None`` follows every GradScaler the block uses (a step it skips
            for Inf/NaN gradients is counted, not an incident).
        on_anomaly: ``"raise"`` raises :class:`NonFiniteError` where the failure is found;
            ``"warn"`` warns and continues; ``"record"`` only records.
        store: Run store path, a :class:`RunStore`, or None for no store.
        run_name: Name recorded with the run.
        command: Command line recorded with the run.
        max_consecutive_skips: GradScaler skips in a row that count as a loss-scale collapse.
        replay: Replay a failing step under op-level tracing to name the op (default True).
        health_every: Sample per-layer health every this many steps (0 turns it off).
        exact_optimizer: Keep a copy of parameters, gradients and optimizer state before every
            step, so an optimizer-made NaN/Inf is replayed op by op (the aten op is named). Costs
            a copy of the optimizer's memory per step; off by default.
        sync: When to read the device: ``"auto"`` (at each step on the CPU, one step late on a
            GPU so it never waits), ``"step"`` (at each step; exact replays on a GPU too) or
            ``"lazy"`` (always one step late).

    Attributes:
        incident: The first :class:`Incident`, or None.
        result: The :class:`RunResult`, set on exit.
        run_id: The run's id in the store ("" without one).

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with floatscope.watch(model, opt, store=None) as w:
        ...     for _ in range(3):
        ...         opt.zero_grad()
        ...         model(torch.randn(8, 4)).pow(2).mean().backward()
        ...         opt.step()
        >>> w.result.status
        'clean'
    """

    def __init__(
        self,
        model: torch.nn.Module | Sequence[torch.nn.Module] | None = None,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        *,
        scaler: Any = None,
        on_anomaly: OnAnomaly = "raise",
        store: str | Path | RunStore | None = DEFAULT_STORE,
        run_name: str | None = None,
        command: str | None = None,
        max_consecutive_skips: int = 32,
        replay: bool = True,
        health_every: int = DEFAULT_HEALTH_EVERY,
        exact_optimizer: bool = False,
        sync: SyncPolicy = "auto",
    ) -> None:
        if on_anomaly not in ("raise", "warn", "record"):
            raise UsageError(f"on_anomaly must be 'raise', 'warn' or 'record', not {on_anomaly!r}")
        if sync not in ("auto", "step", "lazy"):
            raise UsageError(f"sync must be 'auto', 'step' or 'lazy', not {sync!r}")
        self._models = _as_list(model, torch.nn.Module, "model", "torch.nn.Module")
        self._optimizers = _as_list(optimizer, torch.optim.Optimizer, "optimizer", "torch.optim.Optimizer")
        if max_consecutive_skips < 1:
            raise UsageError("max_consecutive_skips must be at least 1")
        if health_every < 0:
            raise UsageError("health_every must be 0 (off) or a positive number of steps")
        self._scaler = scaler
        self._on_anomaly = on_anomaly
        self._store_arg = store
        self._run_name = run_name
        self._command = command if command is not None else " ".join(shlex.quote(a) for a in sys.argv)
        self._max_skips = max_consecutive_skips
        self._replay = replay
        self._health_every = health_every
        self._exact_optimizer = exact_optimizer
        self._sync = sync
        self.incident: Incident | None = None
        self.result: RunResult | None = None
        self.run_id = ""
        self._active = False
        self._broken = False

    # ================================================================== lifecycle
    def __enter__(self) -> "Watch":
        if self._active:
            raise UsageError("this watch is already active; create a new floatscope.watch(...) for each block")
        self._store, self._owns_store = self._open_store()
        config = RunConfig.patch(on_anomaly=self._on_anomaly, global_watch=not self._models,
                                 max_consecutive_skips=self._max_skips, health_every=self._health_every)
        try:
            self._recorder = RunRecorder(self._store, name=self._run_name, command=self._command, config=config)
        except BaseException:
            self._close_store()
            raise
        self.run_id = self._recorder.run_id
        self._channel = StepChannel(self._sync)
        self._health = HealthSampler(self._health_every if self._store is not None else 0)
        self._capture = StepCapture(self, self._models, self._optimizers)
        self._replayer = Replayer(self._capture)
        self._probe = ScalerProbe(self._capture, self._scaler, all_scalers=self._scaler is None,
                                  on_update=self._scaler_updated)
        self._hooks = HookSet()
        self._windows: dict[int, Window] = {}
        self._snapshots: dict[int, OptimizerSnapshot] = {}
        self._labels: dict[int, str] = {}
        self._optimizer_names: dict[int, tuple[tuple[int, ...], list[tuple[str, torch.Tensor]]]] = {}
        self._configured: set[int] = set()
        self._step_norms: dict[int, float] = {}
        self._scales: list[float] = []
        self._intentional: set[tuple[str, int]] = set()
        # Non-finite values that have not reached a loss, gradient, parameter or read (yet), by location:
        # the diagnosis, and the tensor it was found in (weakly: it may be an input of a later step).
        self._contained: dict[tuple[str, int], tuple[Incident, list[Any], str]] = {}
        # Gradients so large their squares overflow (|g| >~ 1e19) were seen at this step: check the optimizer
        # state after its update (Adam's second moment turns Inf and the weights silently stop training).
        self._huge_grads: tuple[int, float] | None = None
        self._weights_clean = -1  # the last step after which every watched parameter was read finite
        self._huge_abs: dict[int, float] = {}
        self._state_meta: dict[int, tuple[torch.optim.Optimizer, torch.Tensor, str, str, int]] = {}
        self._read_at: UserFrame | None = None
        # The last skipped step: its window, gradient subjects, and the loss scale it ran with.
        self._skipped_window: tuple[Window, list[Subject], torch.Tensor | None, torch.Tensor | None] | None = None
        self._seen_optimizers: dict[int, torch.optim.Optimizer] = {}
        self._step_frame: dict[int, UserFrame] = {}
        self._health_params: tuple[int, list[str], list[torch.Tensor]] | None = None
        self._matrices_of: tuple[list[tuple[str, torch.Tensor]], tuple[list[str], list[torch.Tensor]]] | None = None
        self._sampling_window = -1
        self._provisional = False  # the sampled call is an inference call made before the run trained
        self._provisional_steps: list[int] = []  # the steps of such samples already stored
        self._superseded: set[int] = set()  # windows whose such sample a training call's replaced
        self._term = TermHandler()
        try:
            self._capture.install()
            self._probe.install(self._hooks)
            self._term.install()
        except BaseException:
            self._term.remove()
            self._capture.remove()
            self._hooks.close()
            self._close_store()
            raise
        self._active = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        pending_error: NonFiniteError | None = None
        try:
            if exc_type is None or not issubclass(exc_type, NonFiniteError):
                try:
                    with self._capture.own():
                        self._final_read()
                except NonFiniteError as err:
                    pending_error = err
            promoted = self._promote_contained(exc_type, exc)
            if promoted is not None and exc_type is None and self._on_anomaly == "raise":
                pending_error = NonFiniteError(promoted)
        finally:
            try:
                self._capture.remove()
            finally:
                self._hooks.close()
                self._health.close()
                self._term.remove()
                self._active = False
            self.result = self._result(exc_type, exc)
            try:
                self._recorder.finish(status=self.result.status, steps=self.result.steps,
                                      skipped=self.result.skipped_steps, result=self.result.to_dict())
            finally:
                self._close_store()
                self._windows.clear()
                self._snapshots.clear()
        if pending_error is not None and exc_type is None:
            raise pending_error

    def _open_store(self) -> tuple[RunStore | None, bool]:
        store = self._store_arg
        if store is None:
            return None, False
        if isinstance(store, RunStore):
            return store, False
        return RunStore(store), True

    def _close_store(self) -> None:
        if self._owns_store and self._store is not None:
            self._store.close()
        self._store = None

    def _result(self, exc_type: Any, exc: Any) -> RunResult:
        coverage = self._capture.coverage
        steps = self._capture.clock.completed
        if self.incident is not None:
            status = "nonfinite"
        elif exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            status = "interrupted"
        elif exc_type is not None and issubclass(exc_type, Terminated):
            status = "terminated"
        elif exc_type is not None and not issubclass(exc_type, (NonFiniteError, SystemExit)):
            status = "error"
        elif exc_type is SystemExit and exc is not None and exc.code not in (0, None):
            status = "error"
        elif not coverage.anything:
            status = "unwatched"
        else:
            status = "clean"
        error = f"{type(exc).__name__}: {exc}" if status == "error" and exc is not None else None
        watched = {"models": coverage.modules, "model_calls": coverage.passes, "calls": coverage.calls,
                   "backward": coverage.backward, "grad_calls": coverage.grad_calls,
                   "optimizer_steps": coverage.optimizer_steps, "manual_updates": coverage.manual_updates,
                   "reads": coverage.reads}
        return RunResult(status=status, run_id=self.run_id, steps=steps, skipped_steps=self._probe.skipped,
                         incident=self.incident, loss_scale=self._scales[-1] if self._scales else None,
                         error=error, watched=watched,
                         contained=_distinct([c for c, _, _ in self._contained.values()]) if self.incident is None
                         else [])

    # ================================================================== capture events
    @_guarded
    def pass_begun(self, p: Pass, first: bool) -> None:
        capture, channel = self._capture, self._channel
        if first:
            self._labels[id(p.module)] = type(p.module).__name__
            init = self._recorder.model(p.module)
            if init is not None:
                channel.record(init)
            self._recorder.precision(p.module, self._scaler or self._probe.last_scaler)
        payload = self._recorder.inputs((p.args, p.kwargs))
        if payload is not None:
            channel.record(payload)
        window = capture.window
        if self._health.every:
            # A training call after an inference call in the same window, before the run trained, replaces
            # that call's sample: the first optimizer step gives this window's iteration to the training call.
            again = (self._sampling_window == window.index and self._provisional and p.grad_enabled
                     and not self._trained())
            if (again or self._sampling_window != window.index) and self._samples(p, window):
                if again:
                    self._superseded.add(window.index)
                self._sampling_window = window.index
                self._provisional = not p.grad_enabled and not self._trained()
                self._health.attach([p.module])

    def _trained(self) -> bool:
        clock = self._capture.clock
        return clock.optimizer_mode or clock.saw_backward

    def _samples(self, p: Pass, window: Window) -> bool:
        """Whether this model call is the one sampled in its window.

        Once the run has computed a gradient, the first call with grad enabled is (a no_grad teacher or
        validation call before it is not). Before that, model calls under no_grad are iterations of
        their own (inference); a call with grad enabled is sampled when its iteration is a sampling
        step either as counted now or as it will be if an optimizer step follows (which folds the
        inference iterations before it into step 0, see IterationClock.step_begins).
        """
        health = self._health
        if self._trained():
            return p.grad_enabled and health.is_sampling(window.iteration)
        if not p.grad_enabled:
            return not p.index and health.is_sampling(window.iteration)
        return health.is_sampling(window.iteration) or health.is_sampling(self._capture.clock.manual_completed)

    @_guarded
    def pass_ended(self, p: Pass) -> None:
        if self._health.attached:
            layout, table = self._health.take_activations()
            if table is not None:
                # The step is read with the sample: an optimizer step may renumber the window's iteration.
                self._channel.record(Payload("activations", table.reshape(-1),
                                             (self._capture.window, layout, self._provisional)))

    @_guarded
    def leaves_added(self, leaves: list[tuple[str, torch.Tensor]]) -> None:
        window = self._capture.window
        for name, t in leaves:
            if t.is_floating_point():
                self._channel.check(Subject("initial", t, name=name, order=-1, window=window.index,
                                            step=window.iteration))

    @_guarded
    def before_update(self, reason: str, optimizer: torch.optim.Optimizer | None) -> None:
        """The parameters are about to change: read everything the window computed, now."""
        window = self._capture.window
        self._queue_window(window)
        step = window.iteration
        if optimizer is not None:
            self._seen_optimizers[id(optimizer)] = optimizer
            if reason == "step":
                self._step_frame[id(optimizer)] = frame_from(sys._getframe(1))
                if self._provisional_steps:  # inference iterations folded into step 0: not steps after all
                    self._recorder.retract_activations(self._provisional_steps)
                    self._provisional_steps = []
            if id(optimizer) not in self._configured:
                self._configured.add(id(optimizer))
                self._recorder.optimizer(optimizer, self._probe.last_scaler or self._scaler)
            named = self._named_params(optimizer)
            if self._huge_grads is not None and self._huge_grads[0] < step:
                self._queue_state(optimizer, window, self._huge_grads[0])
            grad_names, grads, grad_params = [], [], []
            for n, p in named:
                g = p.grad
                if g is not None and g.layout == _STRIDED:
                    grad_names.append(n)
                    grads.append(g)
                    grad_params.append(p)
            self._capture.grads_pending = None
            if grads:
                self._windows[window.index] = window
                window.grads.update(map(id, grads))
                self._channel.check(Group("grad", grads, grad_names, order=len(window.events), window=window.index,
                                          step=step))
            if reason == "step" and self._weights_due(step - 1):
                self._channel.check(Group("param", [p for _, p in named], [n for n, _ in named], order=-1,
                                          window=window.index, step=step - 1))
            if reason == "step" and self._health.is_sampling(step) and self._health.every:
                scaler = self._probe.last_scaler
                scale = getattr(scaler, "_scale", None) if scaler is not None and scaler.is_enabled() else None
                fp16 = (scale is not None or any(p.dtype == torch.float16 for p in grad_params) or any(
                    isinstance(e, Pass) and any(d == torch.float16 for _, on, d in e.autocast if on)
                    for e in window.events))
                flush = self._health.before_step(grad_params, scale, fp16) if fp16 else None
                # Update norms (the update/weight ratio) for weight matrices, the layers that finding reads.
                names, matrices = self._matrices(named, grad_names, grad_params)
                self._health.snapshot(matrices)
                self._health_params = (step, names, matrices)
                if flush is not None:
                    scale_value = self._scales[-1] if scale is not None and self._scales else (
                        None if scale is not None else 1.0)
                    self._channel.record(Payload("flush", flush, (step, grad_names, scale_value)))
        else:
            self._queue_grads(window, self._capture.pending_grads(), step)
        self._queue_scale(step)
        self._read(self._channel.transfer())
        if optimizer is not None and reason == "step" and self._exact_optimizer:
            self._snapshots[id(optimizer)] = snapshot_optimizer(optimizer, step)

    @_guarded
    def after_update(self, reason: str, optimizer: torch.optim.Optimizer | None, updates: list[Update]) -> None:
        capture = self._capture
        if optimizer is not None:
            sampled = self._health_params
            if sampled is not None:
                self._health_params = None
                step, names, params = sampled
                update = self._health.after_step(params)
                if update is not None:
                    order, norms = update
                    if order is not None:
                        names = [names[k] for k in order]
                    self._channel.record(Payload("update", norms, (step, names)))
            # Rows of earlier steps are complete once their transfers are read (one step later when lazy).
            lag = 1 if self._channel.in_flight else 0
            self._recorder.flush(capture.clock.index - lag, steps=capture.clock.completed, skipped=self._probe.skipped)
            return
        window = capture.window
        self._queue_window(window)  # the calls that computed the updates, before the window closes
        for u in updates:
            if getattr(u.func, "__name__", "") in _WRITES:
                # Values written as they are (a checkpoint load, an assignment) are data: the parameter is
                # checked where it is used, which names the write if it broke it.
                continue
            for t, name in zip(u.targets, u.names, strict=True):
                self._channel.check(Subject("update", t, event=u, name=name, order=len(window.events),
                                            window=window.index, step=u.iteration))
        self._windows[window.index] = window

    @_guarded
    def skipped_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._seen_optimizers[id(optimizer)] = optimizer
        window = self._capture.window
        self._queue_window(window)
        named = self._named_params(optimizer)
        grads = [(n, g) for n, g in ((n, p.grad) for n, p in named) if g is not None and g.layout == _STRIDED]
        self._capture.grads_pending = None
        group = self._queue_grads(window, grads, window.iteration)
        scale = getattr(self._probe.last_scaler, "_scale", None)
        with self._capture.own():
            saved = scale.detach().clone() if isinstance(scale, torch.Tensor) else None  # update() changes it in place
        self._skipped_window = (window, [group.subject(i) for i in range(len(group.tensors))] if group else [],
                                scale if saved is not None else None, saved)
        self._recorder.step(window.iteration, loss=None, grad_norm=None, loss_scale=None, skipped=True)
        self._read(self._channel.transfer(), skipped=True)

    @_guarded
    def before_grads_cleared(self) -> None:
        window = self._capture.window
        self._queue_grads(window, self._capture.pending_grads(), window.iteration)
        self._read(self._channel.transfer())

    @_guarded
    def boundary(self) -> None:
        window = self._capture.window
        self._queue_window(window)
        self._queue_grads(window, self._capture.pending_grads() if self._capture.grads_pending is not None else [],
                          window.iteration)
        self._read(self._channel.transfer())
        self._recorder.flush(self._capture.clock.index, steps=self._capture.clock.completed,
                             skipped=self._probe.skipped)

    @_guarded
    def read(self, tensor: torch.Tensor, frame: UserFrame, nonfinite: bool) -> None:
        window = self._capture.window
        self._queue_window(window)
        if nonfinite and id(tensor) not in window.produced:
            self._channel.check(Subject("checked", tensor, order=len(window.events), window=window.index,
                                        step=window.iteration))
        if self._capture.grads_pending is not None:
            self._queue_grads(window, self._capture.pending_grads(), window.iteration)
        self._read_at = frame
        try:
            self._read(self._channel.transfer(blocking=True if nonfinite else None))
        finally:
            self._read_at = None

    def _final_read(self) -> None:
        """The end of the watched block: read everything still pending, waiting for the device."""
        capture = self._capture
        capture.finish()
        window = capture.window
        self._queue_window(window)
        if capture.grads_pending is not None:
            self._queue_grads(window, capture.pending_grads(), window.iteration)
        # The weights after the last update (their fingerprint, and whether that update broke them).
        step = capture.clock.index if capture.clock.optimizer_mode else -1
        for optimizer in self._seen_optimizers.values():
            named = self._named_params(optimizer)
            self._channel.check(Group("param", [p for _, p in named], [n for n, _ in named], order=-1,
                                      window=window.index, step=step))
            self._queue_state(optimizer, window, self._huge_grads[0] if self._huge_grads else step)
        # The scale after the last update belongs to the last step, not to a row of its own.
        completed = capture.clock.completed
        self._queue_scale(window.iteration if window.iteration < completed or not completed else completed - 1)
        self._read(self._channel.transfer(blocking=True))

    def _promote_contained(self, exc_type: Any, exc: Any) -> Incident | None:
        """At the end: a contained value is the incident when the script failed or a model's output was NaN."""
        if self.incident is not None or not self._contained:
            return None
        failed = (exc_type is not None and not issubclass(exc_type, (NonFiniteError, KeyboardInterrupt, SystemExit,
                                                                     Terminated))
                  ) or (exc_type is SystemExit and exc is not None and exc.code not in (0, None))
        for key, (incident, _, role) in self._contained.items():
            if failed or (incident.kind == "nan" and role == "output"):
                del self._contained[key]
                self.incident = triage.contained_reached(incident, reached=None, step=incident.step, failed=failed)
                self._recorder.event(self.incident.step, "incident", self.incident.to_dict())
                return self.incident
        return None

    # ================================================================== queueing
    def _queue_window(self, window: Window) -> None:
        subjects = self._capture.take_subjects()
        for s in subjects:
            s.step = window.iteration
            self._channel.check(s)
        unscaled = self._probe.unscaled
        losses = [unscaled.pop(id(t), t) for e in window.events[window.checked_losses:]
                  if isinstance(e, Backward) and e.kind == "backward"
                  for t in e.roots if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() == 1]
        window.checked_losses = len(window.events)
        if losses:
            values = torch.stack([v.detach().reshape(()).float().to(losses[0].device) for v in losses])
            self._channel.record(Payload("loss", values, window.iteration))
        self._windows[window.index] = window

    def _queue_grads(self, window: Window, grads: list[tuple[str, torch.Tensor]], step: int) -> Group | None:
        self._windows[window.index] = window
        if not grads:
            return None
        window.grads.update(id(g) for _, g in grads)
        group = Group("grad", [g for _, g in grads], [n for n, _ in grads], order=len(window.events),
                      window=window.index, step=step)
        self._channel.check(group)
        return group

    def _queue_scale(self, step: int) -> None:
        scaler = self._probe.last_scaler
        scale = getattr(scaler, "_scale", None) if scaler is not None else None
        if isinstance(scale, torch.Tensor) and scaler.is_enabled():
            self._channel.record(Payload("scale", scale.reshape(()), step))

    def _queue_state(self, optimizer: torch.optim.Optimizer, window: Window, step: int) -> None:
        """Check the optimizer's state tensors (moments, momentum buffers) after the update of ``step``."""
        self._huge_grads = None
        tensors, names = [], []
        for name, p in self._named_params(optimizer):
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 1:
                    tensors.append(value)
                    names.append(name)
                    self._state_meta[id(value)] = (optimizer, p, name, key, step)
        if tensors:
            self._channel.check(Group("state", tensors, names, order=-1, window=window.index, step=step))

    def _state_incident(self, s: Subject) -> Incident:
        optimizer, param, name, key, step = self._state_meta[id(s.tensor)]
        lines, explanation, suggestions = state_findings(optimizer, param, key,
                                                         self._huge_abs.get(step) if self._huge_abs else None)
        owner = self._capture.leaves.owner.get(id(param))
        return triage.optimizer_incident(
            step=step, optimizer_name=type(optimizer).__name__, name=name,
            module=_module_of(name) if owner is not None else None,
            model=self._labels.get(id(owner)) if owner is not None else None,
            frame=self._step_frame.get(id(optimizer), UNKNOWN_FRAME), output=operand_stats(s.tensor.detach()),
            state_lines=lines, explanation=explanation, suggestions=suggestions, replayed=True)

    def _weights_due(self, step: int) -> bool:
        """Weight fingerprints (after the update of ``step``) for the first steps and every sampled step.

        Gradient fingerprints are taken every step; weights, a second norm per parameter, only where
        ``diff`` needs them most (the first steps, where configuration differences show) and on
        health-sampling steps, which keeps the fixed cost per step to one norm per gradient.
        """
        return 0 <= step < _EARLY_WEIGHTS or self._health.is_sampling(step)

    def _matrices(self, named: list[tuple[str, torch.Tensor]], names: list[str],
                  params: list[torch.Tensor]) -> tuple[list[str], list[torch.Tensor]]:
        """The weight matrices (2 or more dimensions) among ``params`` and their names; kept for an
        optimizer's parameter list while all of them have gradients (the common case)."""
        every = len(params) == len(named)
        if every and self._matrices_of is not None and self._matrices_of[0] is named:
            return self._matrices_of[1]
        chosen = ([n for n, p in zip(names, params, strict=True) if p.dim() >= 2],
                  [p for p in params if p.dim() >= 2])
        if every:
            self._matrices_of = (named, chosen)
        return chosen

    def _named_params(self, optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
        """(name, parameter) of an optimizer's float parameters, cached while its param groups keep their sizes."""
        sizes = tuple(len(g["params"]) for g in optimizer.param_groups)
        cached = self._optimizer_names.get(id(optimizer))
        if cached is not None and cached[0] == sizes:
            return cached[1]
        params = [p for g in optimizer.param_groups for p in g["params"]
                  if isinstance(p, torch.Tensor) and p.is_floating_point()]
        leaves = self._capture.leaves
        named = []
        for i, p in enumerate(params):
            name = leaves.name(p)
            if name is None:
                leaves.add_raw(p, None, name=f"param_groups[{_group_of(optimizer, p)}][{i}]")
                name = leaves.name(p) or ""
            named.append((name, p))
        self._optimizer_names[id(optimizer)] = (sizes, named)
        return named

    # ================================================================== reading
    def _read(self, readings: list[Reading], *, skipped: bool = False) -> None:
        recorder, capture = self._recorder, self._capture
        for reading in readings:
            grads: dict[int, tuple[list[str], list[float]]] = {}
            weights: dict[int, tuple[list[str], list[float]]] = {}
            for entry, norms in reading.groups:
                if isinstance(entry, Group) and entry.names is not None and entry.role in ("grad", "param"):
                    names, values = (grads if entry.role == "grad" else weights).setdefault(entry.step, ([], []))
                    names.extend(entry.names)
                    values.extend(norms)
            for step, (names, values) in grads.items():
                sampled = self._health.is_sampling(step) and bool(self._health.every)
                recorder.fingerprint(step, "grad", names, values, health=sampled)
                # The norms are float32 values (at most 3.4e38): their squares cannot overflow a double, so the
                # sum is finite exactly when every norm is.
                squares = math.fsum(map(operator.mul, values, values))
                if math.isfinite(squares):
                    total = math.sqrt(squares)
                    largest = max(values, default=0.0)
                else:
                    total = math.nan if any(math.isnan(v) for v in values) else math.inf
                    largest = max((v for v in values if math.isfinite(v)), default=0.0)
                recorder.step(step, loss=None, grad_norm=total, loss_scale=None, skipped=skipped)
                if largest >= _HUGE_GRAD and not skipped:
                    self._huge_grads = (step, largest)
                    self._huge_abs[step] = largest
                self._step_norms[step] = total  # the latest read of a step's gradients (accumulated) wins
                if len(self._step_norms) > _RECENT_NORMS:
                    del self._step_norms[min(self._step_norms)]
            for step, (names, values) in weights.items():
                if math.isfinite(math.fsum(values)):  # an Inf or NaN makes the sum non-finite; norms are >= 0
                    self._weights_clean = max(self._weights_clean, step)
                if step >= 0:
                    sampled = self._health.is_sampling(step) and bool(self._health.every)
                    recorder.fingerprint(step, "weight", names, values, health=sampled)
            for payload, values in reading.payload:
                if payload.kind == "loss":
                    recorder.step(payload.meta, loss=math.fsum(values) / len(values) if values else None,
                                  grad_norm=None, loss_scale=None, skipped=skipped)
                elif payload.kind == "scale":
                    self._scales.append(values[0])
                    recorder.step(payload.meta, loss=None, grad_norm=None, loss_scale=values[0], skipped=False)
                elif payload.kind == "activations":
                    self._activations(payload, values)
                else:
                    recorder.payload(payload, values)
            bad = [s for s in reading.bad() if not (skipped and s.role == "grad")]
            if bad and self.incident is None:
                self._triage(bad)
        # Keep this iteration's windows (a later one may need their graph to replay) and those still in flight.
        current = capture.window.iteration
        for index in [i for i, w in self._windows.items() if w.iteration < current and not self._in_flight(i)]:
            del self._windows[index]

    def _activations(self, payload: Payload, values: list[float]) -> None:
        """Store one activation sample under its window's iteration as it is now.

        A sample of an inference call made before the run trained (``provisional``: a validation
        pass before training, Lightning's sanity check) belongs to an iteration that the first
        optimizer step folds away: it is dropped then, and those already stored are deleted, so that
        step 0's sample is its training pass's.
        """
        window, layout, provisional = payload.meta
        step = window.iteration
        if provisional and (self._capture.clock.optimizer_mode or window.index in self._superseded):
            return
        if not self._health.is_sampling(step):
            return  # sampled in case an optimizer step renumbered it, and none did
        if provisional:
            self._provisional_steps.append(step)
        self._recorder.payload(Payload("activations", payload.tensor, (step, layout)), values)

    def _in_flight(self, window_index: int) -> bool:
        return any(e.window == window_index for flight in self._channel.in_flight for e in flight.entries)

    # ================================================================== triage
    def _triage(self, bad: list[Subject]) -> None:
        key = _intent_key(bad)
        if key is not None and key in self._intentional:
            return
        # A non-finite intermediate that no loss, gradient, parameter or read has met is not a failure yet
        # (log(0) = -inf that a cross_entropy or a where absorbs): diagnosed now, reported when it reaches one.
        urgent = any(self._urgent(s) for s in bad)
        if not urgent and (key is None or key in self._contained or len(self._contained) >= _MAX_CONTAINED):
            return
        start = time.perf_counter()
        try:
            incident = self._diagnose(bad)
        except NonFiniteError:
            raise
        except Exception as exc:  # noqa: BLE001 - a triage failure must never hide the finding
            first = min(bad, key=_timeline)
            incident = triage.coarse_incident(
                step=first.step, phase="forward", found=_found(bad), reason=f"the diagnosis failed with "
                f"{type(exc).__name__}: {exc}", stats=operand_stats(first.tensor.detach()),
                frame=_subject_frame(first), model=None, module=None, seconds=time.perf_counter() - start)
        if incident is None:
            if key is not None:
                self._intentional.add(key)
            return
        if not urgent:
            assert key is not None
            first = min(bad, key=_timeline)
            # Every value of the reading that holds it (what a cat or a scaling before the loop made of it) leads
            # back to this diagnosis when it reaches a loss later.
            refs = [weakref.ref(s.tensor) for s in sorted(bad, key=_timeline)[:_MAX_CONTAINED_REFS]]
            role = "output" if any(s.role == "output" for s in bad) else first.role
            self._contained[key] = (incident, refs, role)
            return
        if self._read_at is not None:
            incident = triage.with_read(incident, self._read_at)
        self._report(incident)

    def _urgent(self, s: Subject) -> bool:
        """A failure now: a loss, gradient or parameter; a value the script read or checked; a scalar; a
        model's NaN output, or any non-finite output of a model run for inference."""
        if s.role in _SERIOUS or s.role == "checked":
            return True
        window = self._windows.get(s.window)
        if window is not None and id(s.tensor) in window.checked:
            return True
        if s.tensor.numel() == 1:
            return True  # a scalar is a loss or a metric, whether or not it reached backward()
        if s.role == "output" and isinstance(s.event, Pass):
            return not s.event.grad_enabled or bool(torch.isnan(s.tensor).any())
        return False

    def _diagnose(self, bad: list[Subject]) -> Incident | None:
        capture = self._capture
        states = [s for s in bad if s.role == "state"]
        if states and len(states) == len(bad):
            return self._state_incident(states[0])
        bad = [s for s in bad if s.role != "state"] or bad
        first = min(bad, key=_timeline)
        window = self._windows.get(first.window, capture.window if first.window == capture.window.index else None)
        step = first.step if first.step >= 0 else (window.iteration if window else capture.clock.index)

        if window is None:
            return self._coarse(bad, step, "the step's record was already released", None)
        broken = self._broken_parameter(bad, step, window)
        if broken is not None:
            return broken
        found = self._contained_input(window, step, bad)
        if found is not None:
            return found
        found = self._bad_input(window, step, nan_only=True)
        if found is not None:
            return found
        # A hand-written update is read after it ran: the values it was computed from are the origin when
        # they are non-finite too; otherwise the update itself made the parameter non-finite.
        updates = [s for s in bad if s.role == "update"]
        bad = [s for s in bad if s.role != "update"]
        if updates:
            first = min(updates, key=_timeline)
            if any(isinstance(a, torch.Tensor) and self._contained_origin(a) is not None for a in first.event.args[1:]):
                # The first update's operand was diagnosed when it was computed (read before the update ran),
                # before anything else of the group: W -= lr * W.grad, then b -= lr * b.grad.
                leaf = capture.leaves.lookup(first.tensor)
                return self._update_finding(first.event, first.name or "", leaf[0] if leaf else first.tensor)
        if not bad:
            first = min(updates, key=_timeline)
            leaf = capture.leaves.lookup(first.tensor)
            return self._update_finding(first.event, first.name or "", leaf[0] if leaf else first.tensor)
        first = min(bad, key=_timeline)
        window = self._windows.get(first.window, window)
        step = first.step if first.step >= 0 else window.iteration
        stale = self._replayer.stale(window, [s for s in bad if s.window == window.index])
        if not self._replay:
            return self._coarse(bad, step, "replay is disabled (replay=False / --no-replay)", window)
        if stale:
            return self._coarse(bad, step, "the parameters had changed by the time this step's values were read "
                                "(sync='lazy' reads one step late); re-run with sync='step' (--sync step) to name the "
                                "op", window)
        start = time.perf_counter()
        targets = sorted((s for s in bad if s.window == window.index), key=_timeline)
        try:
            history = [w for w in self._windows.values() if w.iteration == window.iteration and w.index < window.index]
            result = self._replayer.replay(window, targets, self._labels, history)
        except Exception as exc:  # noqa: BLE001 - a replay failure must never hide the finding
            return self._coarse(bad, step, f"the replay raised {type(exc).__name__}: {exc}", window,
                                time.perf_counter() - start)
        seconds = time.perf_counter() - start
        tracer = result.tracer
        unexplained: Subject | None = None
        for subject, sink in zip(targets, result.sinks, strict=True):
            verdict, event, last = tracer.explain(sink) if sink is not None else ("unreplayed", None, None)
            serious = subject.role in _SERIOUS
            if verdict == "origin":
                assert event is not None
                if not serious:
                    # The intermediate that holds the first value; what it did (the NaN gradients of a masked
                    # log) is what a later, serious subject of the same lineage reached.
                    for other, other_sink in zip(targets, result.sinks, strict=True):
                        if other.role in _SERIOUS and other_sink is not None:
                            v, root, reached = tracer.explain(other_sink)
                            if v == "origin" and root is event and reached is not None:
                                last = reached
                                break
                incident = incident_from_event(event, last, step=step, replay_seconds=seconds)
                if incident.phase == "optimizer" and incident.param is None:
                    # A hand-written update: the parameter it wrote (W -= lr * W.grad).
                    written = [u.names[0] for u in window.events if isinstance(u, Update) and u.names] + list(
                        capture.pending_update)
                    name = min(updates, key=_timeline).name if updates else (written[0] if written else None)
                    incident = replace(incident, param=name)
                if event.external_inf_inputs and event.external_inputs and not kinds.is_(event.op, kinds.SOFTMAX):
                    # Infinities in the data that an op turned into NaN (inf * 0, inf - inf): the data is the
                    # origin. A softmax of fully masked rows is not: masks hold -inf on purpose.
                    inp = self._input_for_keys(window, event.external_inputs, step, result.mapping)
                    if inp is not None:
                        what, stats, frame, model, module = inp
                        return triage.refine_input(incident, what=what, stats=stats, frame=frame, model=model,
                                                   module=module)
                return triage.with_divergence(incident, [v for _, v in sorted(self._step_norms.items()) if _ < step])
            if verdict == "intended":
                assert event is not None and sink is not None
                written = self._tensor_at(window, event.output_key, result.mapping)
                direct = written is not None and _same_storage(written, sink, result.mapping)
                if serious or (event.kind == "nan" and not direct):
                    # A NaN placeholder that flowed into a computed value, or any intended value in a loss.
                    stats = operand_stats((written if written is not None else sink).detach())
                    return triage.intended_incident(step=step, event=event, reached=_ROLE_WORDS.get(
                        subject.role, subject.role), stats=stats, seconds=seconds)
                continue  # a mask's -inf where it is meant to be, or a NaN not used yet
            if verdict == "external":
                # Inf from a tensor made before this window (a mask built once) is only a failure in a loss
                # or a gradient; NaN from outside is broken data wherever it shows.
                inp = self._bad_input(window, step, nan_only=not serious)
                if inp is not None:
                    return replace(inp, replay_seconds=seconds)
                if serious:
                    unexplained = unexplained or subject
                continue
            unexplained = unexplained or subject
        if unexplained is None:
            return None  # only intended infinities were read or checked: not an incident
        reason = ("the replay with the same inputs, RNG and autocast state stayed finite (non-deterministic "
                  "kernels, or tensors changed in place after they were recorded)")
        if result.skipped:
            reason += "; not replayed: " + "; ".join(result.skipped[:3])
        return self._coarse([unexplained], step, reason, window, seconds)

    def _coarse(self, bad: list[Subject], step: int, reason: str, window: Window | None,
                seconds: float | None = None) -> Incident:
        first = min(bad, key=_timeline)
        phase = "backward" if first.role in ("grad", "grad-result") else (
            "optimizer" if first.role in ("update",) else "forward")
        module = None
        model = None
        if isinstance(first.event, Pass):
            module, model = "", self._labels.get(id(first.event.module))
        return triage.coarse_incident(step=step, phase=phase, found=_found(bad), reason=reason,  # type: ignore[arg-type]
                                      stats=operand_stats(first.tensor.detach()), frame=_subject_frame(first),
                                      model=model, module=module, seconds=seconds)

    def _broken_parameter(self, bad: list[Subject], step: int, window: Window) -> Incident | None:
        """A parameter or raw leaf that is non-finite now and already was while ``window`` ran.

        A parameter written after the window began (read one step late) may be non-finite only
        because of what the window computed: it is not evidence about the window.
        """
        capture = self._capture
        candidates = [(n, t) for n, t in capture.leaves.items() if capture.written_at.get(id(t), 0) <= window.writes]
        if not candidates:
            return None
        with torch.no_grad():
            flags = torch.stack([torch.isfinite(t).all().to("cpu") for _, t in candidates]).tolist()
        broken = [(n, t) for (n, t), ok in zip(candidates, flags, strict=True) if not ok]
        if not broken:
            return None
        used = self._used_leaves(window)
        broken = [b for b in broken if id(b[1]) in used] or broken
        # The parameter written most recently is the cause; others followed from it.
        def written(item: tuple[str, torch.Tensor]) -> tuple[int, int]:
            who = capture.last_writer.get(id(item[1]))
            return (who[1] if who else -1, 0)

        name, param = min(broken, key=written)
        writer = capture.last_writer.get(id(param))
        stats = operand_stats(param.detach())
        owner = capture.leaves.owner.get(id(param))
        model = self._labels.get(id(owner)) if owner is not None else None
        module = _module_of(name) if owner is not None else None
        if writer is None:
            init = self._initial_write(param)
            if init is not None:  # an in-place write before its model's first call: the initialisation
                return triage.parameter_incident(
                    step=step, name=name, module=module, model=model, stats=stats, frame=init.frame,
                    history=f"{getattr(init.func, '__name__', 'a write')} wrote these values into it at "
                            f"{init.frame.file}:{init.frame.line}, before its model's first call (its "
                            f"initialisation), not an update computed from gradients.")
            use = self._first_use(param)
            return triage.parameter_incident(
                step=step, name=name, module=module, model=model, stats=stats, frame=use,
                history="it was never written while watched, so it came from the initialisation or a checkpoint "
                        "loaded before the watch saw its model.")
        kind, iteration, who = writer
        if kind == "manual" and getattr(who.func, "__name__", "") in _WRITES:
            update = who
            return triage.parameter_incident(
                step=step, name=name, module=module, model=model, stats=stats, frame=update.frame,
                history=f"{getattr(update.func, '__name__', 'a write')} wrote these values into it at "
                        f"{update.frame.file}:{update.frame.line} (a checkpoint load or an assignment), not an "
                        f"update computed from gradients.")
        if kind == "manual":
            return self._update_finding(who, name, param)
        optimizer: torch.optim.Optimizer = who
        snapshot = self._snapshots.get(id(optimizer))
        frame = self._step_frame.get(id(optimizer), UNKNOWN_FRAME)
        if snapshot is not None and snapshot.iteration == iteration and self._replay:
            start = time.perf_counter()
            try:
                tracer = self._replayer.replay_optimizer(optimizer, snapshot, list(capture.leaves.roots))
                found = tracer.origin_for([p.detach() for p in snapshot.params])
            except Exception:  # noqa: BLE001 - fall back to the state analysis below
                found = None
            if found is not None:
                root, last = found
                incident = incident_from_event(root, last, step=iteration)
                incident = with_optimizer_context(incident, optimizer, param, name)
                return replace(incident, step=iteration, module=module, model=model, file=frame.file,
                               line=frame.line, code=frame.code or None, function=frame.function,
                               replay_seconds=time.perf_counter() - start)
        lines, explanation, suggestions = optimizer_findings(optimizer, param)
        if self._weights_clean < iteration - 1:
            checked = (f"after step {self._weights_clean}" if self._weights_clean >= 0 else "before the first step")
            explanation += (f" The parameters were last seen finite {checked} and are checked only on sampled steps, "
                            f"so the update that broke them ran at one of steps {self._weights_clean + 1}..{iteration} "
                            f"(step {iteration} is the last {type(optimizer).__name__}.step that wrote it).")
        return triage.optimizer_incident(step=iteration, optimizer_name=type(optimizer).__name__, name=name,
                                         module=module, model=model, frame=frame, output=stats, state_lines=lines,
                                         explanation=explanation, suggestions=suggestions, replayed=False)

    def _update_finding(self, update: Update, name: str, param: torch.Tensor) -> Incident:
        """A hand-written in-place update made ``param`` non-finite: from a non-finite operand, or by overflow."""
        for a in update.args[1:]:
            origin = self._contained_origin(a) if isinstance(a, torch.Tensor) else None
            if origin is not None:  # the update's operand was diagnosed where it was computed
                return triage.contained_reached(origin, reached=f"parameter '{name}'", step=update.iteration)
        owner = self._capture.leaves.owner.get(id(param))
        operands = [operand_stats(a.detach()) for a in update.args[1:] if isinstance(a, torch.Tensor)
                    and a.is_floating_point()]
        op = f"aten.{getattr(update.func, '__name__', 'update')}"
        return triage.manual_update_incident(
            step=update.iteration, op=op, name=name, module=_module_of(name) if owner is not None else None,
            model=self._labels.get(id(owner)) if owner is not None else None, frame=update.frame, before=None,
            operands=operands, after=operand_stats(param.detach()))

    def _initial_write(self, param: torch.Tensor) -> Call | None:
        """The last recorded in-place call on ``param``'s storage (``nn.init.constant_`` before its model
        was first called, when the watch did not know it as a parameter yet), if a kept window has it."""
        ptr = _storage(param)
        if ptr is None:
            return None
        windows = [*self._windows.values(), self._capture.window]
        found = None
        for window in sorted({id(w): w for w in windows}.values(), key=lambda w: w.index):
            for e in window.events:
                if not (isinstance(e, Call) and e.inplace):
                    continue
                target = inplace_target(e.args, e.kwargs)
                if isinstance(target, torch.Tensor) and _storage(target) == ptr:
                    found = e
        return found

    def _used_leaves(self, window: Window) -> set[int]:
        """ids of the leaves the window's root calls and torch calls used."""
        leaves = self._capture.leaves
        used: set[int] = set()
        for event in window.events:
            if isinstance(event, Pass):
                used.update(id(t) for t in event.module.parameters())
            elif isinstance(event, Call):
                for a in float_leaves((event.args, event.kwargs)):
                    leaf = leaves.lookup(a)
                    if leaf is not None:
                        used.add(id(leaf[0]))
        return used

    def _first_use(self, param: torch.Tensor) -> UserFrame:
        window = self._capture.window
        owner = self._capture.leaves.owner.get(id(param))
        for event in window.events:
            if isinstance(event, Pass) and owner is not None and event.module is owner:
                return event.call_site
            if isinstance(event, Call) and any(a is param for a in event.args):
                return event.frame
        return UNKNOWN_FRAME

    def _inputs(self, window: Window, *, produced_too: bool = False
                ) -> list[tuple[str, torch.Tensor, UserFrame, str | None, str | None]]:
        """Tensors that entered the window from outside it: the batch and other inputs (not parameters).

        With ``produced_too``, also model inputs the window itself made (a batch built in the loop).
        """
        leaves = self._capture.leaves
        grads = {id(t.grad) for _, t in leaves.items() if t.grad is not None}
        found, seen = [], set()
        for event in window.events:
            if isinstance(event, Pass):
                tensors = float_leaves((event.args, event.kwargs))
                label = self._labels.get(id(event.module), type(event.module).__name__)
                where, frame, model, module = f"input {{}} of the call to {label}", event.call_site, label, ""
            elif isinstance(event, Call):
                tensors = float_leaves((event.args, event.kwargs))
                where, frame, model, module = (f"argument {{}} of {getattr(event.func, '__name__', 'a call')}",
                                               event.frame, None, None)
            else:
                continue
            for i, t in enumerate(tensors):
                made_here = id(t) in window.produced and not (produced_too and isinstance(event, Pass))
                if made_here or id(t) in seen or leaves.lookup(t) is not None or id(t) in grads:
                    continue
                seen.add(id(t))
                found.append((where.format(i), t, frame, model, module))
        return found

    def _contained_input(self, window: Window, step: int, bad: list[Subject]) -> Incident | None:
        """The earlier diagnosis of a non-finite value that entered this window (class weights made before the loop)."""
        if not self._contained:
            return None
        for _, t, _, _, _ in self._inputs(window, produced_too=True):
            origin = self._contained_origin(t)
            if origin is not None:
                return triage.contained_reached(origin, reached=_found(bad), step=step)
        return None

    def _contained_origin(self, t: torch.Tensor) -> Incident | None:
        """The contained diagnosis of ``t`` (the same tensor, or a view of its storage), if any."""
        ptr = _storage(t)
        for incident, refs, _ in self._contained.values():
            for ref in refs:
                origin = ref()
                if origin is not None and (t is origin or (ptr is not None and ptr == _storage(origin))):
                    return incident
        return None

    def _bad_input(self, window: Window, step: int, *, nan_only: bool) -> Incident | None:
        for what, t, frame, model, module in self._inputs(window):
            stats = operand_stats(t.detach())
            if stats.nan or (stats.inf and not nan_only):
                return triage.input_incident(step=step, stats=stats, what=what, frame=frame, model=model,
                                             module=module)
        return None

    def _tensor_at(self, window: Window, key: tuple[Any, ...] | None, replayed: dict[int, Any]) -> torch.Tensor | None:
        """The original tensor of the window whose replayed value lives in the storage of ``key``."""
        if key is None:
            return None
        for event in window.events:
            if isinstance(event, Pass):
                tensors = float_leaves((event.args, event.kwargs))
            elif isinstance(event, Call):
                tensors = float_leaves((event.out, event.args))
            else:
                continue
            for t in tensors:
                now = replayed.get(id(t), t)
                if isinstance(now, torch.Tensor) and _storage(now) == key[1]:
                    return t
        return None

    def _input_for_keys(self, window: Window, keys: list[tuple[Any, ...]], step: int,
                        replayed: dict[int, Any]) -> Any:
        """The model input (or argument of a call) whose storage holds the non-finite values in ``keys``.

        ``keys`` are storage keys of replayed tensors; ``replayed`` maps originals to them.
        """
        ptrs = {k[1] for k in keys}
        for what, t, frame, model, module in self._inputs(window, produced_too=True):
            try:
                now = replayed.get(id(t), t)
                ptr = now.untyped_storage().data_ptr() if isinstance(now, torch.Tensor) else None
            except (RuntimeError, NotImplementedError):
                continue
            if ptr in ptrs:
                stats = operand_stats(t.detach())
                if stats.nan or stats.inf:
                    return what, stats, frame, model, module
        return None

    def _report(self, incident: Incident) -> None:
        self.incident = incident
        self._recorder.event(incident.step, "incident", incident.to_dict())
        if self._on_anomaly == "raise":
            raise NonFiniteError(incident)
        if self._on_anomaly == "warn":
            warnings.warn(incident.diagnosis(), RuntimeWarning, stacklevel=user_stacklevel())

    # ================================================================== GradScaler
    @_guarded
    def _scaler_updated(self, scaler: Any) -> None:
        if not scaler.is_enabled() or getattr(scaler, "_scale", None) is None:
            return
        probe = self._probe
        if probe.consecutive == 0:
            return  # the scale is read with the next transfer
        scale = float(scaler._scale.item())  # a skipped step already synced (found_inf): this waits for nothing
        self._scales.append(scale)
        self._recorder.set_scale(self._capture.clock.index, scale)
        if self.incident is None and (scale < 1.0 or probe.consecutive >= self._max_skips):
            detail = None
            seconds = 0.0
            if self._skipped_window is not None and self._replay:
                window, subjects, live, saved = self._skipped_window
                start = time.perf_counter()
                now = live.detach().clone() if live is not None else None
                try:
                    if live is not None:
                        with torch.no_grad():
                            live.copy_(saved)  # replay the skipped step with the scale it ran with
                    result = self._replayer.replay(window, subjects, self._labels)
                    found = result.tracer.origin_for(result.sinks)
                    if found is not None:
                        detail = incident_from_event(found[0], found[1], step=window.iteration)
                except Exception:  # noqa: BLE001 - the collapse is reported even when the replay fails
                    detail = None
                finally:
                    if live is not None:
                        with torch.no_grad():
                            live.copy_(now)
                seconds = time.perf_counter() - start
            self._report(triage.collapse_incident(step=self._capture.clock.index, scale=scale, history=self._scales,
                                                  skips=probe.consecutive, detail=detail, seconds=seconds))


_HUGE_GRAD = 1e19   # a gradient norm at which squared gradients near float32's range (max 3.4e38)
_MAX_CONTAINED = 8  # distinct locations of contained non-finite values diagnosed per run
# In-place ops that write given values into a parameter (load_state_dict, assignment), not updates.
_WRITES = {"copy_", "__setitem__", "fill_", "set_", "index_put_", "masked_fill_", "zero_"}
# Roles whose non-finite values are a failure even when they were written on purpose (a -inf loss).
_SERIOUS = {"loss", "grad", "grad-result", "param", "update", "initial", "state"}
_ROLE_WORDS = {"output": "a model's output", "call": "a value computed outside the models", "loss": "the loss",
               "grad": "the gradients", "grad-result": "the gradients torch.autograd.grad returned",
               "param": "the parameters", "update": "a parameter after an in-place update",
               "checked": "a value the script checked", "initial": "the parameters before the first step",
               "state": "the optimizer state"}


def _distinct(incidents: list[Incident]) -> list[Incident]:
    seen, out = set(), []
    for c in incidents:
        if (c.op, c.file, c.line) not in seen:
            seen.add((c.op, c.file, c.line))
            out.append(c)
    return out


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def _same_storage(original: torch.Tensor, replayed_sink: torch.Tensor, mapping: dict[int, Any]) -> bool:
    now = mapping.get(id(original), original)
    return isinstance(now, torch.Tensor) and _storage(now) == _storage(replayed_sink)


def _timeline(s: Subject) -> tuple[int, int]:
    return (s.window, s.order)


def _intent_key(bad: list[Subject]) -> tuple[str, int] | None:
    first = min(bad, key=_timeline)
    frame = _subject_frame(first)
    return (frame.file, frame.line) if frame.known and first.role in ("call", "output", "checked") else None


def _subject_frame(s: Subject) -> UserFrame:
    event = s.event
    if isinstance(event, Pass):
        return event.call_site
    if isinstance(event, (Call, Backward, Update)):
        return event.frame
    return UNKNOWN_FRAME


def _found(bad: list[Subject]) -> str:
    seen: list[str] = []
    for s in sorted(bad, key=_timeline):
        w = _ROLE_WORDS.get(s.role, s.role)
        if w not in seen:
            seen.append(w)
    return ", ".join(seen[:3])


def _module_of(param_name: str | None) -> str | None:
    if param_name is None:
        return None
    return param_name.rpartition(".")[0]


def _group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> int:
    for i, group in enumerate(optimizer.param_groups):
        if any(p is param for p in group["params"]):
            return i
    return 0


def _as_list(value: Any, cls: type, what: str, expected: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, cls):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, cls) for v in value):
        return list(value)
    raise UsageError(f"watch() expects {what} to be a {expected} (or a list of them), got {type(value).__name__}; "
                     f"pass {what}=None to watch every one the code uses")


watch = Watch
