"""What low precision costs a model, module by module and op by op, against float64.

The model runs three ways:

1. **reference**: a float64 copy; every module's inputs and outputs and every compute op's output
   are kept. Each op is also re-run on its inputs rounded to the target precision, which gives the
   op's *local error* in flight.
2. **low precision**: a copy in the target dtype (``mode="cast"``) or the float32 model under
   ``torch.autocast(dtype)`` (``mode="autocast"``). Modules are aligned with the reference by
   dotted path and call index; ops by (module call, op name, occurrence). Casts and views are not
   compute ops, so the casts autocast inserts do not break the alignment.
3. **per module**: each module call runs again in low precision on its reference inputs rounded to
   the target precision. This is the module's local error.

Formulas are in :mod:`floatscope._numerics.errors`. ``amplification = propagated error of the
module's output / propagated error of its floating inputs``; it is None when the inputs carry no
error (integer token ids, say).

A module is *flagged* when its local error exceeds the tolerance or its reference output comes
within 1 bit of the format's max.

Ranking (largest contribution first): the candidates are the ``max_candidates`` modules with the
largest local error, leaf modules first. Each is measured by the output error of a run where
**only that module** is in low precision and everything else is float64. The other modules follow,
by local error. When the output error is below a quarter of the tolerance, no candidate is
measured and the ranking is by local error alone.

Policy search: greedily keep the next-ranked module in float32 until the output error meets the
tolerance, each step verified by a real run; then drop any kept module whose removal still meets
it. The search is not limited to contiguous blocks, and it costs one forward pass per step.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from floatscope._errors import UsageError
from floatscope._events import op_base
from floatscope._instrument import ops
from floatscope._instrument.modules import ModuleTracker
from floatscope._instrument.tracer import storage_key as _key
from floatscope._numerics.errors import ErrorSummary, bits_correct, relative_error, summarize
from floatscope._numerics.formats import format_of
from floatscope._results import to_json_value

__all__ = ["analyze", "keep_in_fp32", "PrecisionResult", "ModuleError", "OpError", "Accumulation",
           "Recommendation", "DEFAULT_TOLERANCE"]

Mode = Literal["cast", "autocast"]

DEFAULT_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-5}

@dataclass(frozen=True)
class ModuleError:
    """Precision metrics of one module (all its calls together). See the module docstring."""

    name: str
    type: str
    calls: int
    propagated_error: float
    local_error: float
    amplification: float | None
    bits_correct: float
    max_ulp: float
    headroom_bits: float
    subnormal_fraction: float
    nonfinite: int
    params: int
    output_error_alone: float | None = None  # output error when only this module runs in low precision


@dataclass(frozen=True)
class OpError:
    """Precision metrics of one compute op call, aligned between the two runs."""

    module: str
    op: str
    index: int
    propagated_error: float
    local_error: float
    bits_correct: float
    max_ulp: float
    headroom_bits: float
    nonfinite: int
    amplification: float | None = None
    subnormal_fraction: float = 0.0


@dataclass(frozen=True)
class Accumulation:
    """Error at each time step of a sequence module, and its fitted growth.

    ``model`` is ``"linear"`` (error ~ a + growth_per_step * t) or ``"exponential"``
    (error ~ a * growth_per_step ** t), whichever has the smaller squared residual.
    """

    module: str
    error: list[float]
    growth_per_step: float
    model: Literal["linear", "exponential"]

    def describe(self) -> str:
        """The fitted growth in words: ``"x1.08 per step (exponential)"``, ``"+2.1e-05 per step
        (linear)"``, or ``"flat"`` when the fit changes the error by under 25% over the sequence."""
        steps = max(len(self.error) - 1, 1)
        finite = [e for e in self.error if math.isfinite(e)]
        if not math.isfinite(self.growth_per_step) or not finite:
            return "no fit (too few finite steps)"
        if self.model == "exponential":
            total = self.growth_per_step ** steps
            if 0.8 <= total <= 1.25:
                return "flat"
            return f"x{self.growth_per_step:.4g} per step (exponential)"
        mean = sum(finite) / len(finite)
        if mean > 0 and abs(self.growth_per_step) * steps < 0.25 * mean:
            return "flat"
        return f"{self.growth_per_step:+.3g} per step (linear)"


@dataclass(frozen=True)
class Recommendation:
    keep_fp32: list[str]
    tolerance: float
    output_error_after: float
    output_error_before: float
    tolerance_met: bool
    fp32_param_fraction: float
    evaluations: int
    snippet: str
    reason: str = ""                    # why this set (or none), in words, with the numbers
    kept_for_headroom: list[str] = field(default_factory=list)  # kept because they come near the format's max
    input_floor: float | None = None    # output error from rounding the inputs alone (float64 compute)
    alternative: dict[str, Any] | None = None  # a mode that meets the tolerance where no set does


@dataclass(frozen=True)
class PrecisionResult:
    """Everything :func:`analyze` measured. ``to_dict()`` gives the ``--json`` contract."""

    dtype: str
    mode: Mode
    output_error: float
    output_nonfinite: int
    modules: list[ModuleError]
    ops: list[OpError]
    ranking: list[str]
    recommendation: Recommendation | None
    accumulation: Accumulation | None
    accumulations: list[Accumulation] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    flagged: list[str] = field(default_factory=list)
    tolerance: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return to_json_value(asdict(self))

    def module(self, name: str) -> ModuleError:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)


