"""``floatscope.watch``: watch training cheaply; replay a failing step exactly.

The cheap path runs no Python per op and syncs the host about once per step:

* a forward pre-hook on each root model captures the call's inputs, RNG and autocast state;
* a forward hook queues a device-side "all outputs finite" flag and starts the loss tape;
* ``backward()`` (seen by the tape) queues a flag on the loss;
* an optimizer pre-step hook queues a flag on every gradient (one ``_foreach_norm``) and reads
  all queued flags with **one** ``tolist()``;
* an optimizer post-step hook queues a flag on the updated parameters, read at the next sync.

When a flag is down, the failing pass is replayed under :class:`OpTracer` with the same inputs,
RNG state, autocast state and loss tape, and the op that produced the first NaN/Inf is named.
GradScaler steps skipped for inf gradients are counted, not reported; a collapsing scale is.
"""

from __future__ import annotations

import copy
import math
import shlex
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Literal, Sequence

import torch
import torch.utils._pytree as pytree
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from floatscope._errors import NonFiniteError, UsageError
from floatscope._analyses.optimizer import optimizer_findings
from floatscope._instrument.frames import UserFrame, frame_from
from floatscope._instrument.health import FLUSH_SCALES, PARAM_FIELDS, HealthSampler, activation_row
from floatscope._instrument.locate import incident_for
from floatscope._instrument.tape import LossTape, autocast_state, restore_autocast
from floatscope._instrument.tracer import OpTracer
from floatscope._numerics.stats import operand_stats
from floatscope._results import Incident, RunResult
from floatscope._store.env import environment, last_seeding
from floatscope._store.sqlite import DEFAULT_STORE, RunStore

__all__ = ["Watch", "watch"]

OnAnomaly = Literal["raise", "warn", "record"]

# Health sampled every this many steps: chosen so the watch stays within 1.05x of plain training
# on benchmarks/overhead.py (see the README's figures).
DEFAULT_HEALTH_EVERY = 50
_INPUT_BATCHES = 3


@dataclass(eq=False)
class _Pass:
    """One root forward call and what followed it up to backward."""

    module: torch.nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    autocast: tuple[tuple[str, bool, torch.dtype], ...]
    grad_enabled: bool
    call_site: UserFrame | None = None
    outputs: Any = None
    tape: LossTape | None = None
    loss: Any = None
    loss_value: torch.Tensor | None = None


@dataclass(eq=False)
class _OptSnapshot:
    """Parameters, gradients and optimizer state as they were before one optimizer step."""

    step: int
    params: list[torch.Tensor]
    values: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    state: dict[int, dict[str, Any]]


def _clone_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in state.items()}


@dataclass(eq=False)
class _Flag:
    kind: Literal["output", "loss", "grads", "params"]
    value: torch.Tensor
    pass_index: int = -1
    step: int = -1
    optimizer: torch.optim.Optimizer | None = None
    frame: UserFrame | None = None


@dataclass
class _StepLog:
    losses: list[torch.Tensor] = field(default_factory=list)
    grad_norm: torch.Tensor | None = None


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


