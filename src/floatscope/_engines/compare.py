"""PyTorch against ONNX Runtime, module by module, in fp32 and in fp16 deployment.

The model is exported with PyTorch's ONNX exporter. Every ONNX node carries the module scope it
came from: the TorchScript exporter names nodes ``/block/fc1/Gemm``, and the dynamo exporter writes
a ``namespace`` metadata entry. A module's output is the output of the last node in its scope
subtree; that value is exposed as an extra graph output and compared with the PyTorch module's
output, captured by a forward hook. Modules with no node of their own whose output equals their
input (Dropout, Identity in eval) count as matched identities. This is the documented fallback for
modules the exporter folds away.

What the deployment format explains. A fixed tolerance cannot tell fp16 rounding from a bug: fp16
rounding alone fails ``atol 1e-3, rtol 1e-2`` on ordinary layers, and elementwise relative errors
blow up near zeros. So each module is judged against the error that the deployment format's
rounding explains. The reference ``r`` is the model in PyTorch float64. The emulation ``e`` is, for
an fp16 deployment, the model with its weights, inputs and every aten op's output rounded to
float16, each op computed in float32 (whose error is 2**13 times smaller) and then rounded: each op
correctly rounded up to rare double-rounding ties, errors propagated from module to module as in
the deployment. For an fp32 deployment it is the model in PyTorch float32. With ``y`` the ONNX Runtime
output, ``u = 2**-(p+1)`` the format's unit roundoff and ``slack`` (default 8):

* ``rel_error = ||y - r|| / ||r||`` (normwise), explained up to ``slack * max(||e - r|| / ||r||, u)``;
* ``ulp_error = max |y - r| / ulp(max |r|)`` (elementwise, in ULPs of the format at the tensor's
  largest magnitude), explained up to ``slack * max(max |e - r| / ulp(max |r|), 1)``;
* ``verdict``: ``nonfinite`` when ``y`` has Inf/NaN where ``r`` is finite; ``divergent`` when either
  error exceeds what is explained; otherwise ``agrees`` (also within the fixed tolerance) or
  ``explained`` (outside the fixed tolerance, inside what rounding explains).

``first_divergent`` is the first module, in execution order, whose verdict is ``divergent`` or
``nonfinite``. Non-finite outputs are traced to the first ONNX node that makes them from finite
inputs, with the value that did not fit and its headroom in bits to the format's largest value.

The fixed-tolerance metrics are kept against PyTorch fp32: ``max_abs = max |y - r32|``; ``max_rel
= max |y - r32| / |r32|`` over elements with ``|r32| > 1e-6 * max |r32|``; ``max_ulp`` in units of the
deployment format's last place at ``r32``; ``passed`` when every element satisfies ``|y - r32| <=
atol + rtol * |r32|``. The tolerance that would have passed is reported as Polygraphy does: ``atol =
max_abs`` (with rtol 0), ``rtol = max_rel`` (with atol 0), and the slack that would have explained
every module, ``required_slack``. Exposing intermediate outputs can stop ONNX Runtime from fusing
across them, so the final output is also compared with and without them, and with graph
optimizations off and fully on.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from floatscope._errors import FloatscopeError, UsageError
from floatscope._instrument.modules import ModuleTracker
from floatscope._numerics.budget import (
    explained_error,
    normwise_error,
    required_slack,
    round_tensor,
    scaled_ulp_error,
    unit_roundoff,
)
from floatscope._numerics.errors import ulp
from floatscope._numerics.formats import format_of, headroom_bits
from floatscope._results import to_json_value

__all__ = ["CompareResult", "ErrorBudget", "ModuleAgreement", "NonfiniteOrigin", "OutputAgreement",
           "compare_onnxruntime", "require_onnx"]

OptLevel = Literal["none", "basic", "all"]
Verdict = Literal["agrees", "explained", "divergent", "nonfinite"]
Emulation = Literal["rounded", "pytorch", "none"]
DEFAULT_TOLERANCE = {"float32": (1e-5, 1e-4), "float16": (1e-3, 1e-2)}
DEFAULT_SLACK = 8.0
_INSTALL = "pip install 'floatscope[onnx]'  (onnx, onnxruntime, onnxconverter-common, onnxscript)"


class MissingDependency(FloatscopeError, ImportError):
    """An optional dependency is missing; the message says what to install."""


def require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise MissingDependency(f"ONNX support is not installed ({exc.name} is missing): {_INSTALL}") from None
    return onnx, onnxruntime


@dataclass(frozen=True)
class ModuleAgreement:
    """One module: fixed-tolerance metrics against PyTorch fp32, budget metrics against float64.

    ``rel_error``/``ulp_error`` are ONNX Runtime's normwise and scaled elementwise errors against
    the float64 reference; ``explained_rel_error``/``explained_ulp_error`` are what the deployment
    format's rounding explains (see the module docstring). ``absmax`` is ``max |r|`` and
    ``headroom_bits = log2(format max / absmax)``: negative means the value does not fit.
    """

    name: str
    type: str
    max_abs: float
    max_rel: float
    max_ulp: float
    passed: bool
    onnx_value: str | None
    nonfinite: int = 0
    rel_error: float = 0.0
    explained_rel_error: float = 0.0
    ulp_error: float = 0.0
    explained_ulp_error: float = 0.0
    absmax: float = 0.0
    headroom_bits: float = math.inf
    verdict: Verdict = "agrees"


@dataclass(frozen=True)
class NonfiniteOrigin:
    """Where the deployment first made Inf/NaN from finite values.

    ``node``/``op`` are the first ONNX node (graph order) whose output is non-finite while its inputs
    are finite (None where no single node could be named: then the module is the first whose output
    is non-finite). ``absmax`` is that output's largest magnitude computed in float32
    (``absmax_source``: the float32 ONNX graph, or the module's PyTorch float64 output), and
    ``headroom_bits = log2(format max / absmax)``: negative when the value does not fit the format;
    non-negative means the overflow happened inside the op (an intermediate) or is a NaN such as 0/0.
    """

    module: str
    type: str
    node: str | None
    op: str | None
    inf: int
    nan: int
    absmax: float
    absmax_source: Literal["onnx-float32", "pytorch-float64"]
    headroom_bits: float
    format_max: float


@dataclass(frozen=True)
class OutputAgreement:
    """The final output. ``max_abs``/``max_rel``/``max_logit_change``/``top1_flip_rate`` are against
    PyTorch fp32 (rows with a non-finite logit count as flipped); ``rel_error`` is normwise against
    float64, with ``explained_rel_error`` what the format's rounding explains."""

    max_abs: float
    max_rel: float
    top1_flip_rate: float | None
    max_logit_change: float | None
    samples: int
    rel_error: float = 0.0
    explained_rel_error: float = 0.0
    nonfinite: int = 0
    top1_agreement: float | None = None
    flipped: int | None = None
    predictions: int | None = None


@dataclass(frozen=True)
class ErrorBudget:
    """How ``explained_*`` were computed: ``slack * max(emulated error, floor)``.

    ``reference``: float64 PyTorch, or float32 where the model cannot run in float64. ``emulation``:
    ``rounded`` (every op correctly rounded to the format), ``pytorch`` (the model in PyTorch
    float32, for fp32 deployments) or ``none`` (the emulation failed: the floors alone).
    ``floor_rel`` is the unit roundoff, ``floor_ulp`` one ULP.
    """

    reference: Literal["float64", "float32"]
    emulation: Emulation
    slack: float
    floor_rel: float
    floor_ulp: float


@dataclass(frozen=True)
class EmulationOverflow:
    """The first op of the correctly rounded emulation whose result does not fit the deployment format."""

    module: str                    # the innermost module around the op ("" = the model's own forward)
    type: str
    op: str                        # the aten op
    absmax: float                  # its largest value before rounding
    headroom_bits: float
    format_max: float


@dataclass(frozen=True)
class CompareResult:
    """What :func:`compare_onnxruntime` found; ``to_dict()`` gives the ``compare --json`` contract."""

    runtime: str
    dtype: str
    opt_level: str
    exporter: str
    matched_modules: int
    total_modules: int
    matched_leaf_fraction: float
    modules: list[ModuleAgreement]
    first_divergent: str | None
    required_tolerance: dict[str, float]
    tolerance: dict[str, float]
    output: OutputAgreement
    fusion_effect: float | None
    exposure_effect: float | None
    seconds: dict[str, float] = field(default_factory=dict)
    first_nonfinite: NonfiniteOrigin | None = None
    budget: ErrorBudget | None = None
    required_slack: float | None = 0.0  # None: a non-finite error, which no slack explains
    fusion_effect_rel: float | None = None
    exposure_effect_rel: float | None = None
    unexposed_output: OutputAgreement | None = None
    emulation_overflow: EmulationOverflow | None = None

    def to_dict(self) -> dict[str, Any]:
        return to_json_value(asdict(self))

    def findings(self) -> list[str]:
        """The findings in reading order, as sentences: non-finite values first, then divergence.

        Example:
            >>> compare_onnxruntime(torch.nn.Linear(4, 2), (torch.randn(3, 4),)).findings()  # doctest: +SKIP
            []
        """
        lines: list[str] = []
        explains = f"{self.dtype} rounding"
        origin = self.first_nonfinite
        if origin is not None:
            where = f"module {origin.module!r} ({origin.type})" if origin.module else f"the model's own forward ({origin.type})"
            op = f", ONNX node {origin.node} ({origin.op})" if origin.node else ""
            counts = ", ".join(f"{n} {kind}" for n, kind in ((origin.inf, "Inf"), (origin.nan, "NaN")) if n > 0)
            if origin.headroom_bits < 0:
                why = (f"its values reach {origin.absmax:.3g} ({origin.absmax_source}), beyond {self.dtype}'s largest "
                       f"value {origin.format_max:g} (headroom {origin.headroom_bits:.2f} bits)")
            elif math.isfinite(origin.headroom_bits):
                why = (f"its exact values stay within {origin.absmax:.3g} (headroom {origin.headroom_bits:.2f} bits), "
                       f"so an intermediate inside the op overflowed or it computed 0/0, inf-inf or inf*0")
            else:
                why = "its value is not finite even in float32: the computation itself overflows"
            lines.append(f"non-finite first: {where}{op} makes {counts or 'non-finite values'} from finite inputs in "
                         f"{self.dtype}: {why}. Everything downstream inherits it; rounding does not explain it. "
                         f"Fix: scale this stage down (or normalize before it), or keep it in float32 "
                         f"(onnxconverter-common's node_block_list/op_block_list).")
        emu = self.emulation_overflow
        if emu is not None:
            where = f"module {emu.module!r} ({emu.type})" if emu.module else f"the model ({emu.type})"
            lines.append(f"{self.dtype} overflow in a correct computation: in {where}, {emu.op} gives values up to "
                         f"{emu.absmax:.3g} even when every op is correctly rounded to {self.dtype}, beyond its largest "
                         f"value {emu.format_max:g} (headroom {emu.headroom_bits:.2f} bits). A {self.dtype} deployment "
                         f"overflows here wherever it computes in {self.dtype}"
                         + (" (ONNX Runtime's CPU provider computed this in float32 and hid it)" if origin is None
                            else "") + f"; modules after it are judged against one {self.dtype} rounding times the "
                         f"slack. Fix: rescale before this op (normalize, divide first), or keep it in float32.")
        if self.first_divergent is not None:
            m = next((m for m in self.modules if m.name == self.first_divergent), None)
            if m is not None and m.verdict == "divergent":
                normwise = "beyond" if m.rel_error > m.explained_rel_error else "within"
                elementwise = "beyond" if m.ulp_error > m.explained_ulp_error else "within"
                lines.append(f"first divergent module: {m.name} ({m.type}): normwise error {m.rel_error:.3g} against "
                             f"float64, {normwise} the {m.explained_rel_error:.3g} that {explains} explains; largest "
                             f"elementwise error {m.ulp_error:.3g} ULPs at its largest value {m.absmax:.3g}, "
                             f"{elementwise} the {m.explained_ulp_error:.3g} explained. Rounding does not explain this: "
                             f"check what the exporter made of this module (a custom symbolic, a traced "
                             f"data-dependent branch, a train-mode op) or the runtime's kernel for it; everything "
                             f"after it inherits the difference.")
            elif m is not None and (origin is None or origin.module != m.name):
                lines.append(f"first divergent module: {m.name} ({m.type}): {m.nonfinite} non-finite values.")
        plain = self.unexposed_output
        if plain is not None and ((plain.nonfinite > 0) != (self.output.nonfinite > 0) or (
                (plain.rel_error <= plain.explained_rel_error) != (self.output.rel_error <= self.output.explained_rel_error))):
            def state(o: OutputAgreement) -> str:
                top1 = "" if o.top1_agreement is None else f", top-1 agreement {o.top1_agreement:.1%}"
                return f"{o.nonfinite} non-finite values, normwise error {o.rel_error:.3g}{top1}"

            lines.append(f"exposure effect: as deployed (no intermediate outputs exposed) the output has {state(plain)}; "
                         f"with the module outputs exposed it has {state(self.output)}. An exposed "
                         f"value is stored in {self.dtype}, as the graph types it; between exposed values ONNX Runtime "
                         f"may compute in float32 where its provider has no {self.dtype} kernel (the CPU provider "
                         f"inserts float32 casts). A provider with {self.dtype} kernels would compute like the exposed graph.")
        return lines


# ------------------------------------------------------------------------------ export and mapping
def _export(model: torch.nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, str]:
    with warnings.catch_warnings():
        return _export_quietly(model, inputs)


def _export_quietly(model: torch.nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, str]:
    onnx, _ = require_onnx()
    # The exporter's own deprecation and tracer warnings concern floatscope's choice of exporter, not the
    # user's model: keep them out of the user's output.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    buffer = io.BytesIO()
    chatter = io.StringIO()  # the exporters print progress and graph dumps; the user asked for a comparison
    try:
        # PRESERVE keeps eval semantics without folding BatchNorm into Conv, so every module keeps its nodes.
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            torch.onnx.export(model, inputs, buffer, dynamo=False, opset_version=17, do_constant_folding=True,
                              training=torch.onnx.TrainingMode.PRESERVE)
        return onnx.load_from_string(buffer.getvalue()), "torchscript"
    except Exception as first:  # noqa: BLE001 - an op the TorchScript exporter lacks: try the dynamo exporter
        first = str(first).splitlines()[0] if str(first) else type(first).__name__
        try:
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                program = torch.onnx.export(model, inputs, dynamo=True, verbose=False)
        except ImportError as missing:
            raise MissingDependency(f"the TorchScript exporter failed ({first}) and the dynamo exporter needs "
                                    f"{missing.name or 'onnxscript'}: {_INSTALL}") from None
        except Exception as second:  # noqa: BLE001
            raise UsageError(f"the model could not be exported to ONNX: TorchScript exporter: {first}; dynamo "
                             f"exporter: {second}") from None
        return program.model_proto, "dynamo"


def _scope(node: Any) -> str | None:
    """The dotted module path a node came from."""
    for prop in node.metadata_props:
        if prop.key == "namespace":  # dynamo exporter: ": M/block: Block/block.fc1: Linear/linear: aten.linear"
            parts = [p.split(":")[0].strip() for p in prop.value.split("/")[1:]]
            modules = [p for p in parts[:-1] if p]
            return modules[-1] if modules else ""
    name = node.name
    if name.startswith("/"):
        # TorchScript scopes: "/block/fc1/Gemm", but children of containers may be qualified: "/mlp/mlp.2/Add".
        path = ""
        for part in name.strip("/").split("/")[:-1]:
            path = part if (not path or part.startswith(path + ".")) else f"{path}.{part}"
        return path
    return None


def _module_values(model: Any, module_names: list[str]) -> dict[str, str]:
    """Module path -> name of the ONNX value its scope produced last (graph order is topological)."""
    last: dict[str, str] = {}
    for node in model.graph.node:
        scope = _scope(node)
        if scope is None or not node.output:
            continue
        for name in module_names:
            if name and (scope == name or scope.startswith(name + ".")):
                last[name] = node.output[0]
    return last


def _expose(model: Any, values: list[str]) -> Any:
    onnx, _ = require_onnx()
    exposed = copy.deepcopy(model)
    existing = {o.name for o in exposed.graph.output}
    inferred = onnx.shape_inference.infer_shapes(exposed)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    for v in values:
        if v not in existing:
            exposed.graph.output.append(onnx.helper.make_tensor_value_info(
                v, types.get(v, onnx.TensorProto.FLOAT), None))
            existing.add(v)
    return exposed


def _to_fp16(model: Any) -> Any:
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise MissingDependency(f"fp16 deployment needs onnxconverter-common: {_INSTALL}") from None
    onnx, _ = require_onnx()
    # The converter clamps weights to [1e-7, 1e4] by default; use float16's real limits instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # per-value "truncated" notes; the comparison shows the effect
        converted = float16.convert_float_to_float16(model, min_positive_val=2.0**-24, max_finite_val=65504.0,
                                                     keep_io_types=True)
    # The converter types every float value as float16 but leaves the model's own Cast(to=FLOAT) nodes
    # alone; make them cast to float16 too. Its boundary casts (to a graph output, from a graph input) stay.
    outputs = {v.name for v in converted.graph.output}
    inputs = {v.name for v in converted.graph.input}
    for node in converted.graph.node:
        if node.op_type == "Cast" and not (set(node.output) & outputs or set(node.input) & inputs):
            for attr in node.attribute:
                if attr.name == "to" and attr.i == onnx.TensorProto.FLOAT:
                    attr.i = onnx.TensorProto.FLOAT16
    # Graph inputs/outputs stay float32 (keep_io_types); drop value_info that says otherwise.
    boundary = {v.name for v in converted.graph.output} | {v.name for v in converted.graph.input}
    kept = [vi for vi in converted.graph.value_info if vi.name not in boundary]
    del converted.graph.value_info[:]
    converted.graph.value_info.extend(kept)
    return converted


def _session(model: Any, opt_level: OptLevel) -> Any:
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _feed(session: Any, inputs: tuple[Any, ...]) -> dict[str, Any]:
    tensors = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=False)}