# ============================================================================ recording
class _Calls:
    """Module calls (path, call index) -> inputs and outputs, recorded through the module tracker."""

    def __init__(self, model: torch.nn.Module, keep_inputs: bool) -> None:
        self.model = model
        self.keep_inputs = keep_inputs
        self.tracker = ModuleTracker(model, on_enter=self._pre, on_exit=self._post)
        self.inputs: dict[tuple[str, int], tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self.outputs: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.input_leaves: dict[tuple[str, int], list[torch.Tensor]] = {}

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        with self.tracker:
            yield

    def _pre(self, key: tuple[str, int], module: torch.nn.Module, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> None:
        # No copies: recorded tensors are the ones the forward made; both runs see the same in-place updates.
        self.input_leaves[key] = [t.detach() for t in _float_leaves((args, kwargs))]
        if self.keep_inputs:
            self.inputs[key] = pytree.tree_map(_detach, (args, kwargs))

    def _post(self, key: tuple[str, int], module: torch.nn.Module, args: Any, output: Any) -> None:
        if key[1] >= 0:
            self.outputs[key] = [t.detach() for t in _float_leaves(output)]

    def current(self) -> tuple[str, int]:
        return self.tracker.current()


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, torch.Tensor) else x


def _float_leaves(tree: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor) and t.is_floating_point()]


