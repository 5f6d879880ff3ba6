"""Step capture: everything a training step computes, recorded cheaply enough to leave on.

What is seen, and how:

* **root module calls** (*passes*): a forward pre-hook keeps the call's inputs, RNG and autocast
  state and the user's line; a forward hook keeps the outputs. Inside a root module nothing else
  runs in Python: the capture's function mode is popped off the stack for the call's duration.
* **torch calls outside every watched module** (*calls*: the loss, raw-tensor models, free
  functions, data preparation): a ``TorchFunctionMode`` active for the whole watch records each
  top-level call with its arguments, output and line. Attribute access passes straight through;
  calls inside a ``DataLoader`` iteration run unrecorded (the batch is a step input).
* **backward**: ``Tensor.backward``/``torch.autograd.backward`` (the gradients of the watched
  leaves are then due a check) and ``torch.autograd.grad`` (its results are checked).
* **parameter writes**: ``torch.optim`` steps (optimizer hooks; ``step(closure)`` included, the
  closure's computation is recorded like any other) and in-place writes to parameters or
  raw-tensor leaves outside an optimizer (``W -= lr * W.grad`` under ``no_grad``): a *manual update*.
* **reads**: ``.item()``, ``.tolist()``, ``bool()``, ``float()``, ``.numpy()``, printing: the
  value the script reads is checked on the host, where it already is; checks such as
  ``torch.isnan(x)`` mark ``x`` to be checked before the script acts on the answer.

Events are grouped in *windows*: the events since the parameters last changed. A window is what a
replay re-executes, so it ends at every parameter write; it is also where the iteration clock
(``step``) labels the events.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.utils._pytree as pytree
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.overrides import TorchFunctionMode

from floatscope._events import UserFrame
from floatscope._instrument.autocast import AutocastState, autocast_state
from floatscope._instrument.channel import Subject
from floatscope._instrument.frames import call_kwargs, frame_from, name_in_frame, user_frame_object
from floatscope._instrument.hooks import HookSet

__all__ = ["Pass", "Call", "Backward", "Update", "RngMark", "Window", "IterationClock", "Leaves", "StepCapture",
           "CaptureListener", "Coverage"]

_MAX_EVENTS = 4096
_MAX_CLONE_BYTES = 64 * 2**20


# ============================================================================ events
@dataclass(eq=False)
class Pass:
    """One call of a root module."""

    module: torch.nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    autocast: AutocastState
    grad_enabled: bool
    call_site: UserFrame
    functional: tuple[Any, dict[str, Any]] | None = None  # functional_call(module, dicts, ..., **options)
    outputs: Any = None
    index: int = 0


@dataclass(eq=False)
class Call:
    """One top-level torch call made outside every watched module."""

    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out: Any
    frame: UserFrame
    autocast: AutocastState
    grad_enabled: bool
    inplace: bool = False
    before: torch.Tensor | None = None  # the in-place target's value before the call (targets made elsewhere)
    rng: torch.Tensor | None = None     # the RNG state before a random call
    # the inputs made outside the window and their versions after the call: a replay that finds one
    # changed in place since (``p.grad.zero_()`` after a hand-written update) cannot reproduce the call
    external: tuple[tuple[torch.Tensor, int], ...] = ()


@dataclass(eq=False)
class Backward:
    """``backward()`` (``kind="backward"``) or ``torch.autograd.grad`` (``kind="grad"``)."""

    kind: str
    roots: list[torch.Tensor]
    grad_outputs: list[Any] | None
    inputs: list[torch.Tensor] | None
    frame: UserFrame
    options: dict[str, Any] = field(default_factory=dict)
    out: Any = None
    autocast: AutocastState = ()


@dataclass(eq=False)
class Update:
    """An in-place write to a parameter or raw-tensor leaf outside any optimizer."""

    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    targets: list[torch.Tensor]
    names: list[str]
    frame: UserFrame
    iteration: int = 0


@dataclass(eq=False)
class RngMark:
    """The RNG state after code that ran unrecorded (a DataLoader iteration) and may have used it."""

    rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None


Event = Pass | Call | Backward | RngMark


@dataclass(eq=False)
class Window:
    """The events since the parameters last changed, and the iteration they belong to."""

    index: int
    iteration: int
    rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    events: list[Any] = field(default_factory=list)
    produced: set[int] = field(default_factory=set)   # ids of tensors the window's events made
    checked: set[int] = field(default_factory=set)    # ids of tensors the script checked or read
    checked_upto: int = 0
    checked_losses: int = 0
    truncated: bool = False
    passes: int = 0
    writes: int = 0          # parameter writes seen when the window began (a later write makes it stale)
    grads: set[int] = field(default_factory=set)  # ids of the gradients read for the update that ended it


@dataclass
class Coverage:
    """What the watch saw: a run with none of it was not watched at all."""

    modules: int = 0
    passes: int = 0
    calls: int = 0
    backward: int = 0
    grad_calls: int = 0
    optimizer_steps: int = 0
    manual_updates: int = 0
    reads: int = 0

    @property
    def anything(self) -> bool:
        return any((self.passes, self.calls, self.backward, self.grad_calls, self.optimizer_steps,
                    self.manual_updates))


# ============================================================================ the iteration clock
class IterationClock:
    """Counts training iterations; see the README's definition of ``step``.

    With ``torch.optim``: an iteration ends when its optimizers have stepped. An optimizer that
    steps a second time starts a new iteration, so a GAN's discriminator and generator steps are
    one iteration, four accumulated micro-batches and their one step are one, and an LBFGS step
    with all its closure calls is one. A GradScaler-skipped step counts. Without ``torch.optim``:
    an iteration ends at a group of in-place parameter updates or a ``torch.autograd.grad`` call,
    and the next begins with the next computation that builds a graph (in inference under
    ``no_grad``, each root model call is one).
    """

    def __init__(self) -> None:
        self.index = 0               # the current (or latest stepped) iteration
        self.stepped: set[int] = set()
        self.known: set[int] = set()
        self.optimizer_mode = False
        self.in_step = False
        self.boundary_pending = False
        self.saw_backward = False
        self.gradients_since = False  # a backward or grad call since the last boundary
        self.completed = 0           # iterations with a parameter update (or grad call)
        self.manual_completed = 0    # of them, those ended by in-place parameter updates
        self.stepped_since_update = False  # an optimizer stepped since the last backward or update group
        self.counted_by_update = False  # an update group ended this iteration before its optimizer step
        self.update_since_backward = False  # (before any optimizer step) an update group ended since the last backward

    def label(self) -> int:
        """The iteration of an event happening now."""
        if self.in_step or not self.optimizer_mode:
            return self.index
        if self.stepped and self.stepped >= self.known:
            return self.index + 1
        return self.index

    def step_begins(self, optimizer: object) -> int:
        key = id(optimizer)
        if not self.optimizer_mode:
            # The first optimizer step: boundaries that only autograd.grad calls made (the inner loop of
            # a meta-learning step) were part of this iteration; manual-update iterations before stay.
            self.optimizer_mode = True
            self.boundary_pending = False
            # An update group since the last backward (weights clamped before this step) is this iteration's.
            self.index = self.completed = self.manual_completed - (1 if self.update_since_backward else 0)
        elif key in self.stepped:
            if not self.counted_by_update:  # else the update group (weights clamped before the step) began it
                self.index += 1
            self.stepped = set()
        self.counted_by_update = False
        self.stepped.add(key)
        self.known.add(key)
        self.stepped_since_update = True
        return self.index

    def step_done(self) -> None:
        """The step of the current iteration ran (or a GradScaler skipped it): the iteration counts."""
        self.completed = max(self.completed, self.index + 1)

    def state_changed(self, *, update: bool = False) -> None:
        """A manual update group (``update``) or an ``autograd.grad`` call ended an iteration (no optimizer in use).

        Writes to parameters before any gradient was computed (initialisation) end nothing.
        """
        if not self.optimizer_mode and self.gradients_since:
            self.boundary_pending = True
            self.gradients_since = False
            self.completed = max(self.completed, self.index + 1)
            if update:
                self.manual_completed = self.index + 1
                self.update_since_backward = True
        elif self.optimizer_mode and update:
            if self.gradients_since and not self.stepped_since_update and self.stepped >= self.known:
                # Hand-written updates after a backward that no optimizer step followed: an iteration of
                # their own (torch.optim, then a manual loop). Events after it belong to the next one
                # (label()). An optimizer step that follows in the same iteration (weights clamped before
                # it) does not begin another.
                self.index = self.label()
                self.completed = max(self.completed, self.index + 1)
                self.gradients_since = False
                self.counted_by_update = True
            self.stepped_since_update = False

    def inference_call(self) -> None:
        """A model call in a run that has computed no gradient yet: each one is an iteration."""
        if not self.optimizer_mode and not self.saw_backward:
            self.boundary_pending = True
            self.completed = max(self.completed, self.index + 1)

    def compute(self) -> bool:
        """Computation that builds a graph began; True when it starts a new iteration."""
        if self.boundary_pending and not self.optimizer_mode:
            self.boundary_pending = False
            self.index += 1
            return True
        return False


# ============================================================================ known leaves
class Leaves:
    """Parameters of the watched models and raw-tensor leaves: what a manual update writes to."""

    def __init__(self) -> None:
        self.by_id: dict[int, tuple[torch.Tensor, str]] = {}
        self.by_storage: dict[int, int] = {}
        self.owner: dict[int, torch.nn.Module] = {}
        self.roots: list[torch.nn.Module] = []
        self.raw: set[int] = set()

    def add_root(self, module: torch.nn.Module, label: str | None = None) -> list[tuple[str, torch.Tensor]]:
        """Register a root model's parameters; returns the new ones (name, parameter)."""
        if any(r is module for r in self.roots):
            return []
        self.roots.append(module)
        prefix = f"{label}." if label else ""
        added = []
        for name, p in module.named_parameters(remove_duplicate=False):
            if id(p) not in self.by_id or id(p) in self.raw:  # a model's names win over a raw leaf's
                fresh = id(p) not in self.by_id
                self.raw.discard(id(p))
                self._add(p, prefix + name)
                self.owner[id(p)] = module
                if fresh:
                    added.append((prefix + name, p))
        return added

    def add_raw(self, tensor: torch.Tensor, frame: Any, name: str | None = None) -> bool:
        """Register a leaf that is not a model parameter, named as the script names it (or ``name``)."""
        if id(tensor) in self.by_id:
            return False
        self._add(tensor, name or name_in_frame(tensor, frame) or f"tensor{tuple(tensor.shape)}")
        self.raw.add(id(tensor))
        return True

    def _add(self, tensor: torch.Tensor, name: str) -> None:
        self.by_id[id(tensor)] = (tensor, name)
        try:
            self.by_storage[tensor.untyped_storage().data_ptr()] = id(tensor)
        except (RuntimeError, NotImplementedError):
            pass

    def lookup(self, tensor: torch.Tensor) -> tuple[torch.Tensor, str] | None:
        """The leaf that ``tensor`` is, or aliases (``p.data``): same storage."""
        found = self.by_id.get(id(tensor))
        if found is not None:
            return found
        try:
            key = self.by_storage.get(tensor.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):
            return None
        if key is None:
            return None
        leaf = self.by_id.get(key)
        if leaf is not None and leaf[0].untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
            return leaf
        return None

    def name(self, tensor: torch.Tensor) -> str | None:
        found = self.by_id.get(id(tensor))
        return found[1] if found else None

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return [(name, t) for t, name in self.by_id.values()]