# ------------------------------------------------------------------------------ metrics
def _agreement(y: torch.Tensor, r: torch.Tensor, dtype: str, atol: float, rtol: float) -> tuple[float, float, float, bool, int]:
    y64, r64 = y.to(torch.float64), r.to(torch.float64)
    nonfinite = int((~torch.isfinite(y64)).sum())
    if nonfinite:
        return math.inf, math.inf, math.inf, False, nonfinite
    diff = (y64 - r64).abs()
    if diff.numel() == 0:
        return 0.0, 0.0, 0.0, True, 0
    max_abs = float(diff.max())
    scale = float(r64.abs().max())
    mask = r64.abs() > 1e-6 * scale
    max_rel = float((diff[mask] / r64.abs()[mask]).max()) if bool(mask.any()) else (0.0 if max_abs == 0 else math.inf)
    max_ulp = float((diff / ulp(r64, format_of(getattr(torch, dtype)))).max())
    passed = bool((diff <= atol + rtol * r64.abs()).all())
    return max_abs, max_rel, max_ulp, passed, 0


@dataclass(frozen=True)
class _Judgement:
    rel: float
    explained_rel: float
    ulps: float
    explained_ulps: float
    emulated_rel: float
    emulated_ulps: float
    new_nonfinite: int  # non-finite in the deployment where the reference is finite
    absmax: float