class _OpRecorder(TorchDispatchMode):
    """Records each compute op's float output under its alignment key; optionally its local error."""

    def __init__(self, calls: _Calls, *, local_dtype: torch.dtype | None = None, mode: Mode = "cast",
                 device_type: str = "cpu", weights: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.calls = calls
        # The model's parameters and buffers do not change during a forward: each is lowered once
        # for the local errors, not once per op that reads it (views included).
        self.weight_storages = ({t.untyped_storage().data_ptr() for t in (*weights.parameters(), *weights.buffers())}
                                if weights is not None else set())
        self.lowered: dict[tuple[Any, ...], torch.Tensor] = {}
        self.reads: dict[tuple[str, int, str, int], set[int]] = {}  # the storages each op's float inputs live in
        self.local_dtype = local_dtype
        self.mode = mode
        self.device_type = device_type
        self.seen: dict[tuple[str, int, str], int] = {}
        self.outputs: dict[tuple[str, int, str, int], torch.Tensor] = {}
        self.local: dict[tuple[str, int, str, int], float] = {}
        self.producer: dict[tuple[Any, ...], tuple[str, int, str, int]] = {}
        self.input_keys: dict[tuple[str, int, str, int], list[tuple[str, int, str, int]]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        base = op_base(str(func))
        if ops.is_(base, ops.NOT_COMPUTE):
            # Views and casts pass on the identity of what they read: amplification looks through them.
            src = next((t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)), None)
            made = self.producer.get(_key(src)) if src is not None else None
            if made is not None:
                for t in _float_leaves(out):
                    self.producer[_key(t)] = made
            return out
        leaves = _float_leaves(out)
        if not leaves:
            return out
        path, call = self.calls.current()
        stem = (path, call, str(func))
        n = self.seen.get(stem, 0)
        self.seen[stem] = n + 1
        key = (*stem, n)
        self.input_keys[key] = [k for k in (self.producer.get(_key(t)) for t in _float_leaves((args, kwargs)))
                                if k is not None]
        self.producer[_key(leaves[0])] = key
        self.outputs[key] = leaves[0].detach()
        if self.local_dtype is not None and not func._schema.is_mutable:
            self.local[key] = self._local_error(func, args, kwargs, leaves[0])
            self.reads[key] = {t.untyped_storage().data_ptr() for t in _float_leaves((args, kwargs))}
        return out

    def _local_error(self, func: Any, args: Any, kwargs: Any, ref: torch.Tensor) -> float:
        target = self.local_dtype if self.mode == "cast" else torch.float32

        def lower(x: Any) -> Any:
            if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
                return x
            if x.untyped_storage().data_ptr() not in self.weight_storages:
                return x.to(target)
            key = (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(), x.dtype)
            if key not in self.lowered:
                self.lowered[key] = x.to(target)
            return self.lowered[key]

        try:
            with (torch.autocast(self.device_type, dtype=self.local_dtype) if self.mode == "autocast"
                  else contextlib.nullcontext()):
                low = func(*pytree.tree_map(lower, args), **pytree.tree_map(lower, kwargs))
            low_leaves = _float_leaves(low)
            if not low_leaves or low_leaves[0].shape != ref.shape:
                return math.nan
            if self.local_dtype == torch.float32:
                return relative_error(low_leaves[0], ref)
            return _relative_error_float32(low_leaves[0], ref)
        except (RuntimeError, TypeError, NotImplementedError):  # op not implemented for this dtype/device
            return math.nan


def _relative_error_float32(low: torch.Tensor, ref: torch.Tensor) -> float:
    """:func:`relative_error` of a float16/bfloat16 result, computed in float32 (half the memory
    traffic of float64). Rounding the reference to float32 moves it by at most 2**-24 relative, which
    moves an error of at least 2**-14 by under 2**-10 (0.1%) of itself. Falls back to float64 when
    the float32 sums are not finite or the error is smaller than that."""
    r32 = ref.to(torch.float32)
    diff = float(torch.linalg.vector_norm(low.to(torch.float32) - r32))
    norm = float(torch.linalg.vector_norm(r32))
    if not (math.isfinite(diff) and math.isfinite(norm)) or norm == 0 or diff < 2.0 ** -14 * norm:
        return relative_error(low, ref)
    return diff / norm


# ============================================================================ low-precision execution
def _lower_inputs(inputs: tuple[Any, ...], dtype: torch.dtype) -> tuple[Any, ...]:
    return pytree.tree_map(lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x,
                           inputs)


class _ModulePolicy:
    """Hooks that run chosen modules in another precision than the rest of the model."""

    def __init__(self, modules: Sequence[torch.nn.Module], *, compute: torch.dtype, outer: torch.dtype | None,
                 autocast_dtype: torch.dtype | None, device_type: str, autocast: bool = True) -> None:
        self.handles: list[Any] = []
        self.contexts: list[Any] = []
        self.use_autocast = autocast
        self.compute, self.outer = compute, outer
        self.autocast_dtype, self.device_type = autocast_dtype, device_type
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            self.handles.append(m.register_forward_hook(self._post, always_call=True))

    def _pre(self, module: torch.nn.Module, args: Any, kwargs: Any) -> Any:
        if not self.use_autocast:
            ctx: Any = contextlib.nullcontext()
        elif self.autocast_dtype is not None:
            ctx = torch.autocast(self.device_type, dtype=self.autocast_dtype)
        else:
            ctx = torch.autocast(self.device_type, enabled=False)
        ctx.__enter__()
        self.contexts.append(ctx)
        return _lower_inputs(args, self.compute), pytree.tree_map(
            lambda x: x.to(self.compute) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, kwargs)

    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        if self.contexts:
            self.contexts.pop().__exit__(None, None, None)
        if self.outer is None:
            return None
        return pytree.tree_map(
            lambda x: x.to(self.outer) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, output)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class Float32Policy:
    """The float32 modules of :func:`keep_in_fp32`, applied until :meth:`remove` (or the ``with`` block ends)."""

    def __init__(self, names: Sequence[str], policies: Sequence[_ModulePolicy],
                 restore: Sequence[tuple[torch.nn.Module, torch.dtype]] = ()) -> None:
        self.names = list(names)
        self._policies = list(policies)
        self._restore = list(restore)

    @property
    def active(self) -> bool:
        return any(p.handles for p in self._policies)

    def remove(self) -> None:
        """Take the hooks off: the modules run in the surrounding precision again. Safe to call twice."""
        for policy in self._policies:
            policy.remove()
        for module, dtype in self._restore:
            module.to(dtype)
        self._restore = []

    def __enter__(self) -> "Float32Policy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"Float32Policy({self.names!r}, {state})"


def keep_in_fp32(model: torch.nn.Module, names: Sequence[str], *, outputs: torch.dtype | None = None
                 ) -> Float32Policy:
    """Run the named modules in float32, the rest of the model as it is (e.g. under autocast).

    Inside the named modules autocast is disabled and floating inputs are cast to float32; the
    parameters of those modules must be float32 (they are under autocast training). For a model
    cast to a low dtype (``model.half()``), pass ``outputs=torch.float16``: the named modules are
    converted to float32 (back on ``remove``), and every other module casts the float32 values it
    receives to ``outputs``. The policy holds until ``.remove()`` is called on the result, or for a ``with`` block.

    Example:
        >>> policy = keep_in_fp32(model, ["encoder.layers.3.attn"])  # doctest: +SKIP
        >>> with torch.autocast("cuda", dtype=torch.float16):  # doctest: +SKIP
        ...     loss = model(x)
        >>> policy.remove()  # doctest: +SKIP
        >>> with keep_in_fp32(model, ["head"]), torch.autocast("cuda", dtype=torch.float16):  # doctest: +SKIP
        ...     loss = model(x)
    """
    lookup = dict(model.named_modules())
    missing = [n for n in names if n not in lookup]
    if missing:
        raise UsageError(f"no module named {', '.join(repr(n) for n in missing)} in {type(model).__name__}; "
                         f"names are dotted paths as in model.named_modules()")
    device_type = next((p.device.type for p in model.parameters()), "cpu")
    modules = [lookup[n] for n in names]
    restore = []
    policies = [_ModulePolicy(modules, compute=torch.float32, outer=None, autocast_dtype=None, device_type=device_type)]
    if outputs is not None:
        for m in modules:
            dtype = next((p.dtype for p in m.parameters() if p.is_floating_point()), None)
            if dtype is not None and dtype != torch.float32:
                restore.append((m, dtype))
                m.to(torch.float32)
        inside = {id(sub) for m in modules for sub in m.modules()}
        others = [m for m in model.modules() if id(m) not in inside and m is not model]
        policies.append(_ModulePolicy(others, compute=outputs, outer=None, autocast_dtype=None,
                                      device_type=device_type, autocast=False))
    return Float32Policy(names, policies, restore)


class _Runner:
    """Builds and runs the model in the configurations the analysis needs."""

    def __init__(self, model: torch.nn.Module, inputs: tuple[Any, ...], dtype: torch.dtype, mode: Mode) -> None:
        self.model, self.inputs, self.dtype, self.mode = model, inputs, dtype, mode
        self.device_type = next((p.device.type for p in model.parameters()), "cpu")
        self.reference = copy.deepcopy(model).to(torch.float64).eval()
        self.ref_inputs = _lower_inputs(inputs, torch.float64)
        base = copy.deepcopy(model).eval()
        self.low = base.to(dtype) if mode == "cast" else base.to(torch.float32)
        self.low_inputs = _lower_inputs(inputs, dtype if mode == "cast" else torch.float32)
        self.evaluations = 0

    @contextlib.contextmanager
    def low_context(self) -> Iterator[None]:
        if self.mode == "autocast":
            with torch.autocast(self.device_type, dtype=self.dtype):
                yield
        else:
            yield

    def run_reference(self) -> Any:
        with torch.no_grad():
            return self.reference(*self.ref_inputs)

    def run_low(self, keep_fp32: Sequence[str] = ()) -> Any:
        """The low-precision model with ``keep_fp32`` modules in float32."""
        self.evaluations += 1
        lookup = dict(self.low.named_modules())
        kept = [lookup[n] for n in keep_fp32]
        policies = [_ModulePolicy(kept, compute=torch.float32, outer=None, autocast_dtype=None,
                                  device_type=self.device_type)]
        if self.mode == "cast" and kept:
            # Kept modules hand float32 on; every other module casts what it receives back to the target.
            inside = {id(m) for k in kept for m in k.modules()}
            others = [m for m in self.low.modules() if id(m) not in inside and m is not self.low]
            policies.append(_ModulePolicy(others, compute=self.dtype, outer=None, autocast_dtype=None,
                                          device_type=self.device_type, autocast=False))
            for module in kept:
                module.to(torch.float32)
        try:
            with torch.no_grad(), self.low_context():
                return self.low(*self.low_inputs)
        finally:
            for policy in policies:
                policy.remove()
            for module in kept if self.mode == "cast" else []:
                module.to(self.dtype)

    def run_only(self, name: str) -> Any:
        """The float64 model with only module ``name`` in low precision."""
        self.evaluations += 1
        module = dict(self.reference.named_modules())[name]
        # The float64 values themselves, put back afterwards: a round trip through the target dtype
        # would leave the reference's weights rounded for every later measurement.
        params = [(p, p.data) for p in module.parameters()]
        buffers = [(m, k, b) for m in module.modules() for k, b in m._buffers.items() if b is not None]
        if self.mode == "cast":
            module.to(self.dtype)
            policy = _ModulePolicy([module], compute=self.dtype, outer=torch.float64, autocast_dtype=None,
                                   device_type=self.device_type)
        else:
            module.to(torch.float32)
            policy = _ModulePolicy([module], compute=torch.float32, outer=torch.float64,
                                   autocast_dtype=self.dtype, device_type=self.device_type)
        try:
            with torch.no_grad():
                return self.reference(*self.ref_inputs)
        finally:
            policy.remove()
            for p, data in params:
                p.data = data
            for m, k, b in buffers:
                m._buffers[k] = b

    def output_error(self, out: Any, ref_out: Any) -> tuple[float, int]:
        low, ref = _flat(out), _flat(ref_out)
        nonfinite = int((~torch.isfinite(low)).sum()) if low.numel() else 0
        return relative_error(low, ref), nonfinite


def _flat(tree: Any) -> torch.Tensor:
    leaves = [t.detach().to(torch.float64).reshape(-1) for t in _float_leaves(tree)]
    if len(leaves) == 1:
        return leaves[0]
    return torch.cat(leaves) if leaves else torch.zeros(0, dtype=torch.float64)


class _Summaries:
    """:func:`summarize` once per pair of tensors: a Linear's output is its addmm's output, a
    container's is often its last child's, and an eval Dropout's is its input."""

    def __init__(self, fmt: Any) -> None:
        self.fmt = fmt
        self.seen: dict[tuple[Any, ...], ErrorSummary] = {}

    def __call__(self, low: list[torch.Tensor], ref: list[torch.Tensor]) -> ErrorSummary | None:
        if len(low) != len(ref) or not ref or any(a.shape != b.shape for a, b in zip(low, ref, strict=True)):
            return None
        identity = tuple((t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) for t in (*low, *ref))
        if identity not in self.seen:
            self.seen[identity] = summarize(_flat(low), _flat(ref), self.fmt)
        return self.seen[identity]


# ============================================================================ the analysis
def analyze(
    model: torch.nn.Module,
    inputs: tuple[Any, ...] | Any,
    *,
    dtype: torch.dtype | str = torch.float16,
    mode: Mode = "cast",
    tolerance: float | None = None,
    sequence_dim: int | None = None,
    sequence_modules: Sequence[str] = (),
    search: bool = True,
    max_candidates: int = 8,
) -> PrecisionResult:
    """Measure what running ``model`` in ``dtype`` costs, against a float64 reference.

    Args:
        model: The model (left untouched: the analysis works on copies, in eval mode).
        inputs: Positional inputs (a tuple, or one tensor).
        dtype: ``torch.float16``, ``torch.bfloat16`` or ``torch.float32`` (or their names).
        mode: ``"cast"`` runs the whole model and its floating inputs in ``dtype``;
            ``"autocast"`` runs the float32 model under ``torch.autocast(dtype=dtype)``.
        tolerance: Output relative error the policy search must meet. Default: 1e-2 for float16,
            5e-2 for bfloat16, 1e-5 for float32.
        sequence_dim: Treat the model output as a sequence along this dim and report its error
            per time step (recurrent modules are reported without it).
        sequence_modules: Also treat these modules' outputs as sequences along ``sequence_dim``
            (dotted names, as in ``model.named_modules()``).
        search: Run the ranking and policy search (extra forward passes).
        max_candidates: Modules measured individually for the ranking and tried by the search.

    Returns:
        A :class:`PrecisionResult`.

    Example:
        >>> result = analyze(torch.nn.Linear(8, 8), (torch.randn(4, 8),), dtype=torch.float16)
        >>> result.output_error < 1e-2
        True
    """
    dtype = _parse_dtype(dtype)
    if mode not in ("cast", "autocast"):
        raise UsageError(f"mode must be 'cast' or 'autocast', not {mode!r}")
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"analyze() expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inputs, tuple):
        inputs = (inputs,)
    fmt = format_of(dtype)
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else float(tolerance)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    runner = _Runner(model, inputs, dtype, mode)

    ref_calls = _Calls(runner.reference, keep_inputs=True)
    ref_ops = _OpRecorder(ref_calls, local_dtype=dtype, mode=mode, device_type=runner.device_type,
                          weights=runner.reference)
    with ref_calls.recording(), ref_ops, torch.no_grad():
        ref_out = runner.reference(*runner.ref_inputs)
    timings["reference"] = time.perf_counter() - start

    t = time.perf_counter()
    low_calls = _Calls(runner.low, keep_inputs=False)
    low_ops = _OpRecorder(low_calls)
    with low_calls.recording(), low_ops, torch.no_grad(), runner.low_context():
        low_out = runner.low(*runner.low_inputs)
    output_error, output_nonfinite = runner.output_error(low_out, ref_out)
    timings["low_precision"] = time.perf_counter() - t

    t = time.perf_counter()
    local = _module_local_errors(runner, ref_calls, low_calls, ref_ops)
    timings["local"] = time.perf_counter() - t

    t = time.perf_counter()
    summaries = _Summaries(fmt)
    ops = _op_metrics(ref_ops, low_ops, fmt, summaries)
    modules = _module_metrics(runner, ref_calls, low_calls, local, fmt, summaries)
    timings["metrics"] = time.perf_counter() - t

    t = time.perf_counter()
    # Measuring candidates one by one matters only when the error is near or above the tolerance.
    measure = search and not output_error <= tolerance / 4
    ranking, modules = _rank(runner, modules, ref_out, max_candidates, measure)
    timings["ranking"] = time.perf_counter() - t

    t = time.perf_counter()
    recommendation = None
    if search:
        recommendation = _search(runner, ranking, ref_out, tolerance, output_error, max_candidates, modules,
                                 _op_headroom(ops, fmt))
    timings["search"] = time.perf_counter() - t

    if sequence_modules and sequence_dim is None:
        raise UsageError("sequence_modules needs sequence_dim: the dim along which their outputs are sequences")
    known = {name for name, _ in model.named_modules()}
    unknown = [n for n in sequence_modules if n not in known]
    if unknown:
        raise UsageError(f"no module named {', '.join(map(repr, unknown))}; names are dotted paths as in "
                         f"model.named_modules()")
    accumulations = _accumulations(runner, ref_calls, low_calls, ref_out, low_out, sequence_dim, sequence_modules)
    timings["total"] = time.perf_counter() - start
    order = {name: i for i, name in enumerate(ranking)}
    op_headroom = _op_headroom(ops, fmt)
    flagged = sorted((m.name for m in modules if m.name and (
        (not math.isnan(m.local_error) and m.local_error > tolerance) or m.headroom_bits < 1.0
        or op_headroom.get(m.name, (math.inf, ""))[0] < 1.0)),
        key=lambda n: order.get(n, len(order)))
    return PrecisionResult(
        dtype=str(dtype).removeprefix("torch."), mode=mode, output_error=output_error,
        output_nonfinite=output_nonfinite, modules=modules, ops=ops, ranking=ranking,
        recommendation=recommendation, accumulation=accumulations[0] if accumulations else None,
        accumulations=accumulations, seconds=timings, flagged=flagged, tolerance=tolerance,
    )


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    names = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
    if isinstance(dtype, str):
        if dtype not in names:
            raise UsageError(f"unknown dtype {dtype!r}; use float16, bfloat16 or float32")
        return names[dtype]
    if dtype not in DEFAULT_TOLERANCE:
        raise UsageError(f"analyze() measures float16, bfloat16 or float32, not {dtype}")
    return dtype


def _module_local_errors(runner: _Runner, ref_calls: _Calls, low_calls: _Calls,
                         ref_ops: _OpRecorder) -> dict[tuple[str, int], float]:
    """Each module call re-run in low precision on its reference inputs rounded to the target.

    Two kinds of call are not re-run, because their local error is already measured:
    * a call whose inputs in the low-precision run were exactly its reference inputs rounded (the
      root, the first layer) computed that very thing: its output error there is its local error;
    * a leaf module (Linear, LayerNorm, GELU) that is one op on its inputs and weights, making its
      output: the op's local error is the module's.
    """
    lookup = dict(runner.low.named_modules())
    target = runner.dtype if runner.mode == "cast" else torch.float32
    ops_of: dict[tuple[str, int], list[tuple[str, int, str, int]]] = {}
    for op_key in ref_ops.outputs:
        ops_of.setdefault(op_key[:2], []).append(op_key)
    errors: dict[tuple[str, int], float] = {}
    for key, (args, kwargs) in ref_calls.inputs.items():
        path, _ = key
        module = lookup.get(path)
        ref_out = ref_calls.outputs.get(key)
        if module is None or not ref_out:
            continue
        single = _single_op_local(key, module, ref_calls, ref_ops, ops_of.get(key, []))
        if single is not None:
            errors[key] = single
            continue
        low_args = pytree.tree_map(
            lambda x: x.to(target) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, (args, kwargs))
        seen_in, seen_out = low_calls.input_leaves.get(key), low_calls.outputs.get(key)
        rounded_in = _float_leaves(low_args)
        if (seen_in is not None and seen_out is not None and len(seen_in) == len(rounded_in)
                and all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
                        for a, b in zip(seen_in, rounded_in, strict=True))):
            leaves = seen_out
        else:
            try:
                with torch.no_grad(), runner.low_context():
                    out = module(*low_args[0], **low_args[1])
            except (RuntimeError, TypeError, ValueError):
                continue
            leaves = _float_leaves(out)
        if len(leaves) == len(ref_out) and all(a.shape == b.shape for a, b in zip(leaves, ref_out, strict=False)):
            errors[key] = relative_error(_flat(leaves), _flat(ref_out))
    return errors


