"""Op-level tracing: find the aten op that *produced* the first non-finite value.

Two PyTorch modes work together while tracing:

* a ``TorchFunctionMode`` (above autograd) remembers, for each top-level torch call, the user's
  source line and module, and tags the autograd nodes the call created with that record, so a
  backward op can be blamed on the forward line whose gradient it computes;
* a ``TorchDispatchMode`` (below autograd) sees every aten op of forward, backward and optimizer
  code, checks inputs (before in-place ops run) and outputs, and records *origin events*: an op
  whose output has NaN while no input had NaN, or Inf while no input had Inf.

Each non-finite tensor carries a lineage: the event whose values it holds. When the failure is
found (the loss, a gradient, a parameter), the reported origin is the root of its lineage, so a
forward Inf that ``tanh`` absorbed and that resurfaces as NaN in backward is blamed on the forward
overflow. Non-finite values that code writes on purpose (``masked_fill(-inf)``, ``full(inf)``,
``full(nan)``, values at ``finfo.max``) are never origins; a NaN they later cause (a fully masked
softmax row) is. Operands that held non-finite values nobody traced (a model input, a constant) are
recorded as external, so the diagnosis can tell broken data from a broken op.

Tracing runs Python per op and syncs per op: it is the slow, exact path, used by
:func:`floatscope.locate` and by the watch's replay of a failing step.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Any, Callable, Iterator

import torch
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from floatscope._events import ForwardTag, OriginEvent, UserFrame, node_base, node_matches, op_base
from floatscope._instrument import ops
from floatscope._instrument.frames import frame_from
from floatscope._instrument.hooks import HookSet
from floatscope._instrument.modules import ModuleTracker
from floatscope._numerics.stats import operand_stats

__all__ = ["OpTracer", "OriginEvent", "ForwardTag", "storage_key"]

_TAG_KEY = "floatscope"
# Lineage codes: >= 0 the origin event whose values a tensor holds; _EXTERNAL when unknown; below,
# even codes -2 - 2k name intended write k (a mask fill, a NaN literal) and odd codes -3 - 2j name
# source j, a non-finite tensor the trace did not make (a model input, a constant made earlier).
_EXTERNAL = -1


def _intended_code(k: int) -> int:
    return -2 - 2 * k


def _source_code(j: int) -> int:
    return -3 - 2 * j


def _is_intended(code: int) -> bool:
    return code <= -2 and code % 2 == 0
_MAX_EVENTS = 64
_MAX_TAG_WALK = 32
_NO_CHECK = ops.VIEW | ops.COPY | ops.ALLOC


# Ops that replace their target's values (so its old values are not inputs). ``copy_`` is always
# checked: into a narrower dtype it can overflow like a cast, and it carries its source's lineage.
_OVERWRITES = {"copy_", "fill_", "zero_"}


def storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Identity of a tensor's values: storage, offset, shape, strides and dtype."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        ptr = id(t)
    return (t.device, ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


class _Tagger(TorchFunctionMode):
    def __init__(self, tracer: "OpTracer") -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        tr = self.tracer
        if func in _UNTRACKED_FUNCS:
            return func(*args, **kwargs)
        frame = tr.frame_override or tr.frame_at(sys._getframe(1))
        tag = ForwardTag(_func_name(func), frame, tr.current_module(), model=tr.current_model())
        previous, tr.current_tag = tr.current_tag, tag
        try:
            out = func(*args, **kwargs)
        finally:
            tr.current_tag = previous
        if tag.aten_ops and torch.is_grad_enabled():
            tr.tag_nodes(out, tag)
        return out


def _func_name(func: Callable[..., Any]) -> str:
    module = getattr(func, "__module__", None) or ""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    if module.startswith("torch") and not module.startswith("torch._C"):
        return f"{module}.{name}"
    if "TensorBase" in name or module == "torch._C":
        return "Tensor." + name.split(".")[-1]
    return name


_UNTRACKED_FUNCS = {torch.Tensor.__repr__, torch.Tensor.__format__, torch.Tensor.__str__}


class _Checker(TorchDispatchMode):
    def __init__(self, tracer: "OpTracer") -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = str(func)
        base = op_base(name)
        if (ops.is_(base, _NO_CHECK) and base != "copy_") or self.tracer.done:
            out = func(*args, **kwargs)
            self.tracer.propagate_views(args, out)
            return out
        return self.tracer.check(func, name, base, args, kwargs)


class OpTracer:
    """Context manager that traces every aten op and records origin events.

    Args:
        module_paths: ``{id(module): dotted path}`` used to name the module an op runs in.
        phase: Phase of ops that run outside backward (``"forward"`` or ``"optimizer"``).
        boundary: Code objects of a replay driver: a frame walk that reaches one reports
            ``fallback_frame`` (the user's line that made the replayed call).
        fallback_frame: See ``boundary``.
        optimizer: The optimizer whose step is traced, for optimizer-phase diagnoses.

    Example:
        >>> with OpTracer() as tracer:
        ...     y = torch.log(torch.zeros(2))
        >>> tracer.events[0].op
        'aten.log.default'
    """

    def __init__(self, *, module_paths: dict[int, str] | None = None, phase: str = "forward",
                 boundary: "set[Any] | frozenset[Any]" = frozenset(), fallback_frame: UserFrame | None = None,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        self.modules = ModuleTracker()
        if module_paths:
            self.modules.paths.update(module_paths)
        self.phase = phase
        self.boundary = frozenset(boundary)
        self.fallback_frame = fallback_frame
        self.optimizer = optimizer
        self.events: list[OriginEvent] = []
        self.intended: list[OriginEvent] = []  # writes of NaN/Inf on purpose (masks, placeholders)
        self.sources: list[tuple[Any, ...]] = []  # non-finite tensors the trace did not make
        self.lineage: dict[tuple[Any, ...], int] = {}
        self.by_storage: dict[tuple[Any, ...], int] = {}  # (device, storage) -> lineage of its last non-finite write
        self.producer: dict[tuple[Any, ...], str] = {}
        self.zero_fed: dict[tuple[Any, ...], bool] = {}  # produced by an op that read an exact zero
        self.tag_events: dict[int, int] = {}
        self.current_tag: ForwardTag | None = None
        self.frame_override: UserFrame | None = None
        self.done = False
        self.root_labels: dict[int, str] = {}  # id(root model) -> how incidents name it
        self._hooks = HookSet()

    @property
    def roots(self) -> list[torch.nn.Module]:
        return self.modules.roots

    # ----------------------------------------------------------------- context management
    def __enter__(self) -> "OpTracer":
        try:
            self._hooks.enter(self.modules)
            self._hooks.enter(_Tagger(self))
            self._hooks.enter(_Checker(self))
        except BaseException:
            self._hooks.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.close()

    @contextlib.contextmanager
    def calling(self, *, frame: UserFrame | None = None, fallback: UserFrame | None = None,
                phase: str | None = None) -> Iterator[None]:
        """Attribute the ops run inside to ``frame`` (a replayed top-level call's line), or to
        ``fallback`` when a frame walk reaches the replay driver, in ``phase``."""
        saved = self.frame_override, self.fallback_frame, self.phase
        if frame is not None:
            self.frame_override = frame
        if fallback is not None:
            self.fallback_frame = fallback
        if phase is not None:
            self.phase = phase
        try:
            yield
        finally:
            self.frame_override, self.fallback_frame, self.phase = saved

    def add_root(self, module: torch.nn.Module) -> None:
        """Name ``module``'s submodules and parameters by their dotted paths from it."""
        self.modules.add_root(module)

    def param_name(self, key: tuple[Any, ...]) -> str | None:
        """The dotted name of the parameter stored at ``key`` in a known root, if any."""
        for root in self.modules.roots:
            for name, p in root.named_parameters(remove_duplicate=False):
                if storage_key(p.detach()) == key:
                    return name
        return None

    def frame_at(self, frame: Any) -> UserFrame:
        """The user frame for an op called from ``frame``, bounded by the replay driver."""
        return frame_from(frame, boundary=self.boundary, fallback=self.fallback_frame)

    def current_module(self) -> str | None:
        return self.modules.current_path()

    def current_model(self) -> str | None:
        outer = self.modules.outer
        return self.root_labels.get(id(outer)) if outer is not None else None

    # ----------------------------------------------------------------- autograd node tags
    def tag_nodes(self, out: Any, tag: ForwardTag) -> None:
        """Attach ``tag`` to the autograd nodes this call created (matched by op name)."""
        bases = {op_base(op) for op in tag.aten_ops}
        stack = [t.grad_fn for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        seen = 0
        while stack and seen < _MAX_TAG_WALK:
            node = stack.pop()
            seen += 1
            try:
                metadata = node.metadata
            except (RuntimeError, AttributeError):
                continue
            if _TAG_KEY in metadata:
                continue
            base = node_base(node.name())
            if not any(node_matches(base, b) for b in bases):
                continue
            metadata[_TAG_KEY] = tag
            stack.extend(fn for fn, _ in node.next_functions if fn is not None)

    # ----------------------------------------------------------------- checks
    def propagate_views(self, args: Any, out: Any) -> None:
        """Views and copies carry their source's lineage and producer without a numeric check."""
        src = next((t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)), None)
        if src is None:
            return
        src_key = storage_key(src)
        lin = self.lineage.get(src_key)
        producer = self.producer.get(src_key)
        zero_fed = self.zero_fed.get(src_key)
        if lin is None and producer is None:
            return
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                key = storage_key(t)
                if lin is not None:
                    self.lineage[key] = lin
                if producer is not None:
                    self.producer[key] = producer
                if zero_fed is not None:
                    self.zero_fed[key] = zero_fed

    def check(self, func: Any, name: str, base: str, args: Any, kwargs: dict[str, Any]) -> Any:
        leaves = pytree.tree_leaves((args, kwargs))
        inputs = [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 0]
        mutates = func._schema.is_mutable
        targets = inputs[:1] if mutates else []
        if base in _OVERWRITES and inputs and args and inputs[0] is args[0]:
            inputs = inputs[1:]  # copy_/fill_ replace the target's values: its old ones do not matter
        scalars = [float(v) for v in leaves if isinstance(v, float)]
        in_flags = _nonfinite_flags(inputs)
        # A one-element tensor nobody traced that holds NaN/Inf is a literal (x[i] = nan, torch.tensor(inf)).
        literal = [k for k, (t, (n, i)) in enumerate(zip(inputs, in_flags, strict=True)) if (n or i) and t.numel() == 1
                   and self._lineage_of(storage_key(t)) < 0 and not _is_intended(self._lineage_of(storage_key(t)))]
        if literal:
            scalars += [float(inputs[k].detach().reshape(())) for k in literal]
            inputs = [t for k, t in enumerate(inputs) if k not in literal]
            in_flags = [f for k, f in enumerate(in_flags) if k not in literal]
        before = [t.clone() for t in inputs] if mutates and inputs else inputs
        keys = [storage_key(t) for t in inputs]
        producers = [self.producer.get(k) for k in keys]
        producer_zero = [self.zero_fed.get(k, False) for k in keys]
        tag = self.current_tag
        if tag is not None:
            tag.aten_ops.append(name)
        out = func(*args, **kwargs)
        outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if mutates:
            outputs += [t for t in (*targets, *inputs) if not any(t is o for o in outputs)]
        if not outputs:
            return out
        out_flags = _nonfinite_flags(outputs)
        produced = producers[0] if ops.is_(base, ops.MOVE) and producers and producers[0] else name
        exact_zero = _zeros_are_exact(base, leaves, before, outputs[0]) if outputs and base.rstrip("_") in _EXACT \
            else False
        for t in outputs:
            key = storage_key(t)
            self.producer[key] = produced
            self.zero_fed[key] = exact_zero
        if not any(n or i for n, i in out_flags):
            for t in outputs:
                self.lineage.pop(storage_key(t), None)
            return out
        in_nan = any(n for n, _ in in_flags)
        in_inf = any(i for _, i in in_flags)
        out_nan = any(n for n, _ in out_flags)
        out_inf = any(i for _, i in out_flags)
        bad_inputs = [(k, self._lineage_of(k, register=True)) for k, (n, i) in zip(keys, in_flags, strict=True) if n or i]
        known = [p for _, p in bad_inputs if p >= 0]
        meant = [p for _, p in bad_inputs if _is_intended(p)]
        sources = [p for _, p in bad_inputs if p < 0 and not _is_intended(p)]
        parent = min(known) if known else (max(meant) if meant else (max(sources) if sources else None))
        # Values written on purpose: a NaN or Inf scalar argument (full(nan), masked_fill(-inf)), or
        # arithmetic on values already at the format's limit (finfo.min masks).
        intended_nan = any(math.isnan(s) for s in scalars)
        would_nan = out_nan and not in_nan
        would_inf = out_inf and not in_inf
        new_nan = would_nan and not intended_nan
        new_inf = would_inf and not any(math.isinf(s) for s in scalars) and not intended_nan and not _at_limit(before)
        outside = [self._source_key(p) for _, p in bad_inputs if p < 0]
        if (new_nan or new_inf) and len(self.events) < _MAX_EVENTS:
            event = self._event(name, "nan" if new_nan else "inf", before, inputs, outputs, out_flags,
                                parent if parent is not None and parent >= 0 else None, bool(outside) and not known,
                                scalars, producers)
            event.external_inputs = [k for k in outside if k is not None]
            event.producer_zero_inputs = producer_zero
            event.detail = _argument_detail(base, args)
            self.events.append(event)
            if event.backward_node is None and self.current_tag is not None:
                self.tag_events.setdefault(id(self.current_tag), event.index)
            lineage = event.index
        elif (would_nan or would_inf) and not known and len(self.intended) < _MAX_EVENTS:
            event = self._event(name, "nan" if would_nan else "inf", before, inputs, outputs, out_flags, None,
                                bool(outside), scalars, producers)
            event.index = len(self.intended)
            self.intended.append(event)
            lineage = _intended_code(event.index)
        else:
            lineage = parent if parent is not None else _EXTERNAL
        for t, (n, i) in zip(outputs, out_flags, strict=True):
            key = storage_key(t)
            if n or i:
                self.lineage[key] = lineage
                self.by_storage[key[:2]] = lineage
            else:
                self.lineage.pop(key, None)
        return out

    def _lineage_of(self, key: tuple[Any, ...], *, register: bool = False) -> int:
        """The lineage of a non-finite tensor: its own, or that of a write into its storage through a view.

        With ``register``, a tensor nobody traced becomes a source (so its consumers can be traced to it).
        """
        found = self.lineage.get(key)
        if found is None:
            found = self.by_storage.get(key[:2], _EXTERNAL)
        if found == _EXTERNAL and register:
            found = _source_code(len(self.sources))
            self.sources.append(key)
            self.lineage[key] = found
        return found

    def _source_key(self, code: int) -> tuple[Any, ...] | None:
        """The storage key of the tensor a negative lineage code comes from (an intended write's target)."""
        if _is_intended(code):
            return self.intended[(-code - 2) // 2].output_key
        if code <= -3:
            return self.sources[(-code - 3) // 2]
        return None

    def _event(self, name: str, kind: str, inputs: list[torch.Tensor], originals: list[torch.Tensor],
               outputs: list[torch.Tensor], out_flags: list[tuple[bool, bool]], parent: int | None,
               external: bool, scalars: list[float], producers: list[str | None]) -> OriginEvent:
        node = torch._C._current_autograd_node()
        tag = self.current_tag
        custom = False
        backward_node = None
        forward_tag = None
        if node is not None:
            backward_node = node.name().split("::")[-1]
            forward_tag = node.metadata.get(_TAG_KEY) if hasattr(node, "metadata") else None
            # Ops inside a custom autograd.Function.backward are user code: blame that line.
            here = frame_from(sys._getframe(2), engine_boundary=True)
            custom = here.file != "<unknown>"
            if custom and forward_tag is None:
                # A custom Function's node carries no tag: the module that made its inputs called it.
                forward_tag = _input_tag(node)
                tag_of_inputs = forward_tag
                forward_tag = None
            else:
                tag_of_inputs = forward_tag
            model = tag_of_inputs.model if tag_of_inputs else None
            if custom:
                frame, module, function = here, (tag_of_inputs.module if tag_of_inputs else None), None
            elif forward_tag is not None:
                frame, module, function = forward_tag.frame, forward_tag.module, forward_tag.function
            else:
                frame, module, function = here, None, None
            phase = "backward"
        else:
            phase = self.phase
            if tag is not None:
                frame, module, function, model = tag.frame, tag.module, tag.function, tag.model
            else:
                frame = self.frame_override or self.frame_at(sys._getframe(2))
                module, function, model = self.current_module(), None, self.current_model()
        if forward_tag is not None and parent is None and id(forward_tag) in self.tag_events:
            # The gradient of an op that already produced Inf/NaN in forward: the forward op is the origin.
            parent = self.tag_events[id(forward_tag)]
        bad = next((t for t, (n, i) in zip(outputs, out_flags, strict=True) if n or i), outputs[0])
        return OriginEvent(
            index=len(self.events), op=name, phase=phase, kind=kind, module=module,  # type: ignore[arg-type]
            frame=frame, backward_node=backward_node, forward_tag=forward_tag,
            operands=[operand_stats(t) for t in inputs], output=operand_stats(bad), parent=parent,
            external_inf_inputs=external, scalars=scalars, producers=producers, function=function,
            input_keys=[storage_key(t) for t in originals], output_key=storage_key(bad), model=model,
            custom_backward=node is not None and custom,
        )

    # ----------------------------------------------------------------- results
    def root(self, event: OriginEvent) -> OriginEvent:
        while event.parent is not None and 0 <= event.parent < len(self.events):
            event = self.events[event.parent]
        return event

    def origin_for(self, sinks: list[torch.Tensor] | None = None) -> tuple[OriginEvent, OriginEvent] | None:
        """The origin event for the non-finite values in ``sinks`` and the event that reached them.

        Returns ``(root, last)``: ``root`` is the earliest event of the lineage (what to blame),
        ``last`` the event whose values the sink holds (e.g. the backward NaN a forward Inf caused).
        With no sink lineage known, the first event recorded is returned.
        """
        if not self.events:
            return None
        candidates = []
        for t in sinks or []:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                lin = self.lineage.get(storage_key(t))
                if lin is not None and lin >= 0:
                    candidates.append(self.events[lin])
        if not candidates:
            first = self.events[0]
            return self.root(first), first
        last = min(candidates, key=lambda e: self.root(e).index)
        return self.root(last), last

    def explain(self, sink: torch.Tensor) -> tuple[str, OriginEvent | None, OriginEvent | None]:
        """Where a sink's non-finite values come from.

        Returns one of ``("origin", root, last)`` (an op made them), ``("intended", event, None)``
        (written on purpose, e.g. a mask fill, and carried here), ``("external", None, None)``
        (they were already in a tensor the trace did not make) or ``("finite", None, None)``.
        """
        if not isinstance(sink, torch.Tensor):
            return "finite", None, None
        key = storage_key(sink)
        lin = self.lineage.get(key)
        if lin is None:
            if bool(torch.isfinite(sink).all()):
                return "finite", None, None
            lin = self.by_storage.get(key[:2], _EXTERNAL)
        if lin >= 0:
            return "origin", self.root(self.events[lin]), self.events[lin]
        if _is_intended(lin):
            return "intended", self.intended[(-lin - 2) // 2], None
        return "external", None, None


def _nonfinite_flags(tensors: list[torch.Tensor]) -> list[tuple[bool, bool]]:
    """(has_nan, has_inf) for each tensor, with a single host sync."""
    if not tensors:
        return []
    checks = []
    for t in tensors:
        checks.append(torch.isnan(t).any())
        checks.append(torch.isinf(t).any())
    values = torch.stack([c.to(tensors[0].device) for c in checks]).tolist()
    return [(bool(values[2 * k]), bool(values[2 * k + 1])) for k in range(len(tensors))]


# Products whose zeros may be exact (a factor was 0) rather than underflowed, and casts whose zeros
# may be exact (an integer count of 0) rather than values below the narrower format's range.
_PRODUCTS = {"mul", "div", "prod", "cumprod"}
_CASTS = {"_to_copy", "to", "_to_dtype", "copy"}
_EXACT = _PRODUCTS | _CASTS


def _zeros_are_exact(base: str, leaves: list[Any], inputs: list[torch.Tensor], out: torch.Tensor) -> bool:
    """True when every exact zero of a product's output comes from a zero factor, not from underflow.

    ``x * 0`` and ``0 / y`` are exact zeros (a later ``log`` of them is a log of zero); a product of
    non-zero factors that rounds to 0 is an underflow.
    """
    stem = base.rstrip("_")
    if stem in {"mul", "div"} and any(isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0
                                      for v in leaves[1:2]):
        return stem == "mul"
    zero_out = out == 0
    if not bool(zero_out.any()):
        return False
    if stem in _CASTS:
        if not inputs:
            return True  # from an integer or bool tensor: its zeros are exact
        try:
            return not bool((zero_out & ~(inputs[-1] == 0)).any())
        except RuntimeError:
            return False
    if stem == "mul" and inputs:
        try:
            explained = torch.zeros_like(zero_out)
            for t in inputs:
                explained = explained | (t == 0)
            return not bool((zero_out & ~explained).any())
        except RuntimeError:  # shapes that do not broadcast elementwise
            return False
    if stem == "div" and inputs:
        try:
            return not bool((zero_out & ~(inputs[0] == 0)).any())
        except RuntimeError:
            return False
    return bool(inputs) and bool((inputs[0] == 0).any())


def _at_limit(tensors: list[torch.Tensor]) -> bool:
    """True when an input holds a value at its dtype's max magnitude: a ``finfo.min`` mask."""
    for t in tensors:
        limit = torch.finfo(t.dtype).max
        if bool((t.abs() >= limit).any()):
            return True
    return False


def _argument_detail(base: str, args: Any) -> str | None:
    """What an op's integer arguments explain that float operands cannot (an empty mean over targets)."""
    if base.startswith("nll_loss") and len(args) >= 5 and isinstance(args[1], torch.Tensor):
        target, reduction, ignore = args[1], args[3], args[4]
        if reduction == 1 and target.numel() and not torch.is_floating_point(target):
            ignored = int((target == ignore).sum())
            if ignored == target.numel():
                return (f"all {ignored} targets equal ignore_index={ignore}, so the mean is over zero targets: "
                        f"0/0")
    return None


def _input_tag(node: Any) -> ForwardTag | None:
    """The forward tag of the nearest tagged node that fed ``node`` (a custom Function's inputs)."""
    stack, seen = [fn for fn, _ in node.next_functions if fn is not None], 0
    while stack and seen < 16:
        fn = stack.pop(0)
        seen += 1
        try:
            tag = fn.metadata.get(_TAG_KEY)
        except (RuntimeError, AttributeError):
            tag = None
        if tag is not None:
            return tag
        stack.extend(f for f, _ in fn.next_functions if f is not None)
    return None