# ============================================================================ the listener
class CaptureListener(Protocol):
    """What the capture tells the watch; the watch decides what to read and when."""

    def before_update(self, reason: str, optimizer: torch.optim.Optimizer | None) -> None: ...

    def after_update(self, reason: str, optimizer: torch.optim.Optimizer | None, updates: list[Update]) -> None: ...

    def skipped_step(self, optimizer: torch.optim.Optimizer) -> None: ...

    def before_grads_cleared(self) -> None: ...

    def boundary(self) -> None: ...

    def read(self, tensor: torch.Tensor, frame: UserFrame, nonfinite: bool) -> None: ...

    def pass_begun(self, p: Pass, first: bool) -> None: ...

    def pass_ended(self, p: Pass) -> None: ...

    def leaves_added(self, leaves: list[tuple[str, torch.Tensor]]) -> None: ...


# ============================================================================ function kinds
_PASS, _READ, _CHECK, _BACKWARD, _GRAD, _ENTER, _EXIT, _GRAD_SET, _CALL, _INPLACE, _PROP = range(11)
_KINDS: dict[Any, int] = {}
_TENSOR_PROPS = {"T", "mT", "H", "mH", "real", "imag"}
_READ_FUNCS = [torch._C.TensorBase.item, torch._C.TensorBase.tolist, torch._C.TensorBase.__bool__,
               torch._C.TensorBase.__float__, torch._C.TensorBase.__int__, torch._C.TensorBase.__index__,
               torch._C.TensorBase.numpy, torch.Tensor.__repr__, torch.Tensor.__format__, torch.Tensor.__str__]