def _float_leaves(tree: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _all_finite_flag(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """A 0-d bool tensor on the tensors' device: every element finite. No host sync."""
    tensors = [t.detach() for t in tensors if t.numel() > 0]
    if not tensors:
        return None
    device = tensors[0].device
    flags = [torch.isfinite(t).all() if t.numel() < 2**20 else torch.isfinite(t.sum(dtype=torch.float32))
             for t in tensors]
    # A large tensor's fp32 sum is finite iff its elements are, unless it overflows; a false alarm
    # then costs one exact re-check, never a missed NaN.
    return torch.stack([f.to(device) for f in flags]).all()


def _norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor L2 norms in float32 (NaN/Inf propagate), grouped by device and dtype."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t.detach())
    norms = []
    for (_, dtype), group in groups.items():
        if dtype in (torch.float16, torch.bfloat16, torch.float32):
            norms.extend(torch._foreach_norm(group, 2, dtype=torch.float32))
        else:
            norms.extend(torch.linalg.vector_norm(t).to(torch.float32) for t in group)
    return norms


class Watch:
    """Watch a model's training for the first NaN/Inf; a context manager.

    Args:
        model: The model (or models) to watch. ``None`` watches every module called at top level
            (what ``floatscope run`` does).
        optimizer: The optimizer (or optimizers). ``None`` watches every ``torch.optim`` optimizer.
        scaler: A ``torch.amp.GradScaler``. ``None`` watches every GradScaler when ``model`` is None.
        on_anomaly: ``"raise"`` raises :class:`NonFiniteError` from the step that found it;
            ``"warn"`` warns and continues; ``"record"`` only records.
        store: Run store path, a :class:`RunStore`, or None for no store.
        run_name: Name recorded with the run.
        command: Command line recorded with the run.
        max_consecutive_skips: GradScaler skips in a row that count as a loss-scale collapse.
        replay: Replay a failing pass under op-level tracing to name the op (default True).
        health_every: Sample per-layer health every this many steps (0 turns it off).
        exact_optimizer: Keep a copy of parameters, gradients and optimizer state before every
            step, so an optimizer-made NaN/Inf is replayed op by op (the aten op is named). Costs
            a copy of the optimizer's memory per step; off by default.

    Attributes:
        incident: The first :class:`Incident`, or None.
        result: The :class:`RunResult`, set on exit.

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
        store: str | RunStore | None = DEFAULT_STORE,  # type: ignore[assignment]
        run_name: str | None = None,
        command: str | None = None,
        max_consecutive_skips: int = 32,
        replay: bool = True,
        health_every: int = DEFAULT_HEALTH_EVERY,
        exact_optimizer: bool = False,
    ) -> None:
        if on_anomaly not in ("raise", "warn", "record"):
            raise UsageError(f"on_anomaly must be 'raise', 'warn' or 'record', not {on_anomaly!r}")
        models = _as_list(model, torch.nn.Module, "model", "torch.nn.Module")
        optimizers = _as_list(optimizer, torch.optim.Optimizer, "optimizer", "torch.optim.Optimizer")
        if max_consecutive_skips < 1:
            raise UsageError("max_consecutive_skips must be at least 1")
        if health_every < 0:
            raise UsageError("health_every must be 0 (off) or a positive number of steps")
        self.models = models
        self.optimizers = optimizers
        self.scaler = scaler
        self.global_mode = not models
        self.on_anomaly = on_anomaly
        self._store_arg = store
        self.run_name = run_name
        self.command = command if command is not None else " ".join(shlex.quote(a) for a in sys.argv)
        self.max_consecutive_skips = max_consecutive_skips
        self.replay_enabled = replay
        self.exact_optimizer = exact_optimizer
        self._opt_snapshots: dict[int, _OptSnapshot] = {}

        self.step = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.nonfinite_steps = 0
        self.incident: Incident | None = None
        self.result: RunResult | None = None
        self.run_id = ""
        self.store: RunStore | None = None

        self._handles: list[Any] = []
        self._restore: list[Callable[[], None]] = []
        self._passes: list[_Pass] = []
        self._flags: list[_Flag] = []
        self._log = _StepLog()
        self._tape: LossTape | None = None
        self._depth = 0
        self._replaying = False
        self._active = False
        self._opt_step_calls = 0
        self._roots: dict[int, torch.nn.Module] = {}
        self._has_params: dict[int, bool] = {}
        self._last_scaler: Any = None
        self._skipped_passes: list[_Pass] = []
        self._scale_history: list[float] = []
        self._owns_store = False
        self._broken = False
        self._names_cache: tuple[int, dict[int, str]] | None = None
        self._recent_grad_norms: list[float] = []
        self.health = HealthSampler(health_every)
        self._payload: list[tuple[str, Any, torch.Tensor]] = []
        self._passes_seen = 0
        self._configured_optimizers: set[int] = set()
        self._sampling_now = False

    # ================================================================== lifecycle
    def __enter__(self) -> "Watch":
        if self._active:
            raise UsageError("this watch is already active; create a new floatscope.watch(...) for each block")
        self._open_store()
        if self.store is None:
            self.health.every = 0  # nowhere to record samples or fingerprints: skip computing them
        try:
            self._install()
        except BaseException:
            self._uninstall()
            self._close_store()
            raise
        self._active = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        pending_error: NonFiniteError | None = None
        try:
            if exc_type is None or not issubclass(exc_type, NonFiniteError):
                try:
                    self._sync(final=True)
                except NonFiniteError as err:
                    pending_error = err
        finally:
            self._uninstall()
            self._active = False
            status = "nonfinite" if self.incident else ("error" if exc_type is not None and not
                                                        issubclass(exc_type, (NonFiniteError, SystemExit)) else "clean")
            if exc_type is SystemExit and exc is not None and exc.code not in (0, None) and not self.incident:
                status = "error"
            error = None
            if status == "error" and exc is not None:
                error = f"{type(exc).__name__}: {exc}"
            self.result = RunResult(status=status, run_id=self.run_id, steps=self.step, skipped_steps=self.skipped_steps,
                                    incident=self.incident, loss_scale=self._scale_history[-1] if self._scale_history else None,
                                    error=error)
            self._close_store()
            self._passes, self._flags, self._skipped_passes = [], [], []
        if pending_error is not None and exc_type is None:
            raise pending_error

    def _open_store(self) -> None:
        store = self._store_arg
        if store is None:
            return
        if isinstance(store, RunStore):
            self.store = store
        else:
            self.store = RunStore(store)
            self._owns_store = True
        config: dict[str, Any] = {"on_anomaly": self.on_anomaly, "global": self.global_mode,
                                  "max_consecutive_skips": self.max_consecutive_skips, "health_every": self.health.every}
        seeding = last_seeding()
        if seeding is not None:
            config["seeds"] = asdict(seeding)
        self.run_id = self.store.new_run(name=self.run_name, command=self.command, env=environment(), config=config)

    def _close_store(self) -> None:
        if self.store is None:
            return
        try:
            if self.result is not None:
                self.store.finish_run(self.run_id, status=self.result.status, steps=self.step,
                                      skipped_steps=self.skipped_steps, result=self.result.to_dict())
        finally:
            if self._owns_store:
                self.store.close()
            self.store = None

    def _install(self) -> None:
        if self.global_mode:
            self._handles.append(register_module_forward_pre_hook(self._global_pre))
            self._handles.append(register_module_forward_hook(self._global_post, always_call=True))
        else:
            for m in self.models:
                self._add_root(m)
                self._handles.append(m.register_forward_pre_hook(self._root_pre, with_kwargs=True))
                self._handles.append(m.register_forward_hook(self._root_post, always_call=True))
        if self.optimizers:
            for o in self.optimizers:
                self._handles.append(o.register_step_pre_hook(self._pre_step))
                self._handles.append(o.register_step_post_hook(self._post_step))
        else:
            self._handles.append(register_optimizer_step_pre_hook(self._pre_step))
            self._handles.append(register_optimizer_step_post_hook(self._post_step))
        self._wrap_scalers()

    def _uninstall(self) -> None:
        self.health.detach()
        if self._tape is not None:
            self._tape.stop()
            self._tape = None
        for p in self._passes:
            if p.tape is not None:
                p.tape.stop()
        for h in self._handles:
            h.remove()
        self._handles = []
        for undo in reversed(self._restore):
            undo()
        self._restore = []

    # ================================================================== GradScaler
    def _wrap_scalers(self) -> None:
        """GradScaler has no hooks: wrap step/update/scale narrowly, and restore them on exit."""
        from torch.amp.grad_scaler import GradScaler

        targets: list[Any] = []
        if self.scaler is not None:
            targets = [self.scaler]
        elif self.global_mode:
            targets = [GradScaler]
        for target in targets:
            for name, make in (("step", self._make_scaler_step), ("update", self._make_scaler_update),
                               ("scale", self._make_scaler_scale)):
                original = getattr(target, name)
                had_own = isinstance(target, type) or name in vars(target)
                setattr(target, name, make(original, bound=not isinstance(target, type)))
                if had_own:
                    self._restore.append(lambda t=target, n=name, o=original: setattr(t, n, o))
                else:
                    self._restore.append(lambda t=target, n=name: delattr(t, n))

    def _make_scaler_step(self, original: Callable[..., Any], *, bound: bool) -> Callable[..., Any]:
        def step(*args: Any, **kwargs: Any) -> Any:
            before = self._opt_step_calls
            ret = original(*args, **kwargs)
            if self._active and not self._replaying and self._opt_step_calls == before:
                self._on_skipped_step(original.__self__ if bound else args[0])
            return ret

        return step

    def _make_scaler_update(self, original: Callable[..., Any], *, bound: bool) -> Callable[..., Any]:
        def update(*args: Any, **kwargs: Any) -> Any:
            ret = original(*args, **kwargs)
            if self._active and not self._replaying:
                self._after_scaler_update(original.__self__ if bound else args[0])
            return ret

        return update

    def _make_scaler_scale(self, original: Callable[..., Any], *, bound: bool) -> Callable[..., Any]:
        def scale(*args: Any, **kwargs: Any) -> Any:
            self._last_scaler = original.__self__ if bound else args[0]
            outputs = args[0] if bound else args[1]
            if self._active and self._passes and isinstance(outputs, torch.Tensor):
                self._passes[-1].loss_value = outputs.detach()
            return original(*args, **kwargs)

        return scale

    def _on_skipped_step(self, scaler: Any) -> None:
        self._last_scaler = scaler
        self._end_tapes()
        self.skipped_steps += 1
        self.consecutive_skips += 1
        passes = self._passes
        self._sync(skipped=True)
        self._skipped_passes = passes
        self.step += 1

    @_guarded
    def _after_scaler_update(self, scaler: Any) -> None:
        if not scaler.is_enabled() or getattr(scaler, "_scale", None) is None:
            return
        if self.consecutive_skips == 0:
            return  # the scale is read at the next regular sync
        scale = float(scaler._scale.item())  # a skipped step already synced; this costs nothing extra
        self._scale_history.append(scale)
        if self.store is not None:
            self.store.set_step_scale(self.run_id, self.step - 1, scale)
        if self.incident is None and (scale < 1.0 or self.consecutive_skips >= self.max_consecutive_skips):
            self._collapse_incident(scale)

    # ================================================================== module hooks
    def _add_root(self, module: torch.nn.Module) -> None:
        self._roots.setdefault(id(module), module)

    def _is_model(self, module: torch.nn.Module) -> bool:
        key = id(module)
        has = self._has_params.get(key)
        if has is None:
            has = next(module.parameters(), None) is not None
            self._has_params[key] = has
        return has

    @_guarded
    def _global_pre(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if self._replaying:
            return
        if self._depth == 0 and self._is_model(module):
            self._begin_pass(module, args, _call_kwargs(module, sys._getframe(1)))
            self._add_root(module)
        self._depth += 1

    @_guarded
    def _global_post(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._replaying:
            return
        self._depth = max(0, self._depth - 1)
        if self._depth == 0 and self._passes and self._passes[-1].module is module and self._passes[-1].outputs is None:
            self._end_pass(output)

    @_guarded
    def _root_pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._replaying:
            return
        if self._depth == 0:
            self._begin_pass(module, args, dict(kwargs))
        self._depth += 1

    @_guarded
    def _root_post(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._replaying:
            return
        self._depth = max(0, self._depth - 1)
        if self._depth == 0 and self._passes and self._passes[-1].outputs is None:
            self._end_pass(output)

    def _begin_pass(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._end_tapes()
        if self._flags and self._passes and not self._has_pending_step():
            self._sync()  # forward-only use (inference, no optimizer): one sync per forward
        if self._passes_seen == 0:
            self._record_model(module)
        if self._passes_seen < _INPUT_BATCHES and self.store is not None:
            leaves = _float_leaves((args, kwargs))
            if leaves:
                stats = torch.stack([torch.stack([t.detach().float().mean(), t.detach().float().std()
                                                  if t.numel() > 1 else torch.zeros((), device=t.device),
                                                  t.detach().float().min(), t.detach().float().max()])
                                     for t in leaves if t.numel() > 0])
                self._payload.append(("input", self._passes_seen, stats.reshape(-1)))
        if self._passes_seen == 0:
            self._record_precision(module)
        self._passes_seen += 1
        if not self._passes and self.health.is_sampling(self.step):
            self._add_root(module)
            self.health.attach([module])
            self._sampling_now = True
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self._passes.append(_Pass(module, args, kwargs, torch.get_rng_state(), cuda_rng, autocast_state(),
                                  torch.is_grad_enabled(), frame_from(sys._getframe(2))))

    def _has_pending_step(self) -> bool:
        """True while a captured pass may still feed a backward (training); False for inference."""
        return any(p.tape is not None or p.loss is not None for p in self._passes)

    def _end_pass(self, output: Any) -> None:
        current = self._passes[-1]
        current.outputs = output
        if self.health.handles:
            self.health.detach()
        leaves = _float_leaves(output)
        flag = _all_finite_flag(leaves)
        if flag is not None:
            self._flags.append(_Flag("output", flag, pass_index=len(self._passes) - 1))
        if torch.is_grad_enabled() and any(t.requires_grad for t in leaves):
            tape = LossTape(self._on_backward)
            tape.start()
            current.tape = tape
            self._tape = tape

    def _end_tapes(self) -> None:
        if self._tape is not None:
            self._tape.stop()
            self._tape = None

    @_guarded
    def _on_backward(self, tape: LossTape, tensors: Any) -> None:
        owner = next((p for p in reversed(self._passes) if p.tape is tape), None)
        if owner is None:
            return
        owner.loss = tensors
        leaves = _float_leaves(tensors)
        flag = _all_finite_flag(leaves)
        if flag is not None:
            self._flags.append(_Flag("loss", flag, pass_index=self._passes.index(owner)))
        if owner.loss_value is None and leaves and leaves[0].numel() == 1:
            owner.loss_value = leaves[0].detach()
        if owner.loss_value is not None:
            self._log.losses.append(owner.loss_value.reshape(()).to(torch.float32))

    # ================================================================== optimizer hooks
    def _params(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        return [p for g in optimizer.param_groups for p in g["params"] if isinstance(p, torch.Tensor)]

    @_guarded
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._opt_step_calls += 1
        if self._replaying:
            return
        self._end_tapes()
        self.consecutive_skips = 0
        if id(optimizer) not in self._configured_optimizers:
            self._record_optimizer(optimizer)
        with_grad = [p for p in self._params(optimizer) if p.grad is not None and not p.grad.is_sparse]
        if with_grad:
            norms = _norms([p.grad for p in with_grad])
            stacked = torch.stack([n.to(norms[0].device) for n in norms])
            self._flags.append(_Flag("grads", torch.isfinite(stacked).all(), optimizer=optimizer))
            self._log.grad_norm = torch.linalg.vector_norm(stacked)
            if self.store is not None:
                self._payload.append(("grad", (self.step, self._names_of(with_grad)), stacked))
            if self._sampling_now and self.health.every:
                scaler = self._last_scaler
                scale = getattr(scaler, "_scale", None) if scaler is not None and scaler.is_enabled() else None
                flush = self.health.before_step(with_grad, scale)
                scale_value = self._scale_history[-1] if scale is not None and self._scale_history else (
                    None if scale is not None else 1.0)
                self._payload.append(("flush", (self.step, self._names_of(with_grad), scale_value), flush))
        self._sync()
        if self.exact_optimizer:
            params = self._params(optimizer)
            self._opt_snapshots[id(optimizer)] = _OptSnapshot(
                step=self.step, params=params, values=[p.detach().clone() for p in params],
                grads=[p.grad.detach().clone() if p.grad is not None else None for p in params],
                state={id(p): _clone_state(optimizer.state[p]) for p in params if p in optimizer.state})

    @_guarded
    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._replaying:
            return
        params = [p for p in self._params(optimizer) if p.is_floating_point()]
        if params:
            norms = _norms(params)
            stacked = torch.stack([n.to(norms[0].device) for n in norms])
            flag = torch.isfinite(stacked).all()
            self._flags.append(_Flag("params", flag, step=self.step, optimizer=optimizer,
                                     frame=frame_from(sys._getframe(1))))
            if self.store is not None:
                self._payload.append(("weight", (self.step, self._names_of(params)), stacked))
            if self._sampling_now:
                with_grad = [p for p in params if p.grad is not None and not p.grad.is_sparse]
                updates = self.health.after_step(with_grad)
                if updates is not None:
                    self._payload.append(("update", (self.step, self._names_of(with_grad)), updates))
        self._sampling_now = False
        self.step += 1

    # ================================================================== the one sync
    def _sync(self, *, skipped: bool = False, final: bool = False) -> None:
        """Read every queued flag and logged scalar with a single host transfer."""
        flags, self._flags = self._flags, []
        log, self._log = self._log, _StepLog()
        scalars: list[torch.Tensor] = [f.value for f in flags]
        n_flags = len(scalars)
        loss = torch.stack(log.losses).mean() if log.losses else None
        if loss is not None:
            scalars.append(loss)
        if log.grad_norm is not None:
            scalars.append(log.grad_norm)
        scaler = self._last_scaler
        scale_t = getattr(scaler, "_scale", None) if scaler is not None and not skipped else None
        if isinstance(scale_t, torch.Tensor):
            scalars.append(scale_t.reshape(()))
        payload, self._payload = self._payload, []
        activations = self.health.take_activations()
        blocks = [s.detach().reshape(1) for s in scalars] + [t.detach().reshape(-1) for _, _, t in payload]
        blocks += [t.reshape(-1) for _, _, t in activations]
        values: list[float] = []
        if blocks:
            device = blocks[0].device
            values = torch.cat([b.to(device=device, dtype=torch.float32) for b in blocks]).tolist()
        tail = values[len(scalars):]
        values = values[:len(scalars)]
        self._store_payload(payload, activations, tail)
        ok = [v != 0.0 for v in values[:n_flags]]
        extra = values[n_flags:]
        loss_v = extra.pop(0) if loss is not None else None
        grad_v = extra.pop(0) if log.grad_norm is not None else None
        scale_v = extra.pop(0) if isinstance(scale_t, torch.Tensor) else None
        if scale_v is not None:
            self._scale_history.append(scale_v)
        if grad_v is not None:
            self._recent_grad_norms = (self._recent_grad_norms + [grad_v])[-16:]
        passes, self._passes = self._passes, []
        if self.store is not None and (loss_v is not None or grad_v is not None or skipped):
            self.store.add_step(self.run_id, self.step, loss=loss_v, grad_norm=grad_v, loss_scale=scale_v,
                                skipped=skipped)
            if skipped:
                self.store.add_event(self.run_id, self.step, "skipped-step",
                                     {"loss_scale": self._scale_history[-1] if self._scale_history else None})
            self.store.update_progress(self.run_id, steps=self.step, skipped_steps=self.skipped_steps)
        if all(ok):
            return
        self.nonfinite_steps += 1
        if self.incident is not None:
            return
        bad = [f for f, good in zip(flags, ok) if not good]
        kinds = {f.kind for f in bad}
        if "params" in kinds:
            flag = next(f for f in bad if f.kind == "params")
            incident = self._optimizer_incident(flag)
        elif kinds & {"output", "loss"}:
            incident = self._replay_incident(passes, "forward", bad)
        elif skipped:
            return  # inf gradients under a GradScaler: a normal skipped step
        elif not self._grads_really_nonfinite(bad):
            return  # huge but finite gradients whose fp32 norm overflowed: not a non-finite value
        else:
            incident = self._replay_incident(passes, "backward", bad)
        if incident is not None:
            self._report(incident)

    # ================================================================== recorded configuration
    def _names_of(self, params: list[torch.Tensor]) -> list[str]:
        names = self._param_names()
        return [names.get(id(p), f"param{i}") for i, p in enumerate(params)]

    def _record_model(self, module: torch.nn.Module) -> None:
        """Model structure and per-parameter initialisation statistics (read at the next sync)."""
        self._add_root(module)
        if self.store is None:
            return
        structure = [[name, type(m).__name__] for name, m in module.named_modules()]
        params = [(n, p) for n, p in module.named_parameters() if p.is_floating_point() and p.numel() > 0]
        shapes = {n: [list(p.shape), str(p.dtype).removeprefix("torch.")] for n, p in params}
        self.store.update_config(self.run_id, {"model": {"type": type(module).__name__, "structure": structure,
                                                         "parameters": shapes}})
        if params:
            stats = torch.stack([torch.stack([p.detach().float().mean(),
                                              p.detach().float().std() if p.numel() > 1 else torch.zeros(()),
                                              p.detach().float().abs().max(), torch.linalg.vector_norm(p.detach().float())])
                                 for _, p in params])
            self._payload.append(("init", [n for n, _ in params], stats.reshape(-1)))

    def _record_precision(self, module: torch.nn.Module) -> None:
        if self.store is None:
            return
        # Scripts seed and set flags after the watch starts (floatscope run): record them as of the first step.
        self.store.update_env(self.run_id, environment())
        seeding = last_seeding()
        if seeding is not None:
            self.store.update_config(self.run_id, {"seeds": asdict(seeding)})
        autocast = [{"device": d, "enabled": e, "dtype": str(t).removeprefix("torch.")}
                    for d, e, t in autocast_state() if e]
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters()})
        scaler = self.scaler or self._last_scaler
        self.store.update_config(self.run_id, {"precision": {
            "autocast": autocast, "param_dtypes": dtypes,
            "default_dtype": str(torch.get_default_dtype()).removeprefix("torch."),
            "grad_scaler": bool(scaler is not None and scaler.is_enabled()),
        }})

    def _record_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self._configured_optimizers.add(id(optimizer))
        if self.store is None:
            return
        groups = []
        for group in optimizer.param_groups:
            groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()
                           if k != "params" and isinstance(v, (int, float, bool, str, tuple, type(None)))})
        config = self.store.config(self.run_id)
        optimizers = config.get("optimizers", [])
        optimizers.append({"type": type(optimizer).__name__, "param_groups": groups})
        scaler = self._last_scaler or self.scaler
        patch: dict[str, Any] = {"optimizers": optimizers}
        if scaler is not None and scaler.is_enabled():
            patch["grad_scaler"] = {"init_scale": float(scaler._init_scale),
                                    "growth_interval": int(scaler._growth_interval)}
        self.store.update_config(self.run_id, patch)

    def _store_payload(self, payload: list[tuple[str, Any, torch.Tensor]],
                       activations: list[tuple[str, str, torch.Tensor]], values: list[float]) -> None:
        """Decode the payload of one sync into fingerprints, health rows and recorded config."""
        offset = 0
        health_rows: list[tuple[str, str, dict[str, Any]]] = []
        params: dict[str, dict[str, Any]] = {}
        health_step = None
        for kind, meta, tensor in payload:
            n = tensor.numel()
            chunk, offset = values[offset:offset + n], offset + n
            if self.store is None:
                continue
            if kind in ("grad", "weight"):
                step, names = meta
                self.store.add_fingerprint(self.run_id, step, kind, chunk)
                if kind == "grad" and step == 0:
                    self.store.update_config(self.run_id, {"fingerprint_params": names})
                if self.health.is_sampling(step) and self.health.every:
                    health_step = step
                    for name, v in zip(names, chunk):
                        params.setdefault(name, {})["grad_norm" if kind == "grad" else "weight_norm"] = v
            elif kind == "flush":
                step, names, scale = meta
                health_step = step
                width = len(FLUSH_SCALES) + 2
                for i, name in enumerate(names):
                    row = chunk[width * i:width * (i + 1)]
                    params.setdefault(name, {}).update(
                        grad_nonzero=row[0], grad_absmax=row[-1], loss_scale=scale,
                        grad_flush_frac={f"{k:g}": v for k, v in zip(FLUSH_SCALES, row[1:-1])})
            elif kind == "update":
                step, names = meta
                health_step = step
                for name, v in zip(names, chunk):
                    params.setdefault(name, {})["update_norm"] = v
            elif kind == "init":
                init = {name: dict(zip(("mean", "std", "absmax", "norm"), chunk[4 * i:4 * i + 4]))
                        for i, name in enumerate(meta)}
                self.store.update_config(self.run_id, {"init": init})
            elif kind == "input":
                stats = [dict(zip(("mean", "std", "min", "max"), chunk[4 * i:4 * i + 4])) for i in range(n // 4)]
                config = self.store.config(self.run_id)
                data = config.get("data", {})
                data[f"batch{meta}"] = stats
                self.store.update_config(self.run_id, {"data": data})
        for name, dtype, tensor in activations:
            n = tensor.numel()
            chunk, offset = values[offset:offset + n], offset + n
            health_rows.append((name, "activation", activation_row(name, dtype, chunk, self.health.types.get(name, ""))))
        for name, data in params.items():
            if "update_norm" in data and data.get("weight_norm"):
                data["update_ratio"] = data["update_norm"] / data["weight_norm"] if data["weight_norm"] else None
            health_rows.append((name, "param", {k: data.get(k) for k in (*PARAM_FIELDS, "update_ratio")}))
        if self.store is not None and health_rows:
            step = health_step if health_step is not None else self.step
            self.store.add_health(self.run_id, step, health_rows)

    def _grads_really_nonfinite(self, bad: list[_Flag]) -> bool:
        """The cheap flag reads a norm, which overflows for finite values beyond ~1e19: check exactly."""
        for flag in bad:
            if flag.kind == "grads" and flag.optimizer is not None:
                for p in self._params(flag.optimizer):
                    if p.grad is not None and not p.grad.is_sparse and not bool(torch.isfinite(p.grad).all()):
                        return True
        return False

    # ================================================================== incidents
    def _report(self, incident: Incident) -> None:
        self.incident = incident
        if self.store is not None:
            self.store.add_event(self.run_id, incident.step, "incident", incident.to_dict())
        if self.on_anomaly == "raise":
            raise NonFiniteError(incident)
        if self.on_anomaly == "warn":
            warnings.warn(incident.diagnosis(), RuntimeWarning, stacklevel=_user_stacklevel())

    def _param_names(self) -> dict[int, str]:
        """``{id(param): dotted name}`` over the watched roots; rebuilt only when a root is added."""
        if self._names_cache is None or self._names_cache[0] != len(self._roots):
            names: dict[int, str] = {}
            for root in self._roots.values():
                for name, p in root.named_parameters(remove_duplicate=False):
                    names.setdefault(id(p), name)
            self._names_cache = (len(self._roots), names)
        return self._names_cache[1]

    def _optimizer_incident(self, flag: _Flag) -> Incident:
        optimizer = flag.optimizer
        assert optimizer is not None
        snapshot = self._opt_snapshots.get(id(optimizer))
        if snapshot is not None and snapshot.step == flag.step and self.replay_enabled:
            start = time.perf_counter()
            try:
                replayed = self._replay_optimizer(optimizer, snapshot)
            except Exception:  # noqa: BLE001 - fall back to the state analysis below
                replayed = None
            if replayed is not None:
                frame = flag.frame or UserFrame("<unknown>", 0, "<unknown>")
                return replace(replayed, step=flag.step, file=frame.file, line=frame.line, code=frame.code or None,
                               function=frame.function, replay_seconds=time.perf_counter() - start)
        names = self._param_names()
        bad = next((p for p in self._params(optimizer) if p.is_floating_point() and
                    not bool(torch.isfinite(p.detach()).all())), None)
        frame = flag.frame or UserFrame("<unknown>", 0, "<unknown>")
        stats = operand_stats(bad) if bad is not None else None
        lines, explanation, suggestions = optimizer_findings(optimizer, bad) if bad is not None else ([], "", [])
        # The gradients of the failing step are gone by now (the next step made new ones): no operands,
        # and a pointer to the mode that keeps them.
        explanation += (" (The update itself was not replayed; run with --exact-optimizer / "
                        "watch(..., exact_optimizer=True) to name the op.)")
        kind = "nan" if stats is not None and stats.nan > 0 else "inf"
        return Incident(
            step=flag.step, phase="optimizer", kind=kind, op=f"{type(optimizer).__name__}.step", backward_node=None,
            module=_module_of(names.get(id(bad)) if bad is not None else None),
            param=names.get(id(bad)) if bad is not None else None,
            file=frame.file, line=frame.line, category="optimizer", explanation=explanation,
            suggestions=suggestions, operands=[], output=stats,
            code=frame.code or None, function=frame.function, optimizer_state=lines,
        )

    def _replay_optimizer(self, optimizer: torch.optim.Optimizer, snapshot: _OptSnapshot) -> Incident | None:
        """Re-run one optimizer step from its snapshot under op tracing; put everything back after."""
        params = snapshot.params
        now_values = [p.detach().clone() for p in params]
        now_grads = [p.grad for p in params]
        now_state = {id(p): optimizer.state[p] for p in params if p in optimizer.state}
        tracer = OpTracer(phase="optimizer")
        tracer.optimizer = optimizer
        for root in self._roots.values():
            tracer.add_root(root)
        self._replaying = True
        try:
            with torch.no_grad():
                for p, value, grad in zip(params, snapshot.values, snapshot.grads):
                    p.copy_(value)
                    p.grad = grad.clone() if grad is not None else None
            for p in params:
                if id(p) in snapshot.state:
                    optimizer.state[p] = _clone_state(snapshot.state[id(p)])
                elif p in optimizer.state:
                    del optimizer.state[p]
            with tracer:
                optimizer.step()
            incident = incident_for(tracer, [p.detach() for p in params], step=snapshot.step)
        finally:
            self._replaying = False
            with torch.no_grad():
                for p, value, grad in zip(params, now_values, now_grads):
                    p.copy_(value)
                    p.grad = grad
            for p in params:
                if id(p) in now_state:
                    optimizer.state[p] = now_state[id(p)]
        return incident

    def _replay_incident(self, passes: list[_Pass], phase: str, bad: list[_Flag]) -> Incident:
        start = time.perf_counter()
        incident = None
        reason = ""
        if not self.replay_enabled:
            reason = "replay is disabled (replay=False)"
        elif not passes:
            reason = "no forward pass of a watched model was captured for this step"
        elif (bad_input := self._input_incident(passes, nan_only=True)) is not None:
            return bad_input
        else:
            try:
                incident = self._replay(passes)
            except Exception as exc:  # a replay failure must never hide the finding
                reason = f"the replay raised {type(exc).__name__}: {exc}"
            else:
                if incident is None:
                    reason = ("the replay with the same inputs, RNG and autocast state stayed finite (non-deterministic "
                              "kernels, or inputs/parameters changed in place after the forward)")
        seconds = time.perf_counter() - start
        if incident is None and passes:
            incident = self._input_incident(passes, nan_only=False)
        if incident is not None:
            return _with_divergence(replace(incident, step=self.step, replay_seconds=seconds), self._recent_grad_norms)
        return self._coarse_incident(passes, phase, bad, reason, seconds)

    def _replay(self, passes: list[_Pass]) -> Incident | None:
        tracer = OpTracer()
        tracer.boundary = {Watch._replay_pass.__code__}
        for root in self._roots.values():
            tracer.add_root(root)
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        buffers = {id(b): (b, b.detach().clone()) for root in self._roots.values() for b in root.buffers()}
        self._replaying = True
        sinks: list[torch.Tensor] = []
        mapping: dict[int, Any] = {}
        try:
            with tracer:
                for p in passes:
                    sinks = self._replay_pass(tracer, p, mapping)
                    if tracer.events:
                        break
        finally:
            self._replaying = False
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            with torch.no_grad():
                for b, saved in buffers.values():
                    b.copy_(saved)
        return incident_for(tracer, sinks, step=self.step)

    def _replay_pass(self, tracer: OpTracer, p: _Pass, mapping: dict[int, Any]) -> list[torch.Tensor]:
        """Replay one pass; ``mapping`` (original tensor id -> replayed tensor) spans the step's passes,
        so a loss built from several forwards (siamese, contrastive, GAN) is rebuilt from the replays."""

        def sub(x: Any) -> Any:
            return mapping.get(id(x), x) if isinstance(x, torch.Tensor) else x

        def remember(old_tree: Any, new_tree: Any) -> None:
            for old, new in zip(pytree.tree_leaves(old_tree), pytree.tree_leaves(new_tree)):
                if isinstance(old, torch.Tensor):
                    mapping[id(old)] = new

        torch.set_rng_state(p.rng)
        if p.cuda_rng is not None:
            torch.cuda.set_rng_state_all(p.cuda_rng)
        tracer.phase = "forward"
        tracer.fallback_frame = p.call_site
        args = pytree.tree_map(sub, p.args)
        kwargs = pytree.tree_map(sub, p.kwargs)
        with restore_autocast(p.autocast), torch.set_grad_enabled(p.grad_enabled):
            out = p.module(*args, **kwargs)
        remember(p.outputs, out)
        sinks = _float_leaves(out)
        if p.tape is not None and p.loss is not None:
            for entry in p.tape.entries:
                if entry.inplace and not any(isinstance(t, torch.Tensor) and id(t) in mapping
                                             for t in entry.args[:1]):
                    continue  # in-place on a tensor the replay did not make (a parameter, a .grad): skip
                e_args = pytree.tree_map(sub, entry.args)
                e_kwargs = pytree.tree_map(sub, entry.kwargs)
                tracer.frame_override = entry.frame
                try:
                    with restore_autocast(entry.autocast), torch.set_grad_enabled(entry.grad_enabled):
                        new_out = entry.func(*e_args, **e_kwargs)
                finally:
                    tracer.frame_override = None
                remember(entry.out, new_out)
        if p.loss is not None:
            losses = [sub(t) for t in pytree.tree_leaves(p.loss) if isinstance(t, torch.Tensor)]
            sinks = [t for t in losses if t.is_floating_point()] + sinks
            params = [q for root in self._roots.values() for q in root.parameters() if q.requires_grad]
            if losses and params and all(t.requires_grad for t in losses):
                grads = torch.autograd.grad(losses, params, allow_unused=True, retain_graph=True)
                sinks = [g for g in grads if g is not None] + sinks
        return sinks

    def _input_incident(self, passes: list[_Pass], *, nan_only: bool) -> Incident | None:
        """An incident for a model call whose inputs already held NaN (or Inf): the data is broken."""
        for p in passes:
            for index, t in enumerate(_float_leaves((p.args, p.kwargs))):
                stats = operand_stats(t)
                if stats.nan or (stats.inf and not nan_only):
                    frame = p.call_site or UserFrame("<unknown>", 0, "<unknown>")
                    paths = {id(m): n for root in self._roots.values() for n, m in root.named_modules()}
                    what = f"{stats.nan} NaN" if stats.nan else f"{stats.inf} Inf"
                    return Incident(
                        step=self.step, phase="forward", kind="nan" if stats.nan else "inf", op="<input>",
                        backward_node=None, module=paths.get(id(p.module), ""), param=None, file=frame.file,
                        line=frame.line, category="input",
                        explanation=(f"input {index} of the call to {type(p.module).__name__} ({stats.dtype}, shape "
                                     f"{stats.shape}) already held {what} before any op ran: the data, not the "
                                     f"model, produced it."),
                        suggestions=["check the data pipeline for this batch (missing values, division by a zero "
                                     "std in normalisation, log of 0 in feature engineering)",
                                     "validate batches: assert torch.isfinite(x).all(), or torch.nan_to_num(x)"],
                        operands=[stats], code=frame.code or None, function=frame.function,
                    )
        return None

    def _coarse_incident(self, passes: list[_Pass], phase: str, bad: list[_Flag], reason: str,
                         seconds: float) -> Incident:
        """The finest origin known without a replay: phase, root module, and what was non-finite."""
        kinds = sorted({f.kind for f in bad})
        first = bad[0]
        module = ""
        frame = UserFrame("<unknown>", 0, "<unknown>")
        stats = None
        if first.pass_index >= 0 and first.pass_index < len(passes):
            p = passes[first.pass_index]
            leaves = _float_leaves(p.outputs if first.kind == "output" else p.loss)
            if leaves:
                stats = operand_stats(leaves[0])
        what = {"output": "the model's output", "loss": "the loss passed to backward()",
                "grads": "the gradients"}
        found = ", ".join(what.get(k, k) for k in kinds)
        return Incident(
            step=self.step, phase=phase, kind="nan" if stats is None or stats.nan else "inf",  # type: ignore[arg-type]
            op="<unknown>", backward_node=None, module=module, param=None, file=frame.file, line=frame.line,
            category="unknown",
            explanation=f"non-finite values were found in {found}, but the op could not be named: {reason}.",
            suggestions=["run the failing step under floatscope.locate(step_fn) to trace it op by op",
                         "make the step deterministic (floatscope demo shows scripts that replay exactly)"],
            operands=[stats] if stats else [], exact=False, replay_seconds=seconds,
        )

    def _collapse_incident(self, scale: float) -> None:
        passes = self._skipped_passes
        detail: Incident | None = None
        seconds = 0.0
        if passes and self.replay_enabled:
            start = time.perf_counter()
            try:
                detail = self._replay(passes)
            except Exception:  # the collapse is reported even when the replay fails
                detail = None
            seconds = time.perf_counter() - start
        history = ", ".join(f"{s:g}" for s in self._scale_history[-6:])
        why = "fell below 1" if scale < 1.0 else f"was skipped {self.consecutive_skips} steps in a row"
        explanation = (f"the GradScaler's loss scale {why} (recent scales: {history}); every skipped step means inf/NaN "
                       f"gradients, and a scale below 1 shrinks gradients instead of protecting them from underflow.")
        if detail is not None:
            explanation += f" Replaying the last skipped step: {detail.op} in {detail.phase} made the first non-finite " \
                           f"value ({detail.category}): {detail.explanation}"
        suggestions = (detail.suggestions if detail else []) + [
            "gradients that overflow at every scale come from a NaN/Inf in the model, not from scaling: fix that op",
            "or train in bfloat16 (no GradScaler needed)"]
        base = detail or Incident(step=self.step - 1, phase="backward", kind="inf", op="GradScaler.update",
                                  backward_node=None, module=None, param=None, file="<unknown>", line=0,
                                  category="loss-scale-collapse", explanation="", suggestions=[], operands=[])
        incident = replace(base, step=self.step - 1, category="loss-scale-collapse", explanation=explanation,
                           suggestions=suggestions, replay_seconds=seconds)
        self._report(incident)


def _as_list(value: Any, cls: type, what: str, expected: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, cls):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, cls) for v in value):
        return list(value)
    raise UsageError(f"watch() expects {what} to be a {expected} (or a list of them), got {type(value).__name__}; "
                     f"pass {what}=None to watch every one the code uses")


def _with_divergence(incident: Incident, grad_norms: list[float]) -> Incident:
    """Name a diverging run: an overflow preceded by gradient norms growing step over step."""
    finite = [g for g in grad_norms if math.isfinite(g) and g > 0]
    if incident.category != "overflow" or len(finite) < 3 or finite[-1] < 10 * finite[0]:
        return incident
    growth = (finite[-1] / finite[0]) ** (1 / (len(finite) - 1))
    trend = ", ".join(f"{g:.3g}" for g in finite[-6:])
    healthy = min(finite[: max(1, len(finite) // 2)])
    explanation = (incident.explanation + f" Training was diverging: the gradient norm grew {growth:.3g}x per step "
                   f"over the last {len(finite)} steps ({trend}), so weights and activations grew until they overflowed.")
    suggestions = [f"clip gradients: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={healthy:.3g}) "
                   "(the norm before the growth)",
                   "lower the learning rate (or add warm-up); the growth is the signature of a step size too large "
                   "for the curvature"] + incident.suggestions
    return replace(incident, explanation=explanation, suggestions=suggestions)


def _call_kwargs(module: torch.nn.Module, frame: Any) -> dict[str, Any]:
    """Keyword arguments of the module call in progress (global hooks do not receive them).

    ``Module._call_impl(self, *args, **kwargs)`` is at most a few frames above the hook.
    """
    for _ in range(4):
        if frame is None:
            break
        if frame.f_code.co_name == "_call_impl":
            local = frame.f_locals
            if local.get("self") is module and isinstance(local.get("kwargs"), dict):
                return dict(local["kwargs"])
        frame = frame.f_back
    return {}


def _module_of(param_name: str | None) -> str | None:
    if param_name is None:
        return None
    return param_name.rpartition(".")[0]


def _user_stacklevel() -> int:
    """stacklevel that points warnings.warn at the first frame outside torch and floatscope."""
    frame = sys._getframe(1)
    level = 1
    target = frame_from(frame)
    while frame is not None:
        if frame.f_code.co_filename == target.file and frame.f_lineno == target.line:
            return level
        frame = frame.f_back
        level += 1
    return 2


def watch(
    model: torch.nn.Module | Sequence[torch.nn.Module] | None = None,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    *,
    scaler: Any = None,
    on_anomaly: OnAnomaly = "raise",
    store: str | RunStore | None = DEFAULT_STORE,  # type: ignore[assignment]
    run_name: str | None = None,
    max_consecutive_skips: int = 32,
    replay: bool = True,
    health_every: int = DEFAULT_HEALTH_EVERY,
    exact_optimizer: bool = False,
) -> Watch:
    """Watch training for the first NaN/Inf; use as ``with floatscope.watch(model, opt): ...``.

    See :class:`Watch` for the arguments.

    Example:
        >>> with floatscope.watch(model, optimizer, on_anomaly="raise", store=None):  # doctest: +SKIP
        ...     train()
    """
    return Watch(model, optimizer, scaler=scaler, on_anomaly=on_anomaly, store=store, run_name=run_name,
                 max_consecutive_skips=max_consecutive_skips, replay=replay, health_every=health_every,
                 exact_optimizer=exact_optimizer)