def _single_op_local(key: tuple[str, int], module: torch.nn.Module, ref_calls: _Calls, ref_ops: _OpRecorder,
                     op_keys: list[tuple[str, int, str, int]]) -> float | None:
    """The local error of a leaf module call that is a single op, or None."""
    if len(op_keys) != 1 or any(True for _ in module.children()):
        return None
    (op_key,), outputs = op_keys, ref_calls.outputs[key]
    error, made = ref_ops.local.get(op_key), ref_ops.outputs[op_key]
    if error is None or math.isnan(error) or len(outputs) != 1 or outputs[0].numel() != made.numel():
        return None
    if outputs[0].untyped_storage().data_ptr() != made.untyped_storage().data_ptr():
        return None
    allowed = ref_ops.weight_storages | {t.untyped_storage().data_ptr() for t in ref_calls.input_leaves.get(key, [])}
    return error if ref_ops.reads.get(op_key, {-1}) <= allowed else None


def _module_metrics(runner: _Runner, ref_calls: _Calls, low_calls: _Calls,
                    local: dict[tuple[str, int], float], fmt: Any, summaries: _Summaries) -> list[ModuleError]:
    lookup = dict(runner.reference.named_modules())
    by_path: dict[str, list[tuple[str, int]]] = {}
    for key in ref_calls.outputs:
        by_path.setdefault(key[0], []).append(key)
    results = []
    for path, keys in by_path.items():
        keys = [k for k in keys if k in low_calls.outputs]
        if not keys:
            continue
        summary = summaries([t for k in keys for t in low_calls.outputs[k]],
                            [t for k in keys for t in ref_calls.outputs[k]])
        if summary is None or not any(t.numel() for k in keys for t in ref_calls.outputs[k]):
            continue  # the shapes differ, or there is nothing to compare
        prop, max_ulp, nonfinite, absmax = summary.relative_error, summary.max_ulp, summary.nonfinite, summary.absmax
        ref_in = [t for k in keys for t in ref_calls.input_leaves.get(k, [])]
        low_in = [t for k in keys for t in low_calls.input_leaves.get(k, [])]
        inputs = summaries(low_in, ref_in)
        prop_in = inputs.relative_error if inputs is not None else None
        amplification = prop / prop_in if prop_in and math.isfinite(prop_in) and prop_in > 0 else None
        local_values = [local[k] for k in keys if k in local]
        local_error = max(local_values) if local_values else math.nan
        module = lookup.get(path)
        results.append(ModuleError(
            name=path, type=type(module).__name__ if module is not None else "?", calls=len(keys),
            propagated_error=prop, local_error=local_error, amplification=amplification,
            bits_correct=bits_correct(prop, fmt), max_ulp=max_ulp,
            headroom_bits=math.log2(fmt.max / absmax) if absmax > 0 else math.inf,
            subnormal_fraction=summary.subnormal_fraction, nonfinite=nonfinite,
            params=sum(p.numel() for p in module.parameters()) if module is not None else 0,
        ))
    return results


