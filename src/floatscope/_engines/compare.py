"""PyTorch against ONNX Runtime, module by module, in fp32 and in fp16 deployment.

The model is exported with PyTorch's ONNX exporter. Every ONNX node carries the module scope it
came from: the TorchScript exporter names nodes ``/block/fc1/Gemm``, and the dynamo exporter writes
a ``namespace`` metadata entry. A module's output is the output of the last node in its scope
subtree; that value is exposed as an extra graph output and compared with the PyTorch module's
output, captured by a forward hook. Modules with no node of their own whose output equals their
input (Dropout, Identity in eval) count as matched identities. This is the documented fallback for
modules the exporter folds away.

Per module: ``max_abs = max |y - r|``; ``max_rel = max |y - r| / |r|`` over elements with
``|r| > 1e-6 * max |r|``; ``max_ulp`` in units of the deployment format's last place at ``r``;
``passed`` when every element satisfies ``|y - r| <= atol + rtol * |r|``. The tolerance that would
have passed is reported as Polygraphy does: ``atol = max_abs`` (with rtol 0), ``rtol = max_rel`` (with
atol 0). Exposing intermediate outputs can stop ONNX Runtime from fusing across them, so the final
output is also compared with and without them, and with graph optimizations off and fully on.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree

from floatscope._errors import FloatscopeError, UsageError
from floatscope._instrument.modules import ModuleTracker
from floatscope._numerics.errors import ulp
from floatscope._numerics.formats import format_of
from floatscope._results import to_json_value

__all__ = ["CompareResult", "ModuleAgreement", "compare_onnxruntime", "require_onnx"]

OptLevel = Literal["none", "basic", "all"]
DEFAULT_TOLERANCE = {"float32": (1e-5, 1e-4), "float16": (1e-3, 1e-2)}
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
    name: str
    type: str
    max_abs: float
    max_rel: float
    max_ulp: float
    passed: bool
    onnx_value: str | None
    nonfinite: int = 0


@dataclass(frozen=True)
class OutputAgreement:
    max_abs: float
    max_rel: float
    top1_flip_rate: float | None
    max_logit_change: float | None
    samples: int


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

    def to_dict(self) -> dict[str, Any]:
        return to_json_value(asdict(self))


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


def compare_onnxruntime(model: torch.nn.Module, inputs: tuple[Any, ...] | Any, *, dtype: str = "float32",
                        opt_level: OptLevel = "basic", atol: float | None = None, rtol: float | None = None,
                        perturb: int = 0, noise: float = 0.01, seed: int = 0) -> CompareResult:
    """Compare ``model`` in PyTorch (fp32) with ONNX Runtime (fp32 or fp16), module by module.

    Args:
        model: The model (exported in eval mode; the model itself is left as it was).
        inputs: Positional example inputs (a tuple, or one tensor).
        dtype: ``"float32"``, or ``"float16"`` to deploy a float16 conversion with fp32 inputs/outputs.
        opt_level: ONNX Runtime graph optimizations: ``"none"``, ``"basic"`` or ``"all"``.
        atol, rtol: Agreement tolerance (defaults: 1e-5/1e-4 for fp32, 1e-3/1e-2 for fp16).
        perturb: Also measure prediction robustness on this many noisy copies of the inputs.
        noise: Relative standard deviation of that noise.

    Example:
        >>> result = compare_onnxruntime(torch.nn.Linear(4, 2), (torch.randn(3, 4),))  # doctest: +SKIP
        >>> result.first_divergent is None  # doctest: +SKIP
        True
    """
    if dtype not in DEFAULT_TOLERANCE:
        raise UsageError(f"dtype must be float32 or float16, not {dtype!r}")
    if opt_level not in ("none", "basic", "all"):
        raise UsageError(f"opt_level must be none, basic or all, not {opt_level!r}")
    require_onnx()
    if not isinstance(inputs, tuple):
        inputs = (inputs,)
    default_atol, default_rtol = DEFAULT_TOLERANCE[dtype]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    timings: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        onnx_model, exporter = _export(model, inputs)
        timings["export"] = time.perf_counter() - start

        order: list[str] = []
        outputs: dict[str, torch.Tensor] = {}
        identity: set[str] = set()

        def hook(key: tuple[str, int], module: torch.nn.Module, args: Any, out: Any) -> None:
            name = key[0]
            leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
            if not name or not leaves or name in outputs:
                return
            outputs[name] = leaves[0].detach().clone()
            order.append(name)
            ins = [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
            if ins and ins[0].shape == leaves[0].shape and torch.equal(ins[0], leaves[0]):
                identity.add(name)

        with ModuleTracker(model, on_exit=hook), torch.no_grad():
            start = time.perf_counter()
            reference = model(*inputs)
            timings["pytorch_forward"] = time.perf_counter() - start
    finally:
        model.train(was_training)

    values = _module_values(onnx_model, order)
    final_names = [o.name for o in onnx_model.graph.output]
    start = time.perf_counter()
    deployed = _to_fp16(onnx_model) if dtype == "float16" else onnx_model
    # Intermediates are exposed in the type they have in the deployed graph (float16 inside an fp16 model).
    exposed = _expose(deployed, [values[n] for n in order if n in values])
    session = _session(exposed, opt_level)
    results = session.run(None, _feed(session, inputs))
    timings["onnxruntime"] = time.perf_counter() - start
    by_name = dict(zip([o.name for o in session.get_outputs()], results, strict=False))

    leaf_names = {n for n, m in model.named_modules() if n and not any(True for _ in m.children())}
    modules: list[ModuleAgreement] = []
    first = None
    types = {n: type(m).__name__ for n, m in model.named_modules()}
    for name in order:
        ref = outputs[name]
        value = values.get(name)
        if value is None or value not in by_name:
            if name in identity:
                modules.append(ModuleAgreement(name, types[name], 0.0, 0.0, 0.0, True, None))
            continue
        got = torch.from_numpy(by_name[value]).to(torch.float64)
        if tuple(got.shape) != tuple(ref.shape):
            continue
        max_abs, max_rel, max_ulp, passed, nonfinite = _agreement(got, ref, dtype, atol, rtol)
        modules.append(ModuleAgreement(name, types[name], max_abs, max_rel, max_ulp, passed, value, nonfinite))
        if not passed and first is None:
            first = name

    ref_out = [t for t in pytree.tree_leaves(reference) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    final = torch.from_numpy(by_name[final_names[0]]).to(torch.float64)
    out_abs, out_rel, _, _, _ = _agreement(final, ref_out[0], dtype, atol, rtol)
    flips, changes, samples = _robustness(model, inputs, deployed, opt_level, ref_out[0], final, perturb, noise, seed)

    # Does exposing intermediates, or fusing, change the deployed output?
    start = time.perf_counter()
    plain = torch.from_numpy(_session(deployed, opt_level).run(None, _feed(session, inputs))[0]).to(torch.float64)
    exposure = float((plain - final).abs().max())
    other = "all" if opt_level != "all" else "none"
    fused = torch.from_numpy(_session(deployed, other).run(None, _feed(session, inputs))[0]).to(torch.float64)
    fusion = float((fused - plain).abs().max())
    timings["extra_sessions"] = time.perf_counter() - start

    matched_leaves = sum(1 for m in modules if m.name in leaf_names)
    required = {"atol": max([m.max_abs for m in modules] + [out_abs]), "rtol": max([m.max_rel for m in modules] + [out_rel])}
    return CompareResult(
        runtime="onnxruntime", dtype=dtype, opt_level=opt_level, exporter=exporter, matched_modules=len(modules),
        total_modules=len(order), matched_leaf_fraction=matched_leaves / max(1, len(leaf_names & set(order))),
        modules=modules, first_divergent=first, required_tolerance=required, tolerance={"atol": atol, "rtol": rtol},
        output=OutputAgreement(out_abs, out_rel, flips, changes, samples), fusion_effect=fusion,
        exposure_effect=exposure, seconds=timings,
    )


def _robustness(model: torch.nn.Module, inputs: tuple[Any, ...], deployed: Any, opt_level: OptLevel,
                ref: torch.Tensor, got: torch.Tensor, perturb: int, noise: float,
                seed: int) -> tuple[float | None, float | None, int]:
    """Top-1 flip rate and largest logit change of the deployment against PyTorch fp32."""
    if ref.dim() < 2:
        return None, float((got - ref.double()).abs().max()), int(ref.shape[0]) if ref.dim() else 1
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
    flips = float((ref_all.argmax(-1) != got_all.argmax(-1)).double().mean())
    return flips, float((ref_all - got_all).abs().max()), int(ref_all.shape[0])