_CHECK_FUNCS = [torch.isnan, torch.isinf, torch.isfinite, torch.isposinf, torch.isneginf, torch.nan_to_num,
                torch._C.TensorBase.isnan, torch._C.TensorBase.isinf, torch._C.TensorBase.isfinite,
                torch._C.TensorBase.nan_to_num]
_PASS_FUNCS = [torch._C.TensorBase.size, torch._C.TensorBase.dim, torch._C.TensorBase.numel,
               torch._C.TensorBase.stride, torch._C.TensorBase.element_size, torch._C.TensorBase.is_contiguous,
               torch._C.TensorBase.data_ptr, torch._C.TensorBase.storage_offset, torch._C.TensorBase.get_device,
               torch._C.TensorBase.untyped_storage, torch.Tensor.__len__, torch.Tensor.__hash__,
               torch.Tensor.__iter__, torch._C._set_grad_enabled, torch.Tensor.__reduce_ex__,
               torch._C.TensorBase.__len__ if hasattr(torch._C.TensorBase, "__len__") else torch.Tensor.__len__]
for _f in _READ_FUNCS:
    _KINDS[_f] = _READ
for _f in _CHECK_FUNCS:
    _KINDS[_f] = _CHECK
for _f in _PASS_FUNCS:
    _KINDS[_f] = _PASS
_KINDS[torch.Tensor.backward] = _BACKWARD
_KINDS[torch.autograd.backward] = _BACKWARD
_KINDS[torch.autograd.grad] = _GRAD
_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ipow__", "__setitem__", "__ior__",
                    "__iand__", "__ixor__", "__ifloordiv__", "__imod__", "__ilshift__", "__irshift__"}


def _classify(func: Any) -> int:
    name = getattr(func, "__name__", "") or ""
    if name in ("__get__", "__set__", "__delete__"):
        prop = getattr(getattr(func, "__self__", None), "__name__", "")
        if name == "__set__" and prop == "grad":
            kind = _GRAD_SET
        elif name == "__get__" and prop in _TENSOR_PROPS:
            kind = _PROP
        else:
            kind = _PASS
    elif name == "_record_function_enter_new":
        kind = _ENTER
    elif name.startswith("_record_function_exit"):
        kind = _EXIT
    elif "record_function" in name or name in ("__repr__", "__format__", "__str__") or name in _ALLOC:
        kind = _PASS  # uninitialised memory (what torch.load fills) holds data, not computed values
    elif (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDERS:
        kind = _INPLACE
    else:
        kind = _CALL
    try:
        _KINDS[func] = kind
    except TypeError:  # unhashable callables: classify every time
        pass
    return kind


_RANDOM = {"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "bernoulli", "dropout",
           "multinomial", "normal", "normal_", "uniform_", "bernoulli_", "random_", "exponential_", "geometric_",
           "cauchy_", "log_normal_", "poisson", "feature_dropout", "alpha_dropout", "dropout1d", "dropout2d",
           "dropout3d", "feature_alpha_dropout", "rrelu", "gumbel_softmax"}


_IS_RANDOM: dict[Any, bool] = {}
_ALLOC = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}