def _op_metrics(ref_ops: _OpRecorder, low_ops: _OpRecorder, fmt: Any, summaries: _Summaries) -> list[OpError]:
    """Per-op metrics. An op's input error is the largest propagated error among the ops that
    produced its floating inputs (looking through views and casts); parameters and model inputs
    are not ops, so an op fed only by them has no amplification (None)."""
    results = []
    propagated: dict[tuple[str, int, str, int], float] = {}
    for key, ref in ref_ops.outputs.items():
        low = low_ops.outputs.get(key)
        if low is None or low.shape != ref.shape:
            continue
        path, _call, op, index = key
        summary = summaries([low], [ref])
        if summary is None:
            continue
        prop, max_ulp, nonfinite, absmax = summary.relative_error, summary.max_ulp, summary.nonfinite, summary.absmax
        propagated[key] = prop
        inputs = [propagated[k] for k in ref_ops.input_keys.get(key, []) if k in propagated]
        error_in = max(inputs) if inputs else 0.0
        amplification = prop / error_in if error_in > 0 and math.isfinite(error_in) else None
        results.append(OpError(
            module=path, op=op, index=index, propagated_error=prop, local_error=ref_ops.local.get(key, math.nan),
            bits_correct=bits_correct(prop, fmt), max_ulp=max_ulp,
            headroom_bits=math.log2(fmt.max / absmax) if absmax > 0 else math.inf, nonfinite=nonfinite,
            amplification=amplification, subnormal_fraction=summary.subnormal_fraction,
        ))
    return results


