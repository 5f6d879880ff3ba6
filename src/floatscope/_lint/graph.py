"""Dtype rules on a model graph: ``torch.export`` (or FX) of a ``file.py:factory`` target.

Source alone cannot see the compute dtype when the model is converted elsewhere (``model.half()`` in the training
script). The graph keeps every value's dtype in ``meta["val"]`` and the user's line in ``meta["stack_trace"]``.
"""

from __future__ import annotations

import io
import math
import operator
import re
import tokenize
from pathlib import Path
from typing import Any

from floatscope._lint.results import Finding
from floatscope._lint.rules import RULES

__all__ = ["lint_target"]

_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')
# aten op name -> (index of the tensor operand, index of the scalar, what the scalar is)
_ATEN: dict[str, tuple[int, int, str]] = {
    "add.Tensor": (0, 1, "add"), "add.Scalar": (0, 1, "add"), "sub.Tensor": (0, 1, "add"),
    "sub.Scalar": (0, 1, "add"), "rsub.Scalar": (0, 1, "add"), "add_.Tensor": (0, 1, "add"),
    "mul.Tensor": (0, 1, "mul"), "mul.Scalar": (0, 1, "mul"), "mul_.Tensor": (0, 1, "mul"),
    "clamp.default": (0, 1, "clamp"), "clamp_min.default": (0, 1, "clamp"), "clamp_.default": (0, 1, "clamp"),
    "masked_fill.Scalar": (0, 2, "mask"), "masked_fill_.Scalar": (0, 2, "mask"),
    "where.ScalarOther": (1, 2, "mask"), "where.ScalarSelf": (2, 1, "mask"),
    "fill.Scalar": (0, 1, "fill"), "fill_.Scalar": (0, 1, "fill"), "full.default": (-1, 1, "fill"),
    "full_like.default": (0, 1, "fill"), "new_full.default": (0, 2, "fill"),
}
_FX_FUNCS = {operator.add: "add", operator.sub: "add", operator.iadd: "add", operator.mul: "mul",
             operator.imul: "mul"}
_FX_METHODS = {"add": "add", "sub": "add", "add_": "add", "mul": "mul", "clamp": "clamp", "clamp_min": "clamp",
               "masked_fill": "mask", "masked_fill_": "mask", "fill_": "fill"}


def lint_target(target: str) -> tuple[list[Finding], list[str]]:
    """Graph findings of ``file.py:factory`` and notes (why no graph could be made)."""
    import torch

    from floatscope._engines.target import load_target

    path_text = target.rpartition(":")[0]
    model, inputs = load_target(target)
    nodes: list[tuple[str, Any]] = []
    notes: list[str] = []
    try:
        exported = torch.export.export(model, inputs)
        nodes = [("aten", n) for n in exported.graph.nodes if n.op == "call_function"]
    except Exception as export_exc:  # noqa: BLE001 - any export failure falls back to FX
        try:
            nodes = [("fx", n) for n in _fx_nodes(model, inputs)]
            notes.append(f"{target}: torch.export failed ({_first_line(export_exc)}); checked the torch.fx graph "
                         f"instead")
        except Exception as fx_exc:  # noqa: BLE001
            notes.append(f"{target}: no graph could be made, so only the source rules ran: torch.export failed "
                         f"({_first_line(export_exc)}) and torch.fx.symbolic_trace failed ({_first_line(fx_exc)})")
            return [], notes
    findings: dict[tuple[str, str, int], Finding] = {}
    for kind, node in nodes:
        for finding in _check(kind, node, path_text):
            findings.setdefault((finding.rule, finding.file, finding.line), finding)
    return sorted(findings.values(), key=lambda f: (f.file, f.line, f.col)), notes


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _fx_nodes(model: Any, inputs: tuple[Any, ...]) -> list[Any]:
    import torch
    from torch.fx.passes.shape_prop import ShapeProp

    tracer = torch.fx.Tracer()
    tracer.record_stack_traces = True
    graph = tracer.trace(model)
    module = torch.fx.GraphModule(model, graph)
    ShapeProp(module).propagate(*inputs)
    return [n for n in module.graph.nodes if n.op in ("call_function", "call_method")]


def _dtype(value: Any) -> Any:
    import torch

    if hasattr(value, "meta"):
        val = value.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val.dtype
        meta = value.meta.get("tensor_meta")
        return getattr(meta, "dtype", None)
    return None