class _StepMode(TorchFunctionMode):
    """The capture's function mode; see the module docstring."""

    def __init__(self, capture: "StepCapture") -> None:
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kind = _KINDS.get(func)
        if kind is None:
            kind = _classify(func)
        if kind == _PASS:
            return func(*args, **(kwargs or {}))
        if kind == _GRAD_SET:  # zero_grad sets every .grad: keep this path short
            capture = self.capture
            if capture.grads_pending is not None and not (capture.quiet or capture.suspended or capture.depth):
                capture.listener.before_grads_cleared()
            return func(*args, **(kwargs or {}))
        capture = self.capture
        if kind == _CALL and _int_only(args) and not kwargs and capture.idle_for_int():
            # Index arithmetic and token slicing: no float value, nothing to record (fast path).
            out = func(*args)
            capture.coverage.calls += 1
            if _is_float(out):  # an integer count turned into float (counts.float(), int / int)
                capture.record_late(func, args, out, frame_from(sys._getframe(1)))
            return out
        return capture.on_call(kind, func, args, kwargs or {})


def _float_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


# ============================================================================ the capture
class StepCapture:
    """Install the hooks and the function mode; record passes, calls, backward, updates and reads.

    Args:
        listener: Told of updates, boundaries and reads (the watch).
        models: Root models to hook; empty to treat every module called at top level as a root.
        optimizers: Optimizers to watch; empty for all.
    """

    def __init__(self, listener: CaptureListener, models: Sequence[torch.nn.Module] = (),
                 optimizers: Sequence[torch.optim.Optimizer] = ()) -> None:
        self.listener = listener
        self.models = list(models)
        self.optimizers = {id(o) for o in optimizers}
        self._given_optimizers = list(optimizers)
        self.global_mode = not self.models
        self.clock = IterationClock()
        self.param_writes = 0          # a clock of parameter writes
        self.written_at: dict[int, int] = {}  # id(leaf) -> the write clock when it was last written
        self.leaves = Leaves()
        self.coverage = Coverage()
        self.mode = _StepMode(self)
        self.window = self._new_window_object(0)
        self.windows = 0
        self.depth = 0
        self.current: Pass | None = None
        self.in_optimizer = 0
        self.in_backward = 0
        self.quiet = 0                 # inside GradScaler internals or floatscope's own work
        self.suspended = False         # replaying: capture nothing
        self.loading: list[Any] = []   # DataLoader iteration handles
        self.grads_pending: list[torch.Tensor] | None = None  # leaves whose .grad a backward wrote
        self.checks_pending = False
        self.update_group: list[Update] = []
        self.pending_update: list[str] = []  # names of the leaves a manual update is about to write
        self.last_writer: dict[int, tuple[str, int, Any]] = {}  # id(param) -> (kind, iteration, who)
        self._hooks = HookSet()
        self._has_params: dict[int, bool] = {}
        self._called: set[int] = set()  # roots called at least once
        self._zero_grad_wrapped: set[int] = set()
        self._mode_popped = False
        self.step_calls = 0
        self._ids: dict[int, tuple[tuple[int, ...], list[int]]] = {}

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        hooks = self._hooks
        if self.global_mode:
            hooks.add(register_module_forward_pre_hook(self._global_pre))
            hooks.add(register_module_forward_hook(self._global_post, always_call=True))
        else:
            for m in self.models:
                self.add_root(m)
                hooks.add(m.register_forward_pre_hook(self._root_pre, with_kwargs=True), on=m)
                hooks.add(m.register_forward_hook(self._root_post, always_call=True), on=m)
                self.wrap_zero_grad(m)
        for optimizer in self._given_optimizers:
            self.wrap_zero_grad(optimizer)
        hooks.add(register_optimizer_step_pre_hook(self._pre_step))
        hooks.add(register_optimizer_step_post_hook(self._post_step))
        hooks.enter(self.mode)
        hooks.on_close(self._unpop)

    def remove(self) -> None:
        self._hooks.close()

    def _unpop(self) -> None:
        # The mode was pushed by install(); if it is off the stack (popped inside a module or a step
        # that raised), HookSet's exit of it would pop someone else's mode: push it back first.
        if self._mode_popped:
            self._push()

    def _pop(self) -> None:
        if not self._mode_popped:
            stack = torch.overrides._get_current_function_mode_stack()
            if stack and stack[-1] is self.mode:
                torch.overrides._pop_mode()
                self._mode_popped = True

    def _push(self) -> None:
        if self._mode_popped:
            torch.overrides._push_mode(self.mode)
            self._mode_popped = False

    def own(self) -> "_Own":
        """Context manager for floatscope's own work in a hook: the function mode is off inside."""
        return _Own(self)

    # ------------------------------------------------------------------ windows and roots
    def _new_window_object(self, index: int) -> Window:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return Window(index, self.clock.label(), torch.get_rng_state(), cuda, writes=self.param_writes)

    def new_window(self) -> Window:
        """Start a new window (the parameters just changed); the old one must have been read."""
        self.windows += 1
        self.window = self._new_window_object(self.windows)
        return self.window

    def add_root(self, module: torch.nn.Module) -> None:
        added = self.leaves.add_root(module)
        self.coverage.modules = len(self.leaves.roots)
        if added:
            self.listener.leaves_added(added)

    def _is_model(self, module: torch.nn.Module) -> bool:
        key = id(module)
        has = self._has_params.get(key)
        if has is None:
            has = next(module.parameters(), None) is not None
            self._has_params[key] = has
        return has

    def _record(self, event: Any) -> None:
        window = self.window
        if len(window.events) >= _MAX_EVENTS:
            window.truncated = True
            return
        window.events.append(event)

    # ------------------------------------------------------------------ module hooks
    def _global_pre(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if self.depth:
            self.depth += 1
        elif not (self.suspended or self.in_backward or self.quiet) and self._is_model(module):
            self._begin_pass(module, args, call_kwargs(module, sys._getframe(1)))

    def _global_post(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.depth:
            self.depth -= 1
            if self.depth == 0:
                self._end_pass(output)

    def _root_pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.depth:
            self.depth += 1
        elif not (self.suspended or self.in_backward or self.quiet):
            self._begin_pass(module, args, dict(kwargs))

    def _root_post(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.depth:
            self.depth -= 1
            if self.depth == 0:
                self._end_pass(output)

    def _begin_pass(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._pop()  # nothing in a root model runs through the function mode, nor does this hook
        if self.in_optimizer and not self._in_closure:
            self._after_failed_step()
        self._end_update_group()
        first = id(module) not in self._called
        if first:
            self._called.add(id(module))
            self.add_root(module)
            self.wrap_zero_grad(module)
        grad = torch.is_grad_enabled()
        if self.window.passes and not grad:
            self.clock.inference_call()  # under no_grad: a model call that trains nothing is an iteration
        if self.clock.compute():
            self.listener.boundary()
            self.new_window()
        self.coverage.passes += 1
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        p = Pass(module, args, kwargs, torch.get_rng_state(), cuda, autocast_state(), grad,
                 frame_from(sys._getframe(1)), _functional_call(sys._getframe(2)), index=self.window.passes)
        self.window.passes += 1
        self._record(p)
        self.current = p
        self.depth = 1
        self.listener.pass_begun(p, first)

    def _end_pass(self, output: Any) -> None:
        p = self.current
        self.current = None
        try:
            if p is not None:
                p.outputs = output
                self.window.produced.update(id(t) for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor))
                self.listener.pass_ended(p)
        finally:
            self._push()

    # ------------------------------------------------------------------ optimizer hooks
    _in_closure = False

    def _watched(self, optimizer: torch.optim.Optimizer) -> bool:
        return not self.optimizers or id(optimizer) in self.optimizers

    def wrap_zero_grad(self, owner: torch.optim.Optimizer | torch.nn.Module) -> None:
        """Run ``owner.zero_grad`` (an instance patch, undone on exit) outside the function mode.

        ``zero_grad`` reads and sets every parameter's ``.grad``; through the mode that is two Python
        calls per parameter. Gradients a backward wrote and nobody checked yet are checked first.
        """
        if id(owner) in self._zero_grad_wrapped or "zero_grad" in vars(owner):
            return
        self._zero_grad_wrapped.add(id(owner))
        original = owner.zero_grad
        capture = self

        def zero_grad(*args: Any, **kwargs: Any) -> Any:
            if capture.grads_pending is not None and not (capture.quiet or capture.suspended or capture.depth):
                with capture.own():
                    capture.listener.before_grads_cleared()
            with capture.own():
                return original(*args, **kwargs)

        self._hooks.patch(owner, "zero_grad", zero_grad)

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        if self.suspended:
            return None
        self.step_calls += 1
        if self.in_optimizer and not self._in_closure:
            self._after_failed_step()
        if self._watched(optimizer):
            self.wrap_zero_grad(optimizer)
        with self.own():
            self._end_update_group()
            if self._watched(optimizer):
                self.clock.step_begins(optimizer)
                self.window.iteration = self.clock.index
                self.coverage.optimizer_steps += 1
                self.listener.before_update("step", optimizer)  # may raise NonFiniteError: nothing changed yet
        self.clock.in_step = True
        self.in_optimizer += 1
        self._pop()
        closure_at = 1 if len(args) > 1 else None
        closure = args[1] if closure_at else kwargs.get("closure")
        if callable(closure):
            wrapped = self._wrap_closure(optimizer, closure)
            if closure_at:
                return (args[0], wrapped, *args[2:]), kwargs
            return args, {**kwargs, "closure": wrapped}
        return None

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.suspended:
            return
        self.in_optimizer = max(0, self.in_optimizer - 1)
        self.clock.in_step = False
        self._push()
        if not self._watched(optimizer):
            return
        self.clock.step_done()
        iteration = self.clock.index
        self.param_writes += 1
        writer = ("optimizer", iteration, optimizer)
        for key in self._param_ids(optimizer):
            self.last_writer[key] = writer
            self.written_at[key] = self.param_writes
        with self.own():
            self.listener.after_update("step", optimizer, [])
            self.new_window()

    def _param_ids(self, optimizer: torch.optim.Optimizer) -> list[int]:
        """ids of an optimizer's parameters, cached while its param groups keep their sizes."""
        sizes = tuple(len(g["params"]) for g in optimizer.param_groups)
        cached = self._ids.get(id(optimizer))
        if cached is None or cached[0] != sizes:
            cached = (sizes, [id(p) for g in optimizer.param_groups for p in g["params"]])
            self._ids[id(optimizer)] = cached
        return cached[1]

    def _after_failed_step(self) -> None:
        """An optimizer step raised (its post-hook never ran): leave the optimizer state."""
        self.in_optimizer = 0
        self.clock.in_step = False
        self._push()

    def _wrap_closure(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any]) -> Callable[[], Any]:
        capture = self

        def closure_watched() -> Any:
            capture._in_closure = True
            capture.in_optimizer -= 1
            capture._push()
            capture.param_writes += 1  # the optimizer may have moved its parameters since the last call
            for group in optimizer.param_groups:
                for p in group["params"]:
                    capture.written_at[id(p)] = capture.param_writes
            capture.new_window()
            capture.window.iteration = capture.clock.index
            ok = False
            try:
                result = closure()
                ok = True
                return result
            finally:
                try:
                    with capture.own():
                        capture._end_update_group()
                        if ok:
                            capture.listener.before_update("closure", optimizer)
                finally:
                    capture._in_closure = False
                    capture.in_optimizer += 1
                    capture._pop()

        return closure_watched

    # ------------------------------------------------------------------ GradScaler
    def skipped_step(self, optimizer: torch.optim.Optimizer) -> None:
        """A GradScaler skipped ``optimizer.step()`` (inf/NaN gradients): an iteration all the same."""
        with self.own():
            self._end_update_group()
            if self._watched(optimizer):
                self.clock.step_begins(optimizer)
                self.clock.step_done()
                self.window.iteration = self.clock.index
                self.listener.skipped_step(optimizer)
            self.new_window()

    # ------------------------------------------------------------------ the function mode
    def on_call(self, kind: int, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.quiet or self.suspended or self.depth or self.in_optimizer or self.in_backward:
            return func(*args, **kwargs)
        if kind == _ENTER:
            out = func(*args, **kwargs)
            if args and isinstance(args[0], str) and args[0].startswith("enumerate(DataLoader)"):
                self.loading.append(out)
            return out
        if kind == _EXIT:
            out = func(*args, **kwargs)
            if self.loading and args and args[0] is self.loading[-1]:
                self.loading.pop()
                if not self.loading:
                    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
                    self._record(RngMark(torch.get_rng_state(), cuda))
            return out
        if self.loading:
            return func(*args, **kwargs)
        if kind == _READ:
            return self._read(func, args, kwargs)
        if kind == _BACKWARD:
            return self._backward(func, args, kwargs)
        if kind == _GRAD:
            return self._grad(func, args, kwargs)
        return self._call(kind, func, args, kwargs)

    def _frame(self) -> UserFrame:
        return frame_from(sys._getframe(3))

    def idle_for_int(self) -> bool:
        """No state that needs the full path for an integer-only call (see ``_StepMode``)."""
        return not (self.quiet or self.suspended or self.depth or self.in_optimizer or self.in_backward
                    or self.loading)

    def record_late(self, func: Any, args: tuple[Any, ...], out: Any, frame: UserFrame) -> None:
        """Record an integer-input call whose output is float (taken by the fast path)."""
        if not self.window.truncated:
            self._record(Call(func, args, {}, out, frame, autocast_state(), torch.is_grad_enabled(), False, None,
                              None))
            if isinstance(out, torch.Tensor):
                self.window.produced.add(id(out))
            else:
                self.window.produced.update(id(t) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))

    def _call(self, kind: int, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        grad = torch.is_grad_enabled()
        # An in-place call on a leaf that requires grad builds no graph (autograd refuses it): it is an
        # initialisation under no_grad inside the call (nn.init.*), not the forward of a raw-tensor model.
        builds_graph = grad and _needs_grad(args, kwargs) and not (kind == _INPLACE and _leaf_target(args, kwargs))
        if builds_graph:
            self._end_update_group()
            if self.clock.compute():
                self.listener.boundary()
                self.new_window()
        elif grad and self.update_group and self._reads_only_data(args, kwargs):
            # Past a hand-written update (made under no_grad), a call with grad enabled on data alone (the
            # next batch, its normalisation) begins the next iteration.
            self._end_update_group()
            if self.clock.compute():
                self.listener.boundary()
                self.new_window()
        before = None
        rng = None
        if kind == _INPLACE and args:
            target = args[0]
            if isinstance(target, torch.Tensor):
                leaf = self.leaves.lookup(target)
                if leaf is not None and not (grad and target.requires_grad):
                    return self._manual_update(func, args, kwargs, [target], [leaf[1]])
                if func.__name__ == "zero_" and self.grads_pending is not None:
                    self.listener.before_grads_cleared()
                if id(target) not in self.window.produced:
                    before = _clone_small(target)
            elif isinstance(target, (list, tuple)) and target and isinstance(target[0], torch.Tensor):
                found = [(t, self.leaves.lookup(t)) for t in target if isinstance(t, torch.Tensor)]
                hits = [(t, leaf) for t, leaf in found if leaf is not None]
                if hits and not grad:
                    return self._manual_update(func, args, kwargs, [t for t, _ in hits], [leaf[1] for _, leaf in hits])
        random = _IS_RANDOM.get(func)
        if random is None:
            random = getattr(func, "__name__", "") in _RANDOM
            try:
                _IS_RANDOM[func] = random
            except TypeError:
                pass
        if random and (func not in _INT_RANDOM or _float_dtype(kwargs)):
            rng = torch.get_rng_state()
        out = func(*args, **kwargs)
        self.coverage.calls += 1
        if kind == _CHECK:
            self.checks_pending = True
            self.window.checked.update(id(a) for a in args if isinstance(a, torch.Tensor))
        # Integer and bool work (index arithmetic, slicing a token tensor, masks) makes no float value: it
        # is not recorded, and a replay reads its results as they are.
        if not self.window.truncated and (_is_float(out) or _any_float(args, kwargs)):
            frame = self._frame()
            produced = self.window.produced
            external = tuple((a, a._version) for a in args if isinstance(a, torch.Tensor) and id(a) not in produced)
            self._record(Call(func, args, kwargs, out, frame, autocast_state(), grad, kind == _INPLACE, before, rng,
                              external))
            if isinstance(out, torch.Tensor):
                produced.add(id(out))
            else:
                produced.update(id(t) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        if builds_graph:
            self._discover_leaves(args, kwargs)
        return out

    def _discover_leaves(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        added = []
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor) and a.requires_grad and a.is_leaf and id(a) not in self.leaves.by_id:
                if self.leaves.add_raw(a, user_frame_object(sys._getframe(4))):
                    added.append((self.leaves.name(a) or "", a))
        if added:
            self.listener.leaves_added(added)

    def _read(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        out = func(*args, **kwargs)
        t = args[0] if args else None
        if not isinstance(t, torch.Tensor):
            return out
        self.coverage.reads += 1
        self._end_update_group()
        nonfinite = t.is_floating_point() and _host_nonfinite(func, t, out)
        if t.is_floating_point():
            self.window.checked.add(id(t))
        if nonfinite or self.checks_pending:
            self.checks_pending = False
            self.listener.read(t, self._frame(), nonfinite)
        return out

    def _backward(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._end_update_group()
        tensors = args[0] if args else kwargs.get("tensors", kwargs.get("self"))
        roots = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors or [])
        grad_tensors = args[1] if len(args) > 1 else kwargs.get("gradient", kwargs.get("grad_tensors"))
        inputs = kwargs.get("inputs")
        if isinstance(inputs, torch.Tensor):
            inputs = [inputs]
        options = {k: kwargs[k] for k in ("retain_graph", "create_graph") if k in kwargs}
        self.coverage.backward += 1
        self.clock.saw_backward = self.clock.gradients_since = True
        self.clock.stepped_since_update = self.clock.update_since_backward = False
        self._record(Backward("backward", roots, [grad_tensors] if isinstance(grad_tensors, torch.Tensor)
                              else grad_tensors, list(inputs) if inputs is not None else None, self._frame(),
                              options, autocast=autocast_state()))
        self.in_backward += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self.in_backward -= 1
        self.grads_pending = list(inputs) if inputs is not None else []
        return out

    def _grad(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._end_update_group()
        outputs = args[0] if args else kwargs.get("outputs")
        inputs = args[1] if len(args) > 1 else kwargs.get("inputs")
        grad_outputs = args[2] if len(args) > 2 else kwargs.get("grad_outputs")
        as_list = (lambda v: [v] if isinstance(v, torch.Tensor) else list(v or []))
        options = {k: kwargs[k] for k in ("retain_graph", "create_graph", "allow_unused", "materialize_grads")
                   if k in kwargs}
        event = Backward("grad", as_list(outputs), as_list(grad_outputs) if grad_outputs is not None else None,
                         as_list(inputs), self._frame(), options, autocast=autocast_state())
        self.coverage.grad_calls += 1
        self.clock.saw_backward = self.clock.gradients_since = True
        self.clock.stepped_since_update = self.clock.update_since_backward = False
        self._record(event)
        self.in_backward += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self.in_backward -= 1
        event.out = out
        self.window.produced.update(id(t) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        if not options.get("create_graph"):
            # Gradients built to be differentiated again (a gradient penalty, a MAML inner step) are part of
            # the iteration whose backward or step uses them: they end nothing.
            self.clock.state_changed()
        return out

    # ------------------------------------------------------------------ manual updates
    def _manual_update(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], targets: list[torch.Tensor],
                       names: list[str]) -> Any:
        if not self.update_group:
            self.pending_update = names  # what the update is about to write, while the step is read
            try:
                self.listener.before_update("manual", None)  # may raise: nothing changed yet
            finally:
                self.pending_update = []
        frame = self._frame()
        out = func(*args, **kwargs)
        self.param_writes += 1
        update = Update(func, args, kwargs, targets, names, frame, self.clock.label())
        self.update_group.append(update)
        self.coverage.manual_updates += 1
        for t in targets:
            leaf = self.leaves.lookup(t)
            if leaf is not None:
                self.last_writer[id(leaf[0])] = ("manual", update.iteration, update)
                self.written_at[id(leaf[0])] = self.param_writes
        return out

    def _reads_only_data(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """No input is a parameter, a gradient the update read, or a value of the update's window."""
        window, lookup = self.window, self.leaves.lookup
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and (id(t) in window.produced or id(t) in window.grads
                                                or lookup(t) is not None):
                return False
        return True

    def _end_update_group(self) -> None:
        if not self.update_group:
            return
        group, self.update_group = self.update_group, []
        self.clock.state_changed(update=True)
        self.listener.after_update("manual", None, group)
        self.new_window()

    def finish(self) -> None:
        """End what is open (an update group; the last inference call's iteration) before the final read."""
        self._end_update_group()
        if self.window.passes:
            self.clock.inference_call()  # counts only in a run that never computed a gradient

    # ------------------------------------------------------------------ subjects for a transfer
    def take_subjects(self) -> list[Subject]:
        """The window's unchecked float outputs (one subject per tensor: its last writer)."""
        window = self.window
        seen: dict[int, Subject] = {}
        losses = {id(t) for e in window.events if isinstance(e, Backward) and e.kind == "backward" for t in e.roots}
        for i in range(window.checked_upto, len(window.events)):
            event = window.events[i]
            if isinstance(event, Pass):
                tensors, role = _float_outputs(event.outputs), "output"
            elif isinstance(event, Call):
                tensors, role = _float_outputs(event.out), "call"
                if event.inplace and event.args and isinstance(event.args[0], torch.Tensor) and not tensors:
                    tensors = _float_outputs(event.args[0])  # x[i] = v returns None: the target is the output
            elif isinstance(event, Backward) and event.kind == "grad":
                tensors, role = _float_outputs(event.out), "grad-result"
            else:
                continue
            for t in tensors:
                if role != "output" and t._is_view() and id(t) not in losses:
                    continue
                seen[id(t)] = Subject("loss" if id(t) in losses else role, t, event, order=i,  # type: ignore[arg-type]
                                      window=window.index)
        window.checked_upto = len(window.events)
        return list(seen.values())

    def pending_grads(self, optimizer: torch.optim.Optimizer | None = None) -> list[tuple[str, torch.Tensor]]:
        """(name, gradient) of the leaves a backward wrote (or of ``optimizer``'s parameters)."""
        if optimizer is not None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
        elif self.grads_pending:
            params = self.grads_pending
        else:
            params = [t for _, t in self.leaves.items()]
        out = []
        for p in params:
            g = p.grad if isinstance(p, torch.Tensor) else None
            if g is not None and not g.is_sparse and g.is_floating_point():
                out.append((self.leaves.name(p) or "", g))
        self.grads_pending = None
        return out


class _Own:
    __slots__ = ("capture", "popped")

    def __init__(self, capture: StepCapture) -> None:
        self.capture = capture
        self.popped = False

    def __enter__(self) -> None:
        capture = self.capture
        if not capture._mode_popped:
            capture._pop()
            self.popped = capture._mode_popped

    def __exit__(self, *exc: object) -> None:
        if self.popped:
            self.capture._push()


_INT_RANDOM = {torch.randint, torch.randperm, torch.randint_like, torch.multinomial,
               torch._C.TensorBase.multinomial, torch._C.TensorBase.random_}


def _int_only(args: tuple[Any, ...]) -> bool:
    """At least one tensor argument, and every tensor argument integer or bool (none can need grad)."""
    seen = False
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.is_floating_point() or a.is_complex():
                return False
            seen = True
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    if b.is_floating_point() or b.is_complex():
                        return False
                    seen = True
    return seen


def _float_dtype(kwargs: dict[str, Any]) -> bool:
    dtype = kwargs.get("dtype")
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


def _is_float(out: Any) -> bool:
    if isinstance(out, torch.Tensor):
        return out.is_floating_point()
    if isinstance(out, (list, tuple)):
        return any(_is_float(o) for o in out)
    return False


def _any_float(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.is_floating_point():
                return True
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor) and b.is_floating_point():
                    return True
    for a in kwargs.values():
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return True
    return False


def _needs_grad(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.requires_grad:
                return True
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor) and b.requires_grad:
                    return True
    for a in kwargs.values():
        if isinstance(a, torch.Tensor) and a.requires_grad:
            return True
    return False


def inplace_target(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What an in-place call writes: its first argument (nn.init functions reach the function mode
    with it as a keyword, ``tensor=``)."""
    return args[0] if args else kwargs.get("tensor", kwargs.get("input"))


def _leaf_target(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    target = inplace_target(args, kwargs)
    return isinstance(target, torch.Tensor) and target.is_leaf and target.requires_grad


def _clone_small(t: torch.Tensor) -> torch.Tensor | None:
    """A copy of an in-place target made outside the window, so a replay starts from its old value."""
    if t.numel() * t.element_size() > _MAX_CLONE_BYTES or t.requires_grad:
        return None
    return t.detach().clone()


def _host_nonfinite(func: Any, t: torch.Tensor, out: Any) -> bool:
    """Is the value the script just read non-finite? Checked on the host copy where there is one."""
    import math

    if isinstance(out, float):
        return not math.isfinite(out)
    if isinstance(out, list):
        flat = pytree.tree_leaves(out)
        if len(flat) <= 4096:
            return not all(math.isfinite(v) for v in flat if isinstance(v, float))
    if func is torch._C.TensorBase.numpy:
        import numpy

        return not bool(numpy.isfinite(out).all())
    if isinstance(out, (bool, str, list)) or out is None:
        return not bool(torch.isfinite(t).all())
    return False


def _functional_call(frame: Any) -> tuple[Any, dict[str, Any]] | None:
    """When a root is called by ``torch.func.functional_call``, the parameters and buffers it substituted."""
    if _FUNCTIONAL_CODE is None:
        return None
    for _ in range(8):
        if frame is None:
            return None
        if frame.f_code is _FUNCTIONAL_CODE:
            local = frame.f_locals
            options = {k: local[k] for k in ("tie_weights", "strict") if k in local}
            return local.get("parameters_and_buffers"), options
        frame = frame.f_back
    return None


try:  # torch.func.functional_call and the older stateless.functional_call both end here
    from torch.nn.utils.stateless import _functional_call as _stateless_functional_call

    _FUNCTIONAL_CODE = _stateless_functional_call.__code__
except (ImportError, AttributeError):  # pragma: no cover - very old torch
    _FUNCTIONAL_CODE = None