def _op_headroom(ops: list[OpError], fmt: Any) -> dict[str, tuple[float, str]]:
    """The smallest headroom of any op inside each module (its own ops), with the op.

    Values beyond float32's range in the float64 reference are sentinels, not computations: a mask
    made with ``torch.finfo(dtype).min`` is float64's minimum there (and the target's in the model).
    """
    beyond_float32 = math.log2(fmt.max / torch.finfo(torch.float32).max)
    out: dict[str, tuple[float, str]] = {}
    for op in ops:
        if op.module and beyond_float32 < op.headroom_bits < out.get(op.module, (math.inf, ""))[0]:
            out[op.module] = (op.headroom_bits, op.op)
    return out


def _is_leaf(runner: _Runner, name: str) -> bool:
    module = dict(runner.reference.named_modules()).get(name)
    return module is not None and not any(True for _ in module.children())


def _rank(runner: _Runner, modules: list[ModuleError], ref_out: Any, max_candidates: int,
          measure: bool) -> tuple[list[str], list[ModuleError]]:
    """Modules by contribution to the output error; see the module docstring."""

    def score(m: ModuleError) -> float:
        v = m.local_error if math.isfinite(m.local_error) else (math.inf if m.nonfinite else 0.0)
        return v if not math.isnan(v) else 0.0

    named = [m for m in modules if m.name]
    by_local = sorted(named, key=lambda m: (score(m), _is_leaf(runner, m.name)), reverse=True)
    candidates = [m for m in by_local if score(m) > 0][:max_candidates] if measure else []
    alone: dict[str, float] = {}
    for m in candidates:
        try:
            out = runner.run_only(m.name)
        except (RuntimeError, TypeError, ValueError):
            continue
        alone[m.name], _ = runner.output_error(out, ref_out)
    measured = sorted(alone, key=lambda n: (alone[n], _is_leaf(runner, n)), reverse=True)
    rest = [m.name for m in by_local if m.name not in alone]
    updated = [m if m.name not in alone else _replace(m, output_error_alone=alone[m.name]) for m in modules]
    return measured + rest, updated


def _replace(m: ModuleError, **changes: Any) -> ModuleError:
    from dataclasses import replace

    return replace(m, **changes)


_IMPROVES = 0.95  # a module is kept in float32 only when it cuts the output error by at least 5%