def _check(kind: str, node: Any, target_path: str) -> list[Finding]:
    import torch

    if kind == "aten":
        name = getattr(node.target, "__name__", str(node.target))  # add.Tensor
        spec = _ATEN.get(name)
        if spec is None:
            return []
        tensor_at, scalar_at, what = spec
        args = list(node.args)
        if what == "clamp" and "min" in node.kwargs:
            args[1:2] = [node.kwargs["min"]]
        op = f"aten.{name}"
    else:
        if node.op == "call_function":
            what = _FX_FUNCS.get(node.target)
            if what is None and node.target in (torch.add, torch.mul, torch.clamp, torch.masked_fill):
                what = {torch.add: "add", torch.mul: "mul", torch.clamp: "clamp",
                        torch.masked_fill: "mask"}[node.target]
        else:
            what = _FX_METHODS.get(node.target)
        if what is None:
            return []
        args = list(node.args)
        tensor_at, scalar_at = 0, 2 if what == "mask" else 1
        if what == "clamp" and "min" in node.kwargs:
            args[1:2] = [node.kwargs["min"]]
        if what in ("add", "mul") and len(args) == 2 and not hasattr(args[1], "meta") and hasattr(args[0], "meta"):
            pass
        elif what in ("add", "mul") and len(args) == 2 and hasattr(args[1], "meta"):
            args = [args[1], args[0]]  # 1e-8 + x
        op = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
    if scalar_at >= len(args):
        return []
    scalar = args[scalar_at]
    if isinstance(scalar, bool) or not isinstance(scalar, (int, float)):
        return []
    if tensor_at == -1:
        dtype = node.kwargs.get("dtype") or _dtype(node)
    else:
        dtype = _dtype(node) if what == "fill" else (_dtype(args[tensor_at]) if tensor_at < len(args) else None)
    if dtype is None or not dtype.is_floating_point:
        return []
    info = torch.finfo(dtype)
    name = str(dtype).replace("torch.", "")
    value = float(scalar)
    tiny = info.smallest_normal * info.eps / 2  # rounds to 0 at or below half the smallest subnormal
    where = _user_frame(node.meta.get("stack_trace") or "")
    if where is None:
        return []
    file, line = where
    shown = target_path if Path(file).resolve() == Path(target_path).resolve() else file
    col = _column(file, line, value)
    context = f"in the exported graph, {op} on a {name} tensor"
    if what in ("add", "clamp") and 0 < abs(value) <= tiny:
        rule = "FS201"
        message = (f"the epsilon {value:g} rounds to 0 in {name} ({context}; the smallest {name} subnormal is "
                   f"{info.smallest_normal * info.eps:.2g}), so it guards nothing: a division or log it protects "
                   f"still sees 0")
        fix = RULES[rule].rewrite
    elif what == "mask" and math.isfinite(value) and abs(value) > info.max:
        rule = "FS203"
        message = (f"the mask value {value:g} is beyond {name}'s range (max {info.max:g}; {context}): eager PyTorch "
                   f"refuses it, exported and compiled graphs store -inf, and a row with every position masked then "
                   f"gives softmax = NaN")
        fix = "masked_fill(mask, torch.finfo(x.dtype).min)"
    elif what in ("mul", "add", "fill") and math.isfinite(value) and abs(value) > info.max:
        rule = "FS204"
        message = (f"the literal {value:g} overflows {name} (max {info.max:g}; {context}) and becomes inf; inf * 0 "
                   f"and inf - inf are NaN downstream")
        fix = RULES[rule].rewrite
    else:
        return []
    return [Finding(rule, shown, line, col, RULES[rule].severity, message, fix, False)]


def _user_frame(stack: str) -> tuple[str, int] | None:
    """The innermost frame of the stack that is the user's code (not torch's, not floatscope's own)."""
    import torch

    torch_dir = str(Path(torch.__file__).resolve().parent)
    own = str(Path(__file__).resolve().parents[1])
    best = None
    for match in _FRAME.finditer(stack):
        file = match["file"]
        resolved = str(Path(file).resolve()) if not file.startswith("<") else file
        if file.startswith("<") or resolved.startswith(torch_dir):
            continue
        if resolved.startswith(own) and not resolved.startswith(str(Path(own) / "examples")):
            continue
        best = (file, int(match["line"]))
    return best


def _column(file: str, line: int, value: float) -> int:
    """1-based column of the literal equal to ``value`` on the line (or of the line's first character)."""
    try:
        text = Path(file).read_text(encoding="utf-8").splitlines()[line - 1]
    except (OSError, IndexError, UnicodeDecodeError):
        return 1
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text + "\n").readline):
            if tok.type == tokenize.NUMBER:
                try:
                    number = float(tok.string.replace("_", ""))
                except ValueError:
                    continue
                if number == abs(value) or (value != 0 and math.isclose(number, abs(value), rel_tol=1e-6)):
                    start = tok.start[1]
                    if start > 0 and text[start - 1] == "-":
                        start -= 1
                    return start + 1
    except (tokenize.TokenError, IndentationError):
        pass
    return len(text) - len(text.lstrip()) + 1