def _judge(y: torch.Tensor, r: torch.Tensor, e: torch.Tensor | None, dtype: str, slack: float) -> _Judgement:
    """Budget metrics of ``y`` against the reference ``r``, explained by the emulation ``e``."""
    fmt = format_of(getattr(torch, dtype))
    y64, r64 = y.detach().to(torch.float64).reshape(-1), r.detach().to(torch.float64).reshape(-1)
    e64 = e.detach().to(torch.float64).reshape(-1) if e is not None else r64
    # Elements where the reference itself is not finite say nothing about rounding: leave them out.
    finite = torch.isfinite(r64)
    new_nonfinite = int((~torch.isfinite(y64) & finite).sum())
    if not bool(finite.all()):
        y64, r64, e64 = y64[finite], r64[finite], e64[finite]
    absmax = float(r64.abs().max()) if r64.numel() else 0.0
    rel, ulps = normwise_error(y64, r64), scaled_ulp_error(y64, r64, fmt)
    emu_rel, emu_ulps = normwise_error(e64, r64), scaled_ulp_error(e64, r64, fmt)
    u = unit_roundoff(fmt)
    return _Judgement(rel, explained_error(emu_rel, u, slack=slack), ulps, explained_error(emu_ulps, 1.0, slack=slack),
                      emu_rel, emu_ulps, new_nonfinite, absmax)