def _search(runner: _Runner, ranking: list[str], ref_out: Any, tolerance: float, before: float,
            max_candidates: int, modules: list[ModuleError],
            op_headroom: dict[str, tuple[float, str]]) -> Recommendation:
    lookup = dict(runner.reference.named_modules())
    total = sum(p.numel() for p in runner.reference.parameters()) or 1
    evaluations_start = runner.evaluations
    fmt = format_of(runner.dtype)
    dname = str(runner.dtype).removeprefix("torch.")
    # Modules within a bit of the format's max overflow on a slightly larger input: float32 for them,
    # whatever this input's error says (leaf modules only, outermost first among what is left).
    # A module's own output, or an op inside it (the exp of a hand-written softmax), may come near the max.
    near = []
    for m in modules:
        if not m.name or not _is_leaf(runner, m.name):
            continue
        bits, what = m.headroom_bits, f"{m.name}'s output"
        op_bits, op = op_headroom.get(m.name, (math.inf, ""))
        if op_bits < bits:
            bits, what = op_bits, f"{m.name}'s {op}"
        if bits < 1.0:
            near.append((m.name, bits, what))
    near.sort(key=lambda n: n[1])
    risky = [name for name, _, _ in near] if runner.dtype != torch.float32 else []
    kept = list(risky)
    error = before if not kept else runner.output_error(runner.run_low(kept), ref_out)[0]
    for name in ranking[: max(max_candidates, 1) * 2]:
        if error <= tolerance:
            break
        if any(name.startswith(k + ".") or k.startswith(name + ".") for k in kept):
            continue  # an ancestor or descendant is already kept
        trial = kept + [name]
        err, _ = runner.output_error(runner.run_low(trial), ref_out)
        if err < error * _IMPROVES:
            kept, error = trial, err
    met = error <= tolerance
    for name in [k for k in kept if k not in risky]:  # prune what is not needed, or does not help
        trial = [k for k in kept if k != name]
        err, _ = runner.output_error(runner.run_low(trial), ref_out)
        if err <= tolerance if met else err * _IMPROVES <= error:
            kept, error = trial, err
    final, _ = runner.output_error(runner.run_low(kept), ref_out) if kept else (before, 0)
    headroom = "; ".join(
        (f"{what} reaches {fmt.max / 2 ** bits:.4g}, beyond {dname}'s max {fmt.max:.4g}: it overflows on this very "
         f"input" if bits < 0 else
         f"{what} comes within {bits:.2g} bits of {dname}'s max {fmt.max:.4g} on this input (it reaches "
         f"{fmt.max / 2 ** bits:.4g}), so a slightly larger input overflows it")
        for name, bits, what in near if name in risky)
    floor = alternative = None
    if final <= tolerance:
        if kept and set(kept) <= set(risky) and before <= tolerance:
            reason = (f"the output error is {final:.3g} (all of the model in {dname}: {before:.3g}), within the "
                      f"tolerance {tolerance:g}; {len(kept)} module(s) stay in float32 for headroom, not accuracy.")
        elif kept:
            reason = (f"keeping {len(kept)} module(s) in float32 brings the output error from {before:.3g} to "
                      f"{final:.3g}, within the tolerance {tolerance:g}.")
        else:
            reason = (f"the whole model in {dname} ({runner.mode}) has an output error of {before:.3g}, within "
                      f"the tolerance {tolerance:g}; no module or op comes within a bit of {dname}'s max.")
        if headroom:
            reason += f" Kept for headroom: {headroom}."
    else:
        floor = _input_floor(runner, ref_out)
        reason = (f"no set of float32 modules meets the tolerance {tolerance:g}: the best found gives "
                  f"{final:.3g} (from {before:.3g}).")
        if floor is not None and floor > tolerance * 0.5:
            u = fmt.eps / 2
            amplified = max((m for m in modules if m.name and m.amplification is not None
                             and math.isfinite(m.amplification)),
                            key=lambda m: m.amplification, default=None)
            where = (f"; the largest amplification is {amplified.amplification:.3g}x in {amplified.name}"
                     if amplified is not None else "")
            what = "the inputs and the weights" if runner.mode == "cast" else "the inputs"
            reason += (f" The floor is {what}: rounded to {dname} (unit roundoff {u:.3g}) and computed exactly "
                       f"in float64 they already give an output error of {floor:.3g}, {floor / u:.3g}x the "
                       f"roundoff{where}. Float32 modules cannot undo that rounding"
                       + (" (in cast mode they run on float32 copies of the rounded weights)." if runner.mode == "cast"
                          else "."))
            if runner.mode == "cast":
                err = _autocast_error(runner, ref_out)
                if err is not None:
                    alternative = {"mode": "autocast", "output_error": err, "meets": err <= tolerance}
                    reason += (f" Keeping the inputs and parameters in float32 and running {dname} only where "
                               f"autocast chooses (mode='autocast') gives {err:.3g}"
                               + (", which meets it." if err <= tolerance else ", which does not either."))
        elif floor is not None:
            what = "inputs and weights" if runner.mode == "cast" else "inputs"
            reason += (f" Rounding the {what} alone gives {floor:.3g}: the rest of the error is made inside the model, "
                       f"in more modules than the {max_candidates * 2} tried; raise max_candidates, or use a wider "
                       f"format.")
        if headroom:
            reason += f" Kept for headroom: {headroom}."
        if not kept or (final > before * _IMPROVES and not risky):
            kept, final = list(risky), (final if risky else before)
    snippet = _snippet(kept, runner, final, tolerance)
    params = {id(p): p.numel() for n in kept for p in lookup[n].parameters()}
    return Recommendation(keep_fp32=kept, tolerance=tolerance, output_error_after=final,
                          output_error_before=before, tolerance_met=final <= tolerance,
                          fp32_param_fraction=sum(params.values()) / total,
                          evaluations=runner.evaluations - evaluations_start, snippet=snippet, reason=reason,
                          kept_for_headroom=[k for k in risky if k in kept], input_floor=floor,
                          alternative=alternative)


