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
overflow. Infinities that code writes on purpose (``masked_fill(-inf)``, ``full(inf)``, values at
``finfo.max``) are never origins; a NaN they later cause (a fully masked softmax row) is.

Tracing runs Python per op and syncs per op: it is the slow, exact path, used by
:func:`floatscope.locate` and by the watch's replay of a failing step.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from floatscope._instrument.frames import UserFrame, frame_from
from floatscope._numerics.stats import operand_stats
from floatscope._results import OperandStats

__all__ = ["OpTracer", "OriginEvent", "ForwardTag"]

_TAG_KEY = "floatscope"
_EXTERNAL = -1  # lineage of non-finite values nobody computed: constants, masks, inputs
_MAX_EVENTS = 64
_MAX_TAG_WALK = 32

# Ops that only move or alias data: they cannot create a non-finite value.
# Ops that select or rearrange values: their outputs' producer is their input's producer.
_MOVES = {"index", "gather", "index_select", "take_along_dim", "masked_select", "cat", "stack", "narrow",
          "select_scatter", "slice_scatter", "flatten", "movedim", "take", "_unsafe_index"}

_NO_CHECK = {
    "detach", "alias", "view", "_unsafe_view", "t", "transpose", "permute", "expand", "reshape",
    "squeeze", "unsqueeze", "slice", "select", "as_strided", "split", "split_with_sizes", "unbind",
    "chunk", "clone", "contiguous", "copy_", "_reshape_alias", "lift_fresh", "empty_like",
    "empty", "new_empty", "empty_strided", "new_empty_strided", "set_", "_local_scalar_dense",
}


def _converting_copy(base: str, args: Any) -> bool:
    """``dst.copy_(src)`` into a narrower dtype can overflow, like a cast: check it."""
    return (base == "copy_" and len(args) >= 2 and isinstance(args[0], torch.Tensor)
            and isinstance(args[1], torch.Tensor) and args[0].dtype != args[1].dtype)


def op_base(op_name: str) -> str:
    """``"aten.sqrt.default"`` -> ``"sqrt"``; ``"aten.mul_.Tensor"`` -> ``"mul_"``."""
    parts = op_name.split(".")
    return parts[1] if len(parts) >= 2 else op_name


def _node_base(node_name: str) -> str:
    """``"NativeLayerNormBackward0"`` -> ``"native_layer_norm"``."""
    name = node_name.split("::")[-1]
    name = re.sub(r"Backward\d*$", "", name)
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _matches(node_base: str, aten_base: str) -> bool:
    a = aten_base.strip("_")
    return bool(node_base) and (a == node_base or a.startswith(node_base) or node_base.startswith(a))