# ------------------------------------------------------------------------------ PyTorch runs
@dataclass
class _Capture:
    order: list[str] = field(default_factory=list)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    identity: set[str] = field(default_factory=set)
    result: Any = None
    overflow: tuple[str, float, int] | None = None  # emulation: (op, value before rounding, modules captured before)


def _capture(model: torch.nn.Module, inputs: tuple[Any, ...],
             forward: Callable[[], Any] | None = None, seen: _Capture | None = None) -> _Capture:
    """Run ``forward`` (default ``model(*inputs)``) and keep each module's first float output (first call)."""
    seen = seen if seen is not None else _Capture()

    def hook(key: tuple[str, int], module: torch.nn.Module, args: Any, out: Any) -> None:
        name = key[0]
        leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not name or not leaves or name in seen.outputs:
            return
        seen.outputs[name] = leaves[0].detach().clone()
        seen.order.append(name)
        ins = [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
        if ins and ins[0].shape == leaves[0].shape and torch.equal(ins[0], leaves[0]):
            seen.identity.add(name)

    with ModuleTracker(model, on_exit=hook), torch.no_grad():
        seen.result = forward() if forward is not None else model(*inputs)
    return seen


# Ops that return their input's values unchanged (or no float): rounding them again costs time, changes nothing.
_VALUE_PRESERVING = frozenset({torch.ops.aten.clone, torch.ops.aten.detach, torch.ops.aten.alias,
                               torch.ops.aten.equal, torch.ops.aten.lift_fresh, torch.ops.aten.contiguous})


class _RoundEveryOp(TorchDispatchMode):
    """Rounds every floating aten op output wider than ``dtype`` to ``dtype``: each op correctly rounded."""

    def __init__(self, dtype: torch.dtype, seen: "_Capture | None" = None) -> None:
        super().__init__()
        self.dtype = dtype
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.overloadpacket in _VALUE_PRESERVING:
            return out  # a view or copy of a rounded tensor is already rounded; keep the aliasing
        if self.seen is not None and self.seen.overflow is None:
            self._check_overflow(func, args, kwargs, out)
        if func._schema.is_mutable:
            # In-place ops return the tensor they wrote: round it where it is, so aliases see it.
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    t.copy_(round_tensor(t, self.dtype))
            return out
        return pytree.tree_map_only(torch.Tensor, lambda t: round_tensor(t, self.dtype), out)


    def _check_overflow(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        """The first op whose correctly rounded result is not finite while its inputs were."""
        info = torch.finfo(self.dtype)
        limit = info.max * (1 + info.eps / 4)  # halfway to the next power: beyond it, rounding gives Inf
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not outs:
            return
        peak = max(float(t.detach().abs().max()) if t.numel() else 0.0 for t in outs)
        if not peak > limit:  # above the format's max once rounded (or NaN)
            return
        ins = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if all(bool(torch.isfinite(t).all()) for t in ins):
            assert self.seen is not None
            self.seen.overflow = (str(func), peak, len(self.seen.order))


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""


def _cast_inputs(inputs: tuple[Any, ...], convert: Callable[[torch.Tensor], torch.Tensor]) -> tuple[Any, ...]:
    return pytree.tree_map_only(torch.Tensor, lambda t: convert(t) if t.is_floating_point() else t, inputs)


def _references(model: torch.nn.Module, inputs: tuple[Any, ...], dtype: str,
                fp32: _Capture) -> tuple[_Capture, _Capture, Literal["float64", "float32"], Emulation]:
    """The float64 reference and the emulation of the deployment format (see the module docstring).

    The model's own tensors are never changed: parameters and buffers are replaced for the call
    (``torch.func.functional_call``). A model that cannot run in float64 falls back to the fp32
    PyTorch run as its reference (and says so in ``budget.reference``).
    """
    state = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
    target = getattr(torch, dtype)

    def run(compute: torch.dtype, rounded: bool) -> _Capture:
        tensors = {n: (round_tensor(t.detach().to(compute), target) if rounded else t.detach().to(compute))
                   if t.is_floating_point() else t for n, t in state.items()}
        x = _cast_inputs(inputs, lambda t: round_tensor(t.to(compute), target) if rounded else t.to(compute))

        seen = _Capture()

        def forward() -> Any:
            if not rounded:
                return torch.func.functional_call(model, tensors, x)
            with _RoundEveryOp(target, seen):
                return torch.func.functional_call(model, tensors, x)

        return _capture(model, x, forward, seen)

    try:
        reference, kind = run(torch.float64, rounded=False), "float64"
    except Exception as exc:  # noqa: BLE001 - some models only run in float32 (custom kernels, dtype checks)
        warnings.warn(f"the model did not run in float64 ({type(exc).__name__}: {_first_line(exc)}); "
                      "floatscope compare uses PyTorch float32 as the reference instead, which cannot see float32's own "
                      "rounding. Make the model's forward dtype-generic to get a float64 reference.", stacklevel=3)
        reference, kind = fp32, "float32"
    if dtype == "float32":
        return reference, fp32, kind, "pytorch"
    # The emulation computes in float32 and rounds every result to float16: float32's own error is 2**13 times
    # smaller than float16's, and converting float32 to float16 is several times cheaper than from float64.
    try:
        return reference, run(torch.float32, rounded=True), kind, "rounded"
    except Exception as exc:  # noqa: BLE001 - an op that refuses the rounding mode: explain by one rounding only
        warnings.warn(f"the {dtype} emulation of the model failed ({type(exc).__name__}: {_first_line(exc)}); every "
                      f"module is judged against one {dtype} rounding (times the slack) instead, which is stricter "
                      f"than what {dtype} explains after many layers.", stacklevel=3)
        return reference, _Capture(), kind, "none"


# ------------------------------------------------------------------------------ the comparison
def compare_onnxruntime(model: torch.nn.Module, inputs: tuple[Any, ...] | Any, *, dtype: str = "float32",
                        opt_level: OptLevel = "basic", atol: float | None = None, rtol: float | None = None,
                        perturb: int = 0, noise: float = 0.01, seed: int = 0,
                        slack: float = DEFAULT_SLACK) -> CompareResult:
    """Compare ``model`` in PyTorch with ONNX Runtime (fp32 or fp16), module by module.

    Each module's ONNX Runtime output is judged against a PyTorch float64 reference, by what the
    deployment format's rounding explains (``verdict``, ``first_divergent``); the fixed tolerance is
    checked against PyTorch fp32 (``passed``). See the module docstring for the formulas.

    Args:
        model: The model (exported in eval mode; the model itself is left as it was).
        inputs: Positional example inputs (a tuple, or one tensor).
        dtype: ``"float32"``, or ``"float16"`` to deploy a float16 conversion with fp32 inputs/outputs.
        opt_level: ONNX Runtime graph optimizations: ``"none"``, ``"basic"`` or ``"all"``.
        atol, rtol: Fixed tolerance for ``passed`` (defaults: 1e-5/1e-4 for fp32, 1e-3/1e-2 for fp16).
        perturb: Also measure prediction robustness on this many noisy copies of the inputs.
        noise: Relative standard deviation of that noise.
        slack: How many times the emulated rounding error a module may show and still be explained.

    Example:
        >>> result = compare_onnxruntime(torch.nn.Linear(4, 2), (torch.randn(3, 4),))  # doctest: +SKIP
        >>> result.first_divergent is None, result.modules[0].verdict  # doctest: +SKIP
        (True, 'agrees')
    """
    if dtype not in DEFAULT_TOLERANCE:
        raise UsageError(f"dtype must be float32 or float16, not {dtype!r}")
    if opt_level not in ("none", "basic", "all"):
        raise UsageError(f"opt_level must be none, basic or all, not {opt_level!r}")
    if not (isinstance(slack, (int, float)) and math.isfinite(slack) and slack >= 1):
        raise UsageError(f"slack must be a finite number >= 1 (how many times the emulated rounding error is "
                         f"explained), not {slack!r}")
    require_onnx()
    if not isinstance(inputs, tuple):
        inputs = (inputs,)
    default_atol, default_rtol = DEFAULT_TOLERANCE[dtype]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    fmt = format_of(getattr(torch, dtype))
    timings: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        onnx_model, exporter = _export(model, inputs)
        timings["export"] = time.perf_counter() - start
        start = time.perf_counter()
        fp32 = _capture(model, inputs)
        timings["pytorch_forward"] = time.perf_counter() - start
        start = time.perf_counter()
        reference, emulation, reference_kind, emulation_kind = _references(model, inputs, dtype, fp32)
        timings["reference_and_emulation"] = time.perf_counter() - start
    finally:
        model.train(was_training)
    order, outputs, identity = fp32.order, fp32.outputs, fp32.identity

    values = _module_values(onnx_model, order)
    final_names = [o.name for o in onnx_model.graph.output]
    start = time.perf_counter()
    deployed = _to_fp16(onnx_model) if dtype == "float16" else onnx_model
    # Intermediates are exposed in the type they have in the deployed graph (float16 inside an fp16 model).
    exposed = _expose(deployed, [values[n] for n in order if n in values])
    session = _session(exposed, opt_level)
    feed = _feed(session, inputs)
    results = session.run(None, feed)
    timings["onnxruntime"] = time.perf_counter() - start
    by_name = dict(zip([o.name for o in session.get_outputs()], results, strict=False))

    start = time.perf_counter()
    leaf_names = {n for n, m in model.named_modules() if n and not any(True for _ in m.children())}
    modules: list[ModuleAgreement] = []
    first = None
    slacks: list[float] = []
    types = {n: type(m).__name__ for n, m in model.named_modules()}
    # After the emulation overflowed, its values say nothing about rounding (h / sqrt(inf) = 0 looks like an error
    # of 1): those modules are judged against the floors alone, and the overflow is a finding of its own.
    overflow = emulation.overflow
    unreliable = set(emulation.order[overflow[2]:]) if overflow is not None else set()
    emulation_overflow = None
    if overflow is not None:
        at = emulation.order[overflow[2]] if overflow[2] < len(emulation.order) else ""
        emulation_overflow = EmulationOverflow(module=at, type=types.get(at, type(model).__name__) if at else
                                               type(model).__name__, op=overflow[0], absmax=overflow[1],
                                               headroom_bits=headroom_bits(overflow[1], fmt.dtype),
                                               format_max=float(torch.finfo(fmt.dtype).max))
    for name in order:
        ref32 = outputs[name]
        ref64 = reference.outputs.get(name)
        emu = emulation.outputs.get(name) if name not in unreliable else None
        if ref64 is None or ref64.shape != ref32.shape:
            ref64 = ref32
        if emu is not None and emu.shape != ref64.shape:
            emu = None
        value = values.get(name)
        if value is None or value not in by_name:
            if name in identity:
                judged = _judge(ref64, ref64, emu, dtype, slack)
                modules.append(ModuleAgreement(name, types[name], 0.0, 0.0, 0.0, True, None, 0, 0.0,
                                               judged.explained_rel, 0.0, judged.explained_ulps, judged.absmax,
                                               headroom_bits(judged.absmax, fmt.dtype), "agrees"))
            continue
        got = torch.from_numpy(by_name[value]).to(torch.float64)
        if tuple(got.shape) != tuple(ref32.shape):
            continue
        max_abs, max_rel, max_ulp, passed, nonfinite = _agreement(got, ref32, dtype, atol, rtol)
        judged = _judge(got, ref64, emu, dtype, slack)
        verdict: Verdict
        if judged.new_nonfinite:
            verdict = "nonfinite"
        elif judged.rel > judged.explained_rel or judged.ulps > judged.explained_ulps:
            verdict = "divergent"
        else:
            verdict = "agrees" if passed else "explained"
        slacks += [required_slack(judged.rel, judged.emulated_rel, unit_roundoff(fmt)),
                   required_slack(judged.ulps, judged.emulated_ulps, 1.0)]
        modules.append(ModuleAgreement(name, types[name], max_abs, max_rel, max_ulp, passed, value, nonfinite,
                                       judged.rel, judged.explained_rel, judged.ulps, judged.explained_ulps,
                                       judged.absmax, headroom_bits(judged.absmax, fmt.dtype), verdict))
        if verdict in ("divergent", "nonfinite") and first is None:
            first = name

    ref_out = [t for t in pytree.tree_leaves(fp32.result) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    ref64_out = _first_float(reference.result, ref_out[0])
    emu_out = _first_float(emulation.result, ref64_out)
    final = torch.from_numpy(by_name[final_names[0]]).to(torch.float64)
    output = _output_agreement(final, ref_out[0], ref64_out, emu_out, dtype, atol, rtol, slack,
                               _robustness(model, inputs, deployed, opt_level, ref_out[0], final, perturb, noise, seed))
    timings["comparison"] = time.perf_counter() - start  # with the perturbed runs, when asked for

    origin = None
    if output.nonfinite or any(m.verdict == "nonfinite" for m in modules):
        start = time.perf_counter()
        origin = _nonfinite_origin(model, deployed, onnx_model if dtype == "float16" else None, opt_level, feed,
                                   fmt.dtype, types, modules, reference.outputs)
        timings["nonfinite_origin"] = time.perf_counter() - start

    # Does exposing intermediates, or fusing, change the deployed output?
    start = time.perf_counter()
    plain = torch.from_numpy(_session(deployed, opt_level).run(None, feed)[0]).to(torch.float64)
    exposure, exposure_rel = _effect(final, plain)
    other = "all" if opt_level != "all" else "none"
    fused = torch.from_numpy(_session(deployed, other).run(None, feed)[0]).to(torch.float64)
    fusion, fusion_rel = _effect(fused, plain)
    unexposed = _output_agreement(plain, ref_out[0], ref64_out, emu_out, dtype, atol, rtol, slack,
                                  _robustness(model, inputs, deployed, opt_level, ref_out[0], plain, 0, noise, seed))
    timings["extra_sessions"] = time.perf_counter() - start

    matched_leaves = sum(1 for m in modules if m.name in leaf_names)
    required = {"atol": max([m.max_abs for m in modules] + [output.max_abs]),
                "rtol": max([m.max_rel for m in modules] + [output.max_rel])}
    return CompareResult(
        runtime="onnxruntime", dtype=dtype, opt_level=opt_level, exporter=exporter, matched_modules=len(modules),
        total_modules=len(order), matched_leaf_fraction=matched_leaves / max(1, len(leaf_names & set(order))),
        modules=modules, first_divergent=first, required_tolerance=required, tolerance={"atol": atol, "rtol": rtol},
        output=output,
        fusion_effect=fusion, exposure_effect=exposure, seconds=timings, first_nonfinite=origin,
        budget=ErrorBudget(reference_kind, emulation_kind, float(slack), unit_roundoff(fmt), 1.0),
        required_slack=None if not all(math.isfinite(v) for v in slacks) else max(slacks, default=0.0),
        fusion_effect_rel=fusion_rel, exposure_effect_rel=exposure_rel, unexposed_output=unexposed,
        emulation_overflow=emulation_overflow,
    )


def _output_agreement(got: torch.Tensor, ref32: torch.Tensor, ref64: torch.Tensor, emulated: torch.Tensor, dtype: str,
                      atol: float, rtol: float, slack: float,
                      robustness: tuple[float | None, float | None, int, int | None, int | None]) -> OutputAgreement:
    max_abs, max_rel, _, _, nonfinite = _agreement(got, ref32, dtype, atol, rtol)
    judged = _judge(got, ref64, emulated, dtype, slack)
    flips, changes, samples, flipped, predictions = robustness
    return OutputAgreement(max_abs, max_rel, flips, changes, samples, judged.rel, judged.explained_rel, nonfinite,
                           None if flips is None else 1.0 - flips, flipped, predictions)


def _effect(changed: torch.Tensor, base: torch.Tensor) -> tuple[float, float]:
    """``(max |a - b|, ||a - b|| / ||b||)`` over the finite elements; ``inf`` where the non-finite ones differ."""
    finite = torch.isfinite(base)
    if not torch.equal(finite, torch.isfinite(changed)):
        return math.inf, math.inf
    if not torch.equal(changed[~finite].nan_to_num(), base[~finite].nan_to_num()):  # +inf, -inf and NaN must match
        return math.inf, math.inf
    a, b = changed[finite], base[finite]
    return (float((a - b).abs().max()) if a.numel() else 0.0), normwise_error(a, b)


def _first_float(tree: Any, default: torch.Tensor) -> torch.Tensor:
    leaves = [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return leaves[0] if leaves and leaves[0].shape == default.shape else default


def _nonfinite_origin(model: torch.nn.Module, deployed: Any, float32_graph: Any | None, opt_level: OptLevel,
                      feed: dict[str, Any], dtype: torch.dtype, types: dict[str, str], modules: list[ModuleAgreement],
                      reference: dict[str, torch.Tensor]) -> NonfiniteOrigin | None:
    """The first ONNX node that makes Inf/NaN from finite inputs, and the value that did not fit.

    Every node output is exposed for one extra run (only when something was non-finite).
    """
    import numpy as np

    format_max = format_of(dtype).max
    produced = [o for node in deployed.graph.node for o in node.output if o]
    try:
        session = _session(_expose(deployed, produced), opt_level)
        values = dict(feed)
        values.update(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=False))
    except Exception:  # noqa: BLE001 - a graph that cannot expose every value: fall back to modules
        values = None

    def finite(v: Any) -> bool:
        return not (isinstance(v, np.ndarray) and v.dtype.kind == "f") or bool(np.isfinite(v).all())

    found = None
    for node in deployed.graph.node if values is not None else []:
        bad = [v for v in (values.get(o) for o in node.output) if v is not None and not finite(v)]
        if bad and all(finite(values[i]) for i in node.input if i in values):
            found = node, bad[0]
            break
    if found is None:  # name the first module whose output is non-finite
        m = next((m for m in modules if m.verdict == "nonfinite"), None)
        if m is None:
            return None
        absmax = float(reference[m.name].abs().max()) if m.name in reference else math.inf
        return NonfiniteOrigin(m.name, m.type, None, None, -1, -1, absmax, "pytorch-float64",
                               headroom_bits(absmax, dtype), format_max)
    node, value = found
    scope = _scope(node) or ""
    while scope and scope not in types:  # a scope the exporter qualified differently: its nearest module
        scope = scope.rpartition(".")[0]
    absmax, source = math.inf, "pytorch-float64"
    if float32_graph is not None and node.output[0] in {o for n in float32_graph.graph.node for o in n.output}:
        with contextlib.suppress(Exception):
            s = _session(_expose(float32_graph, [node.output[0]]), opt_level)
            got = dict(zip([o.name for o in s.get_outputs()], s.run(None, feed), strict=False))[node.output[0]]
            absmax, source = float(np.abs(got.astype(np.float64)).max()), "onnx-float32"
    if not math.isfinite(absmax) and scope in reference:
        absmax, source = float(reference[scope].abs().max()), "pytorch-float64"
    return NonfiniteOrigin(scope, types.get(scope, type(model).__name__), node.name, node.op_type,
                           int(np.isinf(value).sum()), int(np.isnan(value).sum()), absmax, source,
                           headroom_bits(absmax, dtype), format_max)


def _robustness(model: torch.nn.Module, inputs: tuple[Any, ...], deployed: Any, opt_level: OptLevel,
                ref: torch.Tensor, got: torch.Tensor, perturb: int, noise: float,
                seed: int) -> tuple[float | None, float | None, int, int | None, int | None]:
    """Top-1 flip rate, largest logit change, samples, flipped predictions and predictions.

    A prediction is a row of the last axis: one per sample for ``(B, classes)``, one per token for ``(B, T, V)``.

    A prediction whose logits hold a non-finite value counts as flipped: its argmax means nothing.
    """
    if ref.dim() < 2:
        return None, float((got - ref.double()).abs().max()), int(ref.shape[0]) if ref.dim() else 1, None, None
    refs, gots = [ref.double()], [got]
    if perturb > 0:
        session = _session(deployed, opt_level)
        g = torch.Generator().manual_seed(seed)
        was_training = model.training
        model.eval()
        try:
            for _ in range(perturb):
                noisy = tuple(x + noise * x.std() * torch.randn(x.shape, generator=g, dtype=x.dtype)
                              if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)
                with torch.no_grad():
                    r = model(*noisy)
                r = next(t for t in pytree.tree_leaves(r) if isinstance(t, torch.Tensor))
                refs.append(r.double())
                gots.append(torch.from_numpy(session.run(None, _feed(session, noisy))[0]).double())
        finally:
            model.train(was_training)
    ref_all, got_all = torch.cat(refs), torch.cat(gots)
    rows = ref_all.reshape(-1, ref_all.shape[-1]), got_all.reshape(-1, got_all.shape[-1])
    broken = ~torch.isfinite(rows[1]).all(-1)
    flipped = (rows[0].argmax(-1) != rows[1].argmax(-1)) | broken
    change = (ref_all - got_all).abs().nan_to_num(nan=math.inf)  # a NaN logit changed by more than any number
    return (float(flipped.double().mean()), float(change.max()), int(ref_all.shape[0]), int(flipped.sum()),
            int(flipped.numel()))