def _input_floor(runner: _Runner, ref_out: Any) -> float | None:
    """Output error of the float64 model on what no float32 module can undo: the inputs rounded to the
    target dtype and, in cast mode, the weights too (kept modules get float32 copies of rounded weights)."""
    floats = [t for t in pytree.tree_leaves(runner.inputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not floats and runner.mode != "cast":
        return None
    model = runner.reference
    if runner.mode == "cast":
        model = copy.deepcopy(runner.reference).to(runner.dtype).to(torch.float64)
    rounded = _lower_inputs(_lower_inputs(runner.inputs, runner.dtype), torch.float64)
    with torch.no_grad():
        out = model(*rounded)
    runner.evaluations += 1
    return runner.output_error(out, ref_out)[0]


def _autocast_error(runner: _Runner, ref_out: Any) -> float | None:
    """Output error of the float32 model under autocast(dtype), float32 inputs: the alternative to cast mode."""
    model = copy.deepcopy(runner.reference).to(torch.float32)
    try:
        with torch.no_grad(), torch.autocast(runner.device_type, dtype=runner.dtype):
            out = model(*_lower_inputs(runner.inputs, torch.float32))
    except (RuntimeError, TypeError, ValueError):
        return None
    runner.evaluations += 1
    return runner.output_error(out, ref_out)[0]


def _snippet(kept: list[str], runner: _Runner, error: float, tolerance: float) -> str:
    dtype = str(runner.dtype).removeprefix("torch.")
    if not kept and error <= tolerance:
        return (f"# nothing needs float32 at tolerance {tolerance:g}: the whole model in {dtype} ({runner.mode}) "
                f"has output error {error:.3g}")
    if not kept:
        return f"# no float32 set helps (output error {error:.3g} > {tolerance:g}): see the reason above"
    if runner.mode == "cast":
        return (
            "import floatscope.precision\n"
            f"model = model.to(torch.{dtype})\n"
            f"policy = floatscope.precision.keep_in_fp32(model, {kept!r}, outputs=torch.{dtype})\n"
            f"output = model(*[x.to(torch.{dtype}) if x.is_floating_point() else x for x in inputs])\n"
            "policy.remove()  # when done"
        )
    return (
        "import floatscope.precision\n"
        f"policy = floatscope.precision.keep_in_fp32(model, {kept!r})\n"
        f"with torch.autocast({runner.device_type!r}, dtype=torch.{dtype}):\n"
        "    output = model(*inputs)\n"
        "policy.remove()  # when done"
    )


def _accumulations(runner: _Runner, ref_calls: _Calls, low_calls: _Calls, ref_out: Any, low_out: Any,
                   sequence_dim: int | None, sequence_modules: Sequence[str] = ()) -> list[Accumulation]:
    found = []
    lookup = dict(runner.reference.named_modules())
    counts: dict[str, int] = {}
    for path, _ in ref_calls.outputs:
        counts[path] = counts.get(path, 0) + 1
    if sequence_dim is not None:
        series = _series_along(_float_leaves(low_out), _float_leaves(ref_out), sequence_dim)
        if series:
            found.append(_fit("", series))
        for name in sequence_modules:
            key = (name, 0)
            if key in low_calls.outputs and key in ref_calls.outputs:
                series = _series_along(low_calls.outputs[key][:1], ref_calls.outputs[key][:1], sequence_dim)
                if series:
                    found.append(_fit(name, series))
    for path, module in lookup.items():
        if isinstance(module, torch.nn.RNNBase) and counts.get(path) == 1:
            dim = 1 if module.batch_first else 0
            key = (path, 0)
            if key in low_calls.outputs:
                series = _series_along(low_calls.outputs[key][:1], ref_calls.outputs[key][:1], dim)
                if series:
                    found.append(_fit(path, series))
        elif path and counts.get(path, 0) >= 8 and (isinstance(module, torch.nn.RNNCellBase) or
                                                    not any(True for _ in module.children())
                                                    or _is_cell_like(module)):
            keys = [(path, i) for i in range(counts[path])]
            if all(k in low_calls.outputs for k in keys):
                series = [relative_error(low_calls.outputs[k][0], ref_calls.outputs[k][0]) for k in keys]
                found.append(_fit(path, series))
    found.sort(key=lambda a: (isinstance(lookup.get(a.module), (torch.nn.RNNBase, torch.nn.RNNCellBase)),
                              len(a.error)), reverse=True)
    return found


def _is_cell_like(module: torch.nn.Module) -> bool:
    return "cell" in type(module).__name__.lower() or "rnn" in type(module).__name__.lower()


def _series_along(low: list[torch.Tensor], ref: list[torch.Tensor], dim: int) -> list[float]:
    if not low or not ref or low[0].shape != ref[0].shape or low[0].dim() <= dim:
        return []
    return [relative_error(a, b) for a, b in zip(low[0].unbind(dim), ref[0].unbind(dim), strict=False)]


def _fit(module: str, errors: list[float]) -> Accumulation:
    """Fit error(t) linearly and exponentially; keep the smaller squared residual."""
    n = len(errors)
    finite = [(t, e) for t, e in enumerate(errors) if math.isfinite(e)]
    if len(finite) < 2:
        return Accumulation(module, errors, math.nan, "linear")
    ts = torch.tensor([t for t, _ in finite], dtype=torch.float64)
    es = torch.tensor([e for _, e in finite], dtype=torch.float64)
    design = torch.stack([torch.ones_like(ts), ts], dim=1)
    lin = torch.linalg.lstsq(design, es.unsqueeze(1)).solution.squeeze(1)
    lin_rss = float(((design @ lin - es) ** 2).sum())
    best = Accumulation(module, errors, float(lin[1]), "linear")
    positive = es > 0
    if int(positive.sum()) >= 2:
        d = design[positive]
        ex = torch.linalg.lstsq(d, es[positive].log().unsqueeze(1)).solution.squeeze(1)
        exp_rss = float(((torch.exp(design @ ex) - es) ** 2).sum())
        if exp_rss < lin_rss:
            best = Accumulation(module, errors, float(math.exp(float(ex[1]))), "exponential")
    del n
    return best