def _key(t: torch.Tensor) -> tuple[Any, ...]:
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        ptr = id(t)
    return (t.device, ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


@dataclass
class ForwardTag:
    """The top-level torch call that created some autograd nodes (or ran some aten ops)."""

    function: str
    frame: UserFrame
    module: str | None
    aten_ops: list[str] = field(default_factory=list)

    def forward_op_for(self, node_name: str) -> str:
        base = _node_base(node_name)
        for op in self.aten_ops:
            if _matches(base, op_base(op)):
                return op
        return self.aten_ops[-1] if self.aten_ops else self.function


@dataclass
class OriginEvent:
    """One op that produced NaN or Inf from inputs without it."""

    index: int
    op: str                        # aten overload that ran; for backward, the aten op of the gradient
    phase: str
    kind: str                      # "nan" | "inf"
    module: str | None
    frame: UserFrame
    backward_node: str | None
    forward_tag: ForwardTag | None
    operands: list[OperandStats]
    output: OperandStats
    parent: int | None             # event whose non-finite values this op consumed
    external_inf_inputs: bool      # inputs held intentional infinities (masks)
    scalars: list[float]
    producers: list[str | None]    # the op that produced each operand, when traced
    function: str | None
    input_keys: list[tuple[Any, ...]] = field(default_factory=list)
    output_key: tuple[Any, ...] | None = None

    @property
    def forward_op(self) -> str:
        """For a backward event, the forward aten op whose gradient this is."""
        if self.backward_node and self.forward_tag is not None:
            return self.forward_tag.forward_op_for(self.backward_node)
        return self.op


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
        tag = ForwardTag(_func_name(func), frame, tr.current_module())
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
        if (base in _NO_CHECK and not _converting_copy(base, args)) or self.tracer.done:
            out = func(*args, **kwargs)
            self.tracer.propagate_views(base, args, out)
            return out
        return self.tracer.check(func, name, base, args, kwargs)


class OpTracer:
    """Context manager that traces every aten op and records origin events.

    Args:
        module_paths: ``{id(module): dotted path}`` used to name the module an op runs in.
        phase: Phase of ops that run outside backward ("forward" or "optimizer").

    Example:
        >>> with OpTracer() as tracer:
        ...     y = torch.log(torch.zeros(2))
        >>> tracer.events[0].op
        'aten.log.default'
    """

    def __init__(self, *, module_paths: dict[int, str] | None = None, phase: str = "forward") -> None:
        self.module_paths = module_paths or {}
        self.phase = phase
        self.events: list[OriginEvent] = []
        self.lineage: dict[tuple[Any, ...], int] = {}
        self.producer: dict[tuple[Any, ...], str] = {}
        self.module_stack: list[str] = []
        self.roots: list[torch.nn.Module] = []
        self.tag_events: dict[int, int] = {}
        self.boundary: set[Any] = set()
        self.fallback_frame: UserFrame | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.current_tag: ForwardTag | None = None
        self.frame_override: UserFrame | None = None
        self.done = False
        self._handles: list[Any] = []
        self._modes: list[Any] = []

    # ----------------------------------------------------------------- context management
    def __enter__(self) -> "OpTracer":
        pre = torch.nn.modules.module.register_module_forward_pre_hook(self._enter_module)
        post = torch.nn.modules.module.register_module_forward_hook(self._exit_module, always_call=True)
        self._handles = [pre, post]
        tagger, checker = _Tagger(self), _Checker(self)
        tagger.__enter__()
        try:
            checker.__enter__()
        except BaseException:
            tagger.__exit__(None, None, None)
            raise
        self._modes = [tagger, checker]
        return self

    def __exit__(self, *exc: object) -> None:
        tagger, checker = self._modes
        try:
            checker.__exit__(None, None, None)
        finally:
            tagger.__exit__(None, None, None)
            for h in self._handles:
                h.remove()
            self._handles, self._modes = [], []

    def _enter_module(self, module: torch.nn.Module, args: Any) -> None:
        if not self.module_stack and id(module) not in self.module_paths:
            self.add_root(module)
        self.module_stack.append(self.module_paths.get(id(module), type(module).__name__))

    def add_root(self, module: torch.nn.Module) -> None:
        """Name ``module``'s submodules and parameters by their dotted paths from it."""
        self.roots.append(module)
        for name, sub in module.named_modules(remove_duplicate=False):
            self.module_paths.setdefault(id(sub), name)

    def param_name(self, key: tuple[Any, ...]) -> str | None:
        """The dotted name of the parameter stored at ``key`` in a known root, if any."""
        for root in self.roots:
            for name, p in root.named_parameters(remove_duplicate=False):
                if _key(p.detach()) == key:
                    return name
        return None

    def _exit_module(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.module_stack:
            self.module_stack.pop()

    def frame_at(self, frame: Any) -> UserFrame:
        """The user frame for an op called from ``frame``, bounded by the replay driver."""
        return frame_from(frame, boundary=self.boundary, fallback=self.fallback_frame)

    def current_module(self) -> str | None:
        return self.module_stack[-1] if self.module_stack else None

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
            node_base = _node_base(node.name())
            if not any(_matches(node_base, b) for b in bases):
                continue
            metadata[_TAG_KEY] = tag
            stack.extend(fn for fn, _ in node.next_functions if fn is not None)

    # ----------------------------------------------------------------- checks
    def propagate_views(self, base: str, args: Any, out: Any) -> None:
        """Views and copies carry their source's lineage and producer without a numeric check."""
        src = next((t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)), None)
        if src is None:
            return
        src_key = _key(src)
        lin = self.lineage.get(src_key)
        producer = self.producer.get(src_key)
        if lin is None and producer is None:
            return
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                if lin is not None:
                    self.lineage[_key(t)] = lin
                if producer is not None:
                    self.producer[_key(t)] = producer

    def check(self, func: Any, name: str, base: str, args: Any, kwargs: dict[str, Any]) -> Any:
        leaves = pytree.tree_leaves((args, kwargs))
        inputs = [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 0]
        scalars = [float(v) for v in leaves if isinstance(v, float)]
        in_flags = _nonfinite_flags(inputs)
        mutates = func._schema.is_mutable
        before = [t.clone() for t in inputs] if mutates and inputs else inputs
        producers = [self.producer.get(_key(t)) for t in inputs]
        tag = self.current_tag
        if tag is not None:
            tag.aten_ops.append(name)
        out = func(*args, **kwargs)
        outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if mutates:
            outputs += [t for t in inputs if not any(t is o for o in outputs)]
        out_flags = _nonfinite_flags(outputs)
        produced = producers[0] if base in _MOVES and producers and producers[0] else name
        for t in outputs:
            self.producer[_key(t)] = produced
        if not any(n or i for n, i in out_flags):
            for t in outputs:
                self.lineage.pop(_key(t), None)
            return out
        in_nan = any(n for n, _ in in_flags)
        in_inf = any(i for _, i in in_flags)
        out_nan = any(n for n, _ in out_flags)
        out_inf = any(i for _, i in out_flags)
        parents = [self.lineage.get(_key(t), _EXTERNAL) for t, (n, i) in zip(inputs, in_flags) if n or i]
        known = [p for p in parents if p != _EXTERNAL]
        parent = min(known) if known else (_EXTERNAL if parents else None)
        new_nan = out_nan and not in_nan
        new_inf = out_inf and not in_inf and not any(math.isinf(s) for s in scalars) and not _at_limit(before)
        if (new_nan or new_inf) and len(self.events) < _MAX_EVENTS:
            event = self._event(name, "nan" if new_nan else "inf", before, inputs, outputs, out_flags,
                                parent if parent != _EXTERNAL else None, parent == _EXTERNAL, scalars, producers)
            lineage = event.index
        else:
            lineage = parent if parent is not None else _EXTERNAL
        for t, (n, i) in zip(outputs, out_flags):
            if n or i:
                self.lineage[_key(t)] = lineage
            else:
                self.lineage.pop(_key(t), None)
        return out

    def _event(self, name: str, kind: str, inputs: list[torch.Tensor], originals: list[torch.Tensor],
               outputs: list[torch.Tensor],
               out_flags: list[tuple[bool, bool]], parent: int | None, external: bool,
               scalars: list[float], producers: list[str | None]) -> OriginEvent:
        node = torch._C._current_autograd_node()
        tag = self.current_tag
        backward_node = None
        forward_tag = None
        if node is not None:
            backward_node = node.name().split("::")[-1]
            forward_tag = node.metadata.get(_TAG_KEY) if hasattr(node, "metadata") else None
            # Ops inside a custom autograd.Function.backward are user code: blame that line.
            here = frame_from(sys._getframe(2), engine_boundary=True)
            if here.file != "<unknown>":
                frame, module, function = here, (forward_tag.module if forward_tag else None), None
            elif forward_tag is not None:
                frame, module, function = forward_tag.frame, forward_tag.module, forward_tag.function
            else:
                frame, module, function = here, None, None
            phase = "backward"
        else:
            phase = self.phase
            if tag is not None:
                frame, module, function = tag.frame, tag.module, tag.function
            else:
                frame = self.frame_override or self.frame_at(sys._getframe(2))
                module, function = self.current_module(), None
        if forward_tag is not None and parent is None and id(forward_tag) in self.tag_events:
            # The gradient of an op that already produced Inf/NaN in forward: the forward op is the origin.
            parent = self.tag_events[id(forward_tag)]
        if node is None and tag is not None:
            self.tag_events.setdefault(id(tag), len(self.events))
        bad = next((t for t, (n, i) in zip(outputs, out_flags) if n or i), outputs[0])
        return self._append(OriginEvent(
            index=len(self.events), op=name, phase=phase, kind=kind, module=module, frame=frame,
            backward_node=backward_node, forward_tag=forward_tag,
            operands=[operand_stats(t) for t in inputs], output=operand_stats(bad), parent=parent,
            external_inf_inputs=external, scalars=scalars,
            producers=producers, function=function,
            input_keys=[_key(t) for t in originals], output_key=_key(bad),
        ))

    def _append(self, event: OriginEvent) -> OriginEvent:
        self.events.append(event)
        return event

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
                lin = self.lineage.get(_key(t))
                if lin is not None and lin != _EXTERNAL:
                    candidates.append(self.events[lin])
        if not candidates:
            first = self.events[0]
            return self.root(first), first
        last = min(candidates, key=lambda e: self.root(e).index)
        return self.root(last), last


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


def _at_limit(tensors: list[torch.Tensor]) -> bool:
    """True when an input holds a value at its dtype's max magnitude: a ``finfo.min`` mask."""
    for t in tensors:
        limit = torch.finfo(t.dtype).max
        if bool((t.abs() >= limit).any()):
            return True
    return False
