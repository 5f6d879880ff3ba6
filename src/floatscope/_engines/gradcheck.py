"""``floatscope.gradcheck``: is a backward right? Central finite differences in float64, localised.

The check works on float64 copies of the inputs (and, for a module, of its parameters). For each
checked tensor ``x`` with ``n`` elements and the flattened outputs ``y = f(x)`` with ``m`` elements:

1. **Analytic side.** For ``K = 2`` random cotangents ``u`` (normal, over all outputs), one backward
   gives the whole row ``g = uᵀJ`` over every input element.
2. **Screening by random projections.** For a block ``B`` of elements, a direction ``w`` is nonzero
   on ``B`` only: ``w_i = s_i h_i`` with random signs and magnitudes ``s_i = ±[1, 2)`` and the step
   ``h_i = eps · max(|x_i|, mean|x| / 10)`` (``mean|x| = 0``: 1), ``eps = ε^(1/3)`` of the working
   precision (6.1e-6 in float64). Four forward calls, at ``x ± w`` and ``x ± 2w``, give the numeric
   side ``uᵀ(f(x + w) − f(x − w))`` for every cotangent at once; the analytic side is
   ``gᵀ(x⁺ − x⁻)`` with the exact float64 difference of the two points, so rounding of the step
   itself does not matter. The discrepancy ``d₁`` (step h) and ``d₂`` (step 2h) of a right backward
   is truncation (``d₂ ≈ 8 d₁``) plus rounding noise; a wrong backward adds a part linear in the step.
   The tolerance is an estimate of the finite-difference error, not a fixed atol::

       tol = C · (|d₂ − 2 d₁| / 6                                   truncation of d₁, free of any bug
                  + √2 · max(|Δ⁴φ| / √70, κ ε Σ|u_j||f_j(x)|)        rounding: the fourth difference
                  + κ ε Σ|g_i||Δx_i|)                               of φ(t) = uᵀf(x + t w), or a floor
             + 6 · ‖Δx ∘ (atol ‖u‖ + rtol |g|)‖₂                     the user's per-element slack

   with ``C = 8``, ``κ = 16`` and ``ε`` the working precision's machine epsilon. A single wrong
   element of a block is not diluted by the block's size: its error enters ``d₁`` in full, and the
   tolerance of a smooth float64 function is some 1e-10 of the projected value.
   The estimate is trusted only when it fits: the noise probe leaves out the base point (an exact
   zero or tie there would put a jump into every projection's noise), and a block whose
   truncation is above the noise but whose linear part ``|8 d₁ − d₂| / 6`` is larger still (a
   jump gives ``d₂ ≈ d₁``; a step longer than the function's scale anything) is split, not passed.
3. **Localisation.** A failing (or untrusted) block is split in halves, best first (the largest
   error per unit step), down to single elements, until ``max_reported`` bad elements are found or
   the evaluation budget is spent. In float64 only the first half is evaluated, along the parent's
   own direction restricted to it; the second half's numeric sides are the parent's less the first's
   (the same points on every element, so they add up; the cubic cross terms are truncation, and the
   second half's two-step estimate sees them as such), and its tolerance is its own. Where the parent
   showed the function smooth (truncation within the rounding noise, nothing suspicious), the first
   half takes two calls (``x ± w``) and both halves keep the parent's truncation; if such a descent
   ends at an element that passes, the rest of that tensor is halved with four calls. So a level of
   the bisection costs two calls (four, or eight in lower working precision, otherwise).
4. **Elements.** For a bad element, its whole numeric Jacobian column (steps h and 2h, same error
   estimate per output) and the analytic value of the output that disagrees most (all rows when
   the function has at most 64 outputs, else a bisection over outputs with shared backward passes)
   give the reported entry. One-sided slopes ``(f(x+h) − f(x))/h`` and ``(f(x) − f(x−h))/h`` that
   disagree, and keep disagreeing at 2h, mark a **kink** (relu or abs at 0, max at a tie): a
   non-differentiable point, not a bug, when the analytic value lies between the two slopes. A
   one-sided change that keeps its size from h down to h/10⁵ is a **jump** (floor, ``x > 0`` at a
   tie). Steps h and 2h that disagree by over 1% (or whose noise is a tenth of the column) are
   refined at h/10, h/100, ... until three successive steps agree (then judged against the finest)
   or rounding dominates (**unresolved**: verdict ``unreliable``, not "wrong").

Every evaluation runs with the same RNG seed (restored afterwards), so dropout draws the same mask
each time. Before checking, two calls at the same point test determinism, a call under a torch function
mode records the lowest floating precision any op computed in, and the inputs are compared before
and after a call (in-place modification).
"""

from __future__ import annotations

import contextlib
import copy
import heapq
import inspect
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from floatscope._errors import FloatscopeError, UsageError
from floatscope._results import to_json_value

__all__ = ["gradcheck", "GradcheckResult", "InputCheck", "WorstElement", "GradcheckError"]

Verdict = Literal["pass", "fail", "kink", "unreliable"]
ElementKind = Literal["wrong", "kink", "jump", "unresolved"]

_C = 8.0            # safety factor on the finite-difference error estimate
_KAPPA = 16.0       # rounding floor: this many machine epsilons of the values involved
_STAT_T = 6.0       # sub-Gaussian bound for the user slack summed over a projection
_K = 2              # random cotangents
_ROWS_DIRECT = 64   # at most this many outputs: compute every analytic row of a bad element
_LOW_FLOOR = 0.5    # lower working precision: rounding floor per output that moved, in machine epsilons
_LOW_RTOL = 8.0     # lower working precision: default rtol, in machine epsilons


class GradcheckError(FloatscopeError, AssertionError):
    """``gradcheck(..., raise_on_failure=True)`` found a wrong gradient; ``result`` is the full report."""

    def __init__(self, result: "GradcheckResult") -> None:
        super().__init__(str(result))
        self.result = result


@dataclass(frozen=True)
class WorstElement:
    """One Jacobian entry ``d output[output] / d input[element]`` that disagrees.

    ``rel_error = abs_error / max(|analytic|, |numeric|)`` (0 when both are 0). ``tolerance`` is the
    largest ``abs_error`` that would have passed (the estimated finite-difference error times 8,
    plus ``atol + rtol·|numeric|``). ``step`` is the step of ``numeric`` (the element's step, or a
    refined one when steps h and 2h had not converged). Kinds: ``wrong``; ``kink`` (one-sided slopes
    ``left_slope`` and ``right_slope`` differ, the analytic value between them); ``jump`` (the
    function jumps by ``jump`` across the element: no derivative there); ``unresolved`` (the numeric
    value did not converge down to where rounding dominates: ``finest`` at ``finest_step``).
    """

    element: list[int]
    output: list[int] | None
    analytic: float
    numeric: float
    abs_error: float
    rel_error: float
    kind: ElementKind = "wrong"
    output_tensor: int = 0
    tolerance: float = 0.0
    left_slope: float | None = None
    right_slope: float | None = None
    step: float = 0.0
    jump: float | None = None
    finest: float | None = None
    finest_step: float | None = None


@dataclass(frozen=True)
class InputCheck:
    """The check of one input tensor (or module parameter).

    ``index``: the positional index of an input; a module parameter's is ``len(inputs) + k`` in
    ``named_parameters()`` order. ``bad_elements`` counts the elements localised as wrong;
    ``complete`` is False when the search stopped (``max_reported`` or the budget) with failing
    blocks left, so there are at least ``bad_elements_at_least`` bad elements. ``max_ratio`` is the
    largest ``|analytic − numeric| / tolerance`` of the judgments that stand (blocks that passed, elements
    cleared by their column): at most 1 when the tensor passes, by construction; a failing tensor's
    includes its failing projections.
    ``kinks`` counts the non-differentiable elements (``jumps`` of them discontinuities);
    ``unresolved`` the elements whose finite differences never converged (verdict ``unreliable``).
    """

    index: int
    name: str | None
    passed: bool
    worst: list[WorstElement]
    verdict: Verdict
    cause: str
    kind: Literal["input", "parameter"] = "input"
    shape: list[int] = field(default_factory=list)
    dtype: str = "torch.float64"
    step: float = 0.0
    bad_elements: int = 0
    kinks: int = 0
    bad_elements_at_least: int = 0
    complete: bool = True
    max_ratio: float = 0.0
    jumps: int = 0
    unresolved: int = 0


@dataclass(frozen=True)
class GradcheckResult:
    """The outcome of :func:`gradcheck`; true when every checked input passed.

    ``evaluations`` counts forward calls of the function, ``backward_passes`` backward passes;
    ``notes`` are findings about the function as a whole (float32 inputs or internal precision,
    random draws, non-determinism, in-place modification of inputs).
    """

    passed: bool
    seconds: float
    inputs: list[InputCheck]
    evaluations: int = 0
    backward_passes: int = 0
    working_dtype: str = "torch.float64"
    notes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        return to_json_value(asdict(self))

    def __repr__(self) -> str:
        """Short when it passed; when it failed, the key facts first, within 240 characters (pytest cuts a
        longer assertion message in the middle): the tensor, the worst element, analytic vs numeric, the cause."""
        bad = [c for c in self.inputs if not c.passed]
        if not bad:
            return (f"GradcheckResult(passed=True, {_count(len(self.inputs), 'checked tensor')}, "
                    f"{self.evaluations} evaluations, {self.seconds:.3g} s)")
        c = bad[0]
        label = f"{c.kind} {c.index}" + (f" '{c.name}'" if c.name else "")
        head = f"GradcheckResult(FAILED: {label}"
        wrong = [w for w in c.worst if w.kind == "wrong"]
        if wrong:
            w = wrong[0]
            out = "" if w.output is None or w.output == w.element else f" output {_index(w.output)}"
            factor = ""
            if w.numeric != 0 and math.isfinite(w.analytic) and w.analytic / w.numeric > 0:
                factor = f" ({_g(w.analytic / w.numeric, 3)}x)"
            head += (f" element {_index(w.element)}{out}: analytic {_g(w.analytic, 6)} vs numeric {_g(w.numeric, 6)}"
                     f"{factor}, {_count(c.bad_elements, 'wrong element')}{'' if c.complete else ' or more'}")
        else:
            head += f" {c.verdict}"
        more = f"; {_count(len(bad) - 1, 'more failing tensor')}" if len(bad) > 1 else ""
        tail = f"{more}; {self.evaluations} evaluations)"
        room = 240 - len(head) - len(tail) - 2
        cause = c.cause.split(": ", 1)[1] if wrong and ": " in c.cause else c.cause
        if len(cause) > room:
            cause = cause[:max(room - 3, 0)] + "..."
        return f"{head}; {cause}{tail}" if cause else f"{head}{tail}"

    def __str__(self) -> str:
        return "\n".join(report_lines(self))


def report_lines(result: GradcheckResult) -> list[str]:
    """The report ``print(result)`` and ``floatscope gradcheck`` show: per checked tensor its verdict, a
    table of the worst elements and the cause; then the notes and a summary line."""
    lines: list[str] = []
    columns = ("element", "output", "analytic", "numeric", "abs error", "rel error", "tolerance", "kind")
    for c in result.inputs:
        label = f"{c.kind} {c.index}" + (f" '{c.name}'" if c.name else "")
        size = "x".join(str(s) for s in c.shape) or "scalar"
        extra = ""
        if c.verdict == "fail":
            extra = (f": {_count(c.bad_elements, 'wrong element')}"
                     + ("" if c.complete else f", at least {c.bad_elements_at_least} in all"))
        elif c.verdict == "kink":
            extra = f": {_count(c.kinks, 'element')} at a non-differentiable point"
        elif c.unresolved:
            extra = f": {_count(c.unresolved, 'element')} unresolved"
        lines.append(f"{label} ({size}, {c.dtype.replace('torch.', '')}, step {c.step:.2g}): {c.verdict}{extra}")
        if c.worst:
            many = any(w.output_tensor for w in c.worst)
            rows = [columns]
            for w in c.worst:
                out = "?" if w.output is None else _index(w.output)
                rows.append((_index(w.element), f"#{w.output_tensor} {out}" if many else out, _g(w.analytic, 9),
                             _g(w.numeric, 9), _g(w.abs_error, 3), _g(w.rel_error, 3), _g(w.tolerance, 3), w.kind))
            widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
            for r in rows:
                cells = [r[i].ljust(widths[i]) if columns[i] in ("element", "output", "kind") else r[i].rjust(widths[i])
                         for i in range(len(columns))]
                lines.append("  " + "  ".join(cells).rstrip())
        if c.cause:
            lines.append(f"  cause: {c.cause}")
    lines.extend(f"note: {n}" for n in result.notes)
    lines.append(f"gradcheck {'passed' if result.passed else 'FAILED'}: {_count(len(result.inputs), 'checked tensor')}, "
                 f"{result.evaluations} forward and {result.backward_passes} backward evaluations, {result.seconds:.3g} s")
    return lines


def _index(index: list[int]) -> str:
    return "[" + ", ".join(str(i) for i in index) + "]"


# ----------------------------------------------------------------------------------------------
# The function under check


@dataclass
class _Leaf:
    index: int
    name: str | None
    kind: Literal["input", "parameter"]
    value: torch.Tensor          # float64, detached, flat view of the base point
    shape: tuple[int, ...]
    orig_dtype: torch.dtype


class _Problem:
    """The callable with its checked tensors made replaceable, and the call bookkeeping."""

    def __init__(self, fn: Any, inputs: Sequence[Any], *, seed: int) -> None:
        self.seed = seed
        self.evaluations = 0
        self.backward_passes = 0
        self.notes: list[str] = []
        self.module: torch.nn.Module | None = None
        self.fn_name = _callable_name(fn)
        names = _arg_names(fn.forward if isinstance(fn, torch.nn.Module) else fn, len(inputs))
        self.args: list[Any] = []
        self.leaves: list[_Leaf] = []
        self.arg_slot: dict[int, int] = {}  # leaf number -> positional index
        described: list[str] = []
        # Every tensor argument is a private copy (``.to(float64)`` alias a float64 tensor, so clone):
        # the caller's tensors are never touched, and a constant the function modifies in place is
        # restored after each call (``pristine``) and reported.
        self.pristine: dict[int, torch.Tensor] = {}
        self.arg_labels: list[str] = []
        self.mutated_args: set[int] = set()
        for i, value in enumerate(inputs):
            label = f"input {i}" + (f" '{names[i]}'" if names[i] else "")
            self.arg_labels.append(label)
            if isinstance(value, torch.Tensor):
                if value.is_complex():
                    raise UsageError(f"{label} is a complex tensor ({value.dtype}); floatscope.gradcheck checks real "
                                     f"floating tensors only: split it with torch.view_as_real")
                if value.is_floating_point():
                    copy64 = value.detach().to(torch.float64, copy=True)
                    if value.requires_grad:
                        self.arg_slot[len(self.leaves)] = i
                        self.leaves.append(_Leaf(i, names[i], "input", copy64.reshape(-1).clone(),
                                                 tuple(value.shape), value.dtype))
                        described.append(f"{label}: {value.dtype} {tuple(value.shape)}, requires_grad")
                    else:
                        described.append(f"{label}: {value.dtype} {tuple(value.shape)} without requires_grad "
                                         f"(a constant)")
                        self.pristine[i] = copy64
                    self.args.append(copy64.clone())
                else:
                    described.append(f"{label}: {value.dtype} {tuple(value.shape)} (not floating: a constant)")
                    self.pristine[i] = value.detach().clone()
                    self.args.append(value.detach().clone())
            else:
                described.append(f"{label}: {type(value).__name__} (a constant)")
                self.args.append(value)
        self.ignored_outputs: list[str] = []
        self.param_names: list[str] = []
        if isinstance(fn, torch.nn.Module):
            try:
                module = copy.deepcopy(fn)
            except Exception as exc:  # noqa: BLE001 - any failure of the user's module to copy
                raise UsageError(f"cannot copy the module {type(fn).__name__} to check it in float64 "
                                 f"({type(exc).__name__}: {exc}); floatscope never modifies your module, so it needs "
                                 f"copy.deepcopy to work") from None
            module.double()
            self.module = module
            for k, (pname, p) in enumerate(module.named_parameters()):
                orig = dict(fn.named_parameters()).get(pname)
                if p.requires_grad and p.is_floating_point():
                    self.leaves.append(_Leaf(len(inputs) + k, pname, "parameter", p.detach().reshape(-1).clone(),
                                             tuple(p.shape), orig.dtype if orig is not None else p.dtype))
                    self.param_names.append(pname)
        if not self.leaves:
            what = "; ".join(described) if described else "no inputs"
            extra = " and the module has no parameter that requires grad" if isinstance(fn, torch.nn.Module) else ""
            integer = any(isinstance(v, torch.Tensor) and not v.is_floating_point() for v in inputs)
            why = " integer and boolean tensors have no gradient, and" if integer else ""
            raise UsageError(f"nothing to check: no floating input requires grad{extra} ({what});{why} gradients are "
                             f"checked for floating tensors with requires_grad=True: pass x.double().requires_grad_() "
                             f"for the inputs to check")
        self.fn = fn
        self.devices = sorted({t.device.index or 0 for t in self.args
                               if isinstance(t, torch.Tensor) and t.device.type == "cuda"})

    # -- calling -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _rng(self, reseed: bool = True) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.devices):
            if reseed:
                torch.default_generator.manual_seed(self.seed)
                for d in self.devices:
                    with torch.cuda.device(d):
                        torch.cuda.manual_seed(self.seed)
            yield

    def raw_call(self, values: Sequence[torch.Tensor]) -> Any:
        """Call the function with the checked tensors set to ``values`` (shaped as the originals)."""
        self.evaluations += 1
        n_inputs = len(self.arg_slot)
        args = list(self.args)
        for k in range(n_inputs):
            args[self.arg_slot[k]] = values[k]
        try:
            if self.module is not None:
                if self.param_names:
                    params = dict(zip(self.param_names, values[n_inputs:], strict=True))
                    return torch.func.functional_call(self.module, params, tuple(args))
                return self.module(*args)
            return self.fn(*args)
        except FloatscopeError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's function raised: say so in one line
            hint = ""
            if "dtype" in str(exc) or "Double" in str(exc) or "Float" in str(exc):
                hint = ("; gradcheck calls it with float64 copies of the inputs, so a module or tensor it captures must "
                        "be float64 too: pass the module itself (gradcheck(model, x) checks a float64 copy) or "
                        "capture model.double()")
            raise UsageError(f"calling {self.fn_name} raised {type(exc).__name__}: {exc}{_raised_at(exc)}{hint}") from exc
        finally:
            # A constant modified in place gets a fresh copy (not copy_: an output may alias it).
            for i, clean in self.pristine.items():
                if not _same(self.args[i], clean):
                    self.mutated_args.add(i)
                    self.args[i] = clean.clone()

    def outputs(self, out: Any) -> list[torch.Tensor]:
        """The floating tensor leaves of what ``fn`` returned (nested tuples, lists, dicts, namedtuples), in
        order; integer and boolean tensors and None are ignored (noted once); other leaves are refused."""
        leaves, _ = pytree.tree_flatten_with_path(out)
        nested = not (len(leaves) == 1 and not leaves[0][0])
        floats: list[torch.Tensor] = []
        ignored: list[str] = []
        for path, item in leaves:
            key = pytree.keystr(path)
            where = ("the output" if not nested else f"output {key[1:-1]}" if key[1:-1].isdigit() and key.count("[") == 1
                     else f"output {key}")
            if item is None:
                ignored.append(f"{where} (None)")
                continue
            if not isinstance(item, torch.Tensor):
                if isinstance(item, (bool, int, float)):
                    advice = ("do not call .item() (or float(), int()) inside the checked function: it cuts the graph, "
                              "so there is no gradient to check; return the tensor itself")
                else:
                    advice = "return torch.as_tensor(...) or drop the non-tensor from what is returned"
                raise UsageError(f"{self.fn_name} returned {type(item).__name__} as {where}; gradcheck needs tensors "
                                 f"(a tensor, or tuples, lists or dicts of them): {advice}")
            if item.is_complex():
                raise UsageError(f"{where} of {self.fn_name} is complex ({item.dtype}); return torch.view_as_real(...)")
            if item.is_floating_point():
                floats.append(item)
            else:
                ignored.append(f"{where} ({str(item.dtype).replace('torch.', '')})")
        if not floats:
            raise UsageError(f"{self.fn_name} returned no floating tensor (only integer or boolean ones, or None); "
                             f"there is no gradient to check")
        if ignored and not self.ignored_outputs:
            self.ignored_outputs = ignored
        return floats

    def evaluate(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        """Flattened float64 outputs at ``values`` (flat float64 tensors), seeded, without grad."""
        # Copies: a function that modifies its input would move the base point, or the caller's steps.
        shaped = [v.clone().reshape(leaf.shape) for v, leaf in zip(values, self.leaves, strict=True)]
        with torch.no_grad(), self._rng():
            outs = self.outputs(self.raw_call(shaped))
        return torch.cat([o.detach().reshape(-1).to(torch.float64) for o in outs])

    def base_values(self) -> list[torch.Tensor]:
        return [leaf.value for leaf in self.leaves]


def _same(a: Any, b: torch.Tensor) -> bool:
    """Bit-for-bit the same tensor, NaN included (``torch.equal`` says NaN != NaN)."""
    if not isinstance(a, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    return a.is_floating_point() and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _raised_at(exc: BaseException) -> str:
    """`` (at file:line)`` of the innermost user frame of ``exc``'s traceback, or ''."""
    from floatscope._instrument.frames import is_internal

    where = ""
    tb = exc.__traceback__
    while tb is not None:
        if not is_internal(tb.tb_frame.f_code.co_filename):
            where = f" (at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})"
        tb = tb.tb_next
    return where


def _callable_name(fn: Any) -> str:
    """``torch.sin`` for a torch built-in (whose ``__qualname__`` is ``_VariableFunctionsClass.sin``),
    ``torch.Tensor.sin`` for a tensor method, else the qualified name (a module: its class name)."""
    if isinstance(fn, torch.nn.Module):
        return type(fn).__name__
    qualname = getattr(fn, "__qualname__", None)
    name = getattr(fn, "__name__", None)
    if qualname and name and qualname.split(".")[0] in ("_VariableFunctionsClass", "_VariableFunctions"):
        return f"torch.{name}"
    if qualname and name and qualname.split(".")[0] in ("TensorBase", "_TensorBase", "Tensor"):
        return f"torch.Tensor.{name}"
    if qualname and getattr(fn, "__module__", None) == "torch.nn.functional":
        return f"torch.nn.functional.{qualname}"
    return qualname or type(fn).__name__


def _arg_names(fn: Any, count: int) -> list[str | None]:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return [None] * count
    names: list[str | None] = []
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        elif p.kind == p.VAR_POSITIONAL:
            break
    return (names + [None] * count)[:count]


class _DtypeScan(TorchFunctionMode):
    """Records the lowest floating precision the function *computes* in, and the first call (and line) that did.

    A torch call computes in low precision when it returns a float32, float16 or bfloat16 tensor
    from a floating input that may carry the checked values (rounding them). Not counted: tensors
    made from nothing (``torch.zeros(1)``: a float32 constant that a float64 sum promotes), exact
    casts of booleans and integers (``(x > 0).float()``), and calls on such tensors only. A tensor the
    scan did not see made (an input, a captured constant, a custom ``autograd.Function``'s output:
    ``Function.apply`` bypasses function modes) may carry the inputs, so a low-precision result of
    it counts.

    A function mode, not a dispatch mode: it sees the user's calls (``x.float()``) and its first use
    costs a millisecond, where a dispatch mode's first use costs a second.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lowest: torch.dtype | None = None
        self.first: tuple[str, str] | None = None
        self._exact: dict[int, torch.Tensor] = {}  # id -> tensor (kept alive so that ids stay unique)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        floats_in = [t for t in pytree.tree_leaves((args, kwargs or {}))
                     if isinstance(t, torch.Tensor) and t.is_floating_point()]
        carries = any(id(t) not in self._exact for t in floats_in)
        for t in pytree.tree_leaves(out):
            if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
                continue
            if not carries:
                self._exact[id(t)] = t
                continue
            if t.dtype != torch.float64 and (self.lowest is None
                                             or torch.finfo(t.dtype).eps > torch.finfo(self.lowest).eps):
                self.lowest = t.dtype
                if self.first is None:
                    from floatscope._instrument.frames import frame_from

                    where = frame_from(sys._getframe(1))
                    name = getattr(func, "__name__", None) or str(func)
                    self.first = (name, f"{where.file}:{where.line}" if where.known else "")
        return out


# ----------------------------------------------------------------------------------------------
# Analytic side


class _Analytic:
    """The retained graph of one differentiable call: rows ``cᵀJ`` for any cotangent ``c``."""

    def __init__(self, problem: _Problem) -> None:
        self.problem = problem
        leaves = [leaf.value.reshape(leaf.shape).clone().requires_grad_() for leaf in problem.leaves]
        self.leaf_tensors = leaves
        passed = [t.clone() for t in leaves]  # non-leaf: an in-place op on an input is legal for autograd
        with torch.enable_grad(), problem._rng():
            outs = problem.outputs(problem.raw_call(passed))
        self.mutated = [k for k, (p, t) in enumerate(zip(passed, leaves, strict=True))
                        if not torch.equal(p.detach(), t.detach())]
        self.outs = outs
        self.sizes = [o.numel() for o in outs]
        self.out_shapes = [tuple(o.shape) for o in outs]
        self.value = torch.cat([o.detach().reshape(-1).to(torch.float64) for o in outs])
        self.differentiable = [o.requires_grad for o in outs]
        self.graph_functions = _custom_functions(outs, leaves)
        self.cache: dict[Any, list[torch.Tensor]] = {}

    def row(self, cotangent: torch.Tensor, key: Any = None) -> list[torch.Tensor]:
        """``cotangentᵀ J`` for every checked tensor, flat float64 (zeros where unused)."""
        if key is not None and key in self.cache:
            return self.cache[key]
        pieces = torch.split(cotangent, self.sizes)
        outs, grads = [], []
        for o, piece, diff in zip(self.outs, pieces, self.differentiable, strict=True):
            if diff:
                outs.append(o)
                grads.append(piece.reshape(o.shape).to(o.dtype))
        result: list[torch.Tensor]
        if not outs:
            result = [torch.zeros_like(leaf.value) for leaf in self.problem.leaves]
        else:
            self.problem.backward_passes += 1
            try:
                with torch.enable_grad(), self.problem._rng():
                    got = torch.autograd.grad(outs, self.leaf_tensors, grads, retain_graph=True, allow_unused=True)
            except Exception as exc:  # noqa: BLE001 - the user's backward raised
                raise UsageError(f"the backward of {self.problem.fn_name} raised {type(exc).__name__}: {exc}") from exc
            result = [torch.zeros_like(leaf.value) if g is None else g.detach().reshape(-1).to(torch.float64)
                      for g, leaf in zip(got, self.problem.leaves, strict=True)]
        if key is not None:
            self.cache[key] = result
        return result


def _custom_functions(outs: list[torch.Tensor], leaves: list[torch.Tensor]) -> dict[int, list[type]]:
    """For each checked tensor, the custom ``autograd.Function`` classes between it and the outputs."""
    leaf_ids = {id(t): k for k, t in enumerate(leaves)}
    reach: dict[Any, frozenset[int]] = {}
    found: dict[int, list[type]] = {}
    # Iterative post-order walk of the graph (recursion would overflow on long graphs).
    roots = [o.grad_fn for o in outs if o.grad_fn is not None]
    stack: list[tuple[Any, bool]] = [(r, False) for r in roots]
    while stack:
        node, done = stack.pop()
        if node in reach and not done:
            continue
        children = [n for n, _ in getattr(node, "next_functions", ()) if n is not None]
        if not done:
            stack.append((node, True))
            stack.extend((c, False) for c in children if c not in reach)
            continue
        below: set[int] = set()
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in leaf_ids:
            below.add(leaf_ids[id(variable)])
        for c in children:
            below |= reach.get(c, frozenset())
        reach[node] = frozenset(below)
        cls = getattr(node, "_forward_cls", None)
        if cls is not None:
            for k in below:
                if cls not in found.setdefault(k, []):
                    found[k].append(cls)
    return found


# ----------------------------------------------------------------------------------------------
# Numeric side


@dataclass
class _Block:
    leaf: int
    lo: int
    hi: int
    ratio: float      # max over cotangents of |d1| / tol
    score: float      # |d1| / ‖Δx‖: error per unit step, for best-first order
    suspicious: bool = False  # passed, but the error estimate does not fit a smooth function
    # Float64 blocks keep what their halves need (``_Checker.split``): the direction, the numeric sides
    # ``uᵀ(f(x + w) − f(x − w))`` (and at 2w: None for a two-call block), the truncation, how many
    # measured projections the numeric sides combine, the element count, and whether two calls decided it.
    w: torch.Tensor | None = None
    num1: list[float] | None = None
    num2: list[float] | None = None
    trunc: list[float] | None = None
    terms: int = 1
    size: int = 0
    two_call: bool = False
    share: float = 0.0       # largest share of the tolerance that the truncation estimate takes (float64)
    rounding: float = 0.0    # largest share of the truncation estimate that rounding takes (float64)
    scale: float = 1.0       # the direction's step relative to the elements' steps (refined: 1/10, 1/100, ...)

    @property
    def open(self) -> bool:
        return self.ratio > 1 or self.suspicious


class _Checker:
    def __init__(self, problem: _Problem, analytic: _Analytic, *, eps: float | None, atol: float, rtol: float,
                 eps_work: float, generator: torch.Generator) -> None:
        self.p = problem
        self.a = analytic
        self.atol = atol
        self.rtol = rtol
        self.eps_work = eps_work
        # Lower working precision: rounding errors are independent across outputs and elements, so they
        # add in quadrature (an L2 norm) and only over the outputs that moved; a float64 function keeps
        # the plain sums (16 ε of them is some 1e-12 there).
        self.low = eps_work > torch.finfo(torch.float64).eps
        self.gen = generator
        self.f0 = analytic.value
        self.abs_f0 = self.f0.abs()
        device = self.f0.device
        m = self.f0.numel()
        self.cotangents = [torch.randn(m, generator=generator, dtype=torch.float64).to(device) for _ in range(_K)]
        self.rows = [analytic.row(u) for u in self.cotangents]  # rows[k][leaf]: (n,)
        rel_step = eps if eps is not None else eps_work ** (1.0 / 3.0)
        self.steps: list[torch.Tensor] = []
        for leaf in problem.leaves:
            mag = leaf.value.abs()
            typical = float(mag.mean()) if mag.numel() else 0.0
            floor = typical / 10.0 if typical > 0 else 1.0
            self.steps.append(rel_step * torch.clamp(mag, min=floor))  # (n,)
        self.sigma = self._noise_probe()  # (m,)
        self.refined: dict[int, int] = {}          # leaf -> elements that passed only at a refined step
        self.refined_step: dict[int, float] = {}   # leaf -> the finest such step
        self.two_call_ok: dict[int, bool] = {}     # leaf -> False once a two-call descent ended at a fine element
        self.last_ratio = 0.0                      # the ratio of check_element's last passing judgment
        self.u_matrix = torch.stack(self.cotangents)  # (K, m)
        self.u_norms = self.u_matrix.norm(dim=1)  # (K,)
        self.g_matrix = [torch.stack([row[leaf] for row in self.rows]) for leaf in range(len(problem.leaves))]  # (K, n)
        floor = torch.maximum(self.sigma, _KAPPA * eps_work * self.abs_f0)
        self.noise = (math.sqrt(2) * (self.u_matrix.abs() @ floor)).tolist()  # (K,) rounding noise of a projection
        if self.low:
            # The noise of a projection measured directly (correlated rounding included), for every block.
            projected = (self._fourth @ self.u_matrix.T).pow(2).mean(0).sqrt() / math.sqrt(70)  # (K,)
            self.projected_noise = (math.sqrt(2) * projected).tolist()
            self.low_floor = torch.maximum(self.sigma, _LOW_FLOOR * eps_work * self.abs_f0)  # (m,)

    def _noise_probe(self) -> torch.Tensor:
        """Rounding noise of each output: fourth differences along a random direction at a spacing of
        a thousandth of the step, where smooth variation is far below the noise. The samples leave
        out the base point: an exact zero, tie or integer there (relu, max, floor, ``x > 0``) would
        put its kink or jump into the probe, and the inflated noise into every projection."""
        directions = []
        for leaf, h in zip(self.p.leaves, self.steps, strict=True):
            signs = torch.where(torch.rand(h.numel(), generator=self.gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
            directions.append(1e-3 * signs.to(h.device) * h)
        f = [self.p.evaluate([leaf.value + k * d for leaf, d in zip(self.p.leaves, directions, strict=True)])
             for k in range(1, 8)]
        fourth = torch.stack([f[k] - 4 * f[k + 1] + 6 * f[k + 2] - 4 * f[k + 3] + f[k + 4] for k in range(3)])
        self._fourth = fourth  # (3, m)
        return fourth.pow(2).mean(0).sqrt() / math.sqrt(70)  # RMS of three samples, per output

    # -- one projection ------------------------------------------------------------------------

    def _direction(self, leaf: int, sel: slice | torch.Tensor, signed: bool = True) -> torch.Tensor:
        """A random direction on the elements ``sel`` (zero elsewhere): random signs (all + when not
        ``signed``) and magnitudes in [1, 2) times each element's step."""
        x = self.p.leaves[leaf].value
        n = len(range(x.numel())[sel]) if isinstance(sel, slice) else int(sel.numel())
        signs = torch.where(torch.rand(n, generator=self.gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
        mags = 1.0 + torch.rand(n, generator=self.gen, dtype=torch.float64)
        w = torch.zeros_like(x)
        w[sel] = ((signs if signed else 1.0) * mags).to(x.device) * self.steps[leaf][sel]
        return w

    def _evaluate_at(self, leaf: int, points: list[torch.Tensor]) -> list[torch.Tensor]:
        values = self.p.base_values()
        evals = []
        for pt in points:
            vals = list(values)
            vals[leaf] = pt
            evals.append(self.p.evaluate(vals))
        return evals

    def _projection_noise(self, evals: list[torch.Tensor], whole: bool) -> list[float]:
        """(K,) rounding noise of a difference of two projected values."""
        if not self.low:
            return self.noise
        # Only outputs that moved carry rounding, in quadrature: a block's tolerance does not grow with its size.
        moved = torch.zeros_like(self.f0, dtype=torch.bool)
        for f in evals:
            moved |= f != self.f0
        spread = (self.u_matrix * (self.low_floor * moved.to(torch.float64))).norm(dim=1)  # (K,)
        # The measured projection noise is the whole tensor's.
        return [max(math.sqrt(2) * float(spread[k]), self.projected_noise[k] if whole else 0.0) for k in range(_K)]

    def one_sided(self, leaf: int, idx: torch.Tensor, side: int) -> tuple[float, bool]:
        """Do the elements ``idx`` follow the analytic gradient on one side (``side`` +1: right, −1: left)?
        Two calls at ``x + side·w``, ``x + 2·side·w`` with ``w > 0`` on ``idx``: ``d(t) = φ(t) − φ(0) −
        gᵀΔx = b·t + c·t²``; Richardson's ``b = (4 d₁ − d₂) / 2`` is what the analytic side misses. A relu at
        0 whose analytic value is its left slope passes from the left; a jump (x > 0) fails on its side with
        ``d₂ ≈ d₁``. Returns the ratio of ``|b|`` to its tolerance (below 1 passes) and whether ``d`` is flat."""
        x = self.p.leaves[leaf].value
        w = side * self._direction(leaf, idx, signed=False)
        points = [x + w, x + 2 * w]
        f1, f2 = self._evaluate_at(leaf, points)
        dx1, dx2 = (points[0] - x)[idx], (points[1] - x)[idx]
        phi = (torch.stack([self.f0, f1, f2]) @ self.u_matrix.T).tolist()  # (3, K)
        g = self.g_matrix[leaf][:, idx]  # (K, b)
        user = self.atol * self.u_norms[:, None] + self.rtol * g.abs()
        analytic_scale = (g * dx1).norm(dim=1) if self.low else g.abs() @ dx1.abs()
        sides = torch.stack([g @ dx1, g @ dx2, analytic_scale, (dx1 * user).norm(dim=1)]).tolist()  # (4, K)
        noise = self._projection_noise([f1, f2], whole=False)
        ratio, flat = 0.0, True
        for k in range(_K):
            d1 = (phi[1][k] - phi[0][k]) - sides[0][k]
            d2 = (phi[2][k] - phi[0][k]) - sides[1][k]
            b = abs(4 * d1 - d2) / 2
            c = abs(d2 - 2 * d1) / 2
            tol = _C * (2.5 * noise[k] + _KAPPA * self.eps_work * sides[2][k] + 0.05 * c) + _STAT_T * sides[3][k]
            r = b / tol if tol > 0 else (0.0 if b == 0 else math.inf)
            ratio = max(ratio, r if math.isfinite(b) else math.inf)
            flat &= abs(d2 - d1) < 0.5 * abs(d1)
        return ratio, flat

    def screen(self, leaf: int, lo: int, hi: int, idx: torch.Tensor | None = None) -> _Block:
        """``test_block``, with the step refined where the truncation estimate is a large share of the
        tolerance (the step is too long for the function's curvature: a bug would hide in it). The block is
        measured again at h/10, h/100, ... as long as the truncation estimate shrinks like h² (its share of
        the tolerance by ~100 per step) and rounding stays below it; the finest such measurement judges."""
        block = self.test_block(leaf, lo, hi, idx=idx)
        for _ in range(4):
            if self.low or block.w is None or block.trunc is None or block.share <= 0.25 or block.rounding >= 0.5:
                break
            # The same direction, a tenth as long: the truncation of d (∝ t³) shrinks 1000x, a bug's part
            # (∝ t) only 10x. A truncation that does not shrink at least 100x is not the cubic term (the
            # function is not smooth on that scale): keep the coarser judgment.
            finer = self.test_block(leaf, lo, hi, idx=idx, w=block.w / 10, scale=block.scale / 10)
            if finer.trunc is None or max(finer.trunc) > max(block.trunc) / 100:
                break
            block = finer
        return block

    def test_block(self, leaf: int, lo: int, hi: int, g_full: torch.Tensor | None = None,
                   idx: torch.Tensor | None = None, scale: float = 1.0, w: torch.Tensor | None = None) -> _Block:
        """One projection of elements ``lo:hi`` (or of the indices ``idx``, e.g. ``lo:hi`` less the elements
        already known to be non-differentiable); ``g_full`` (K, n) replaces the analytic rows (a hypothesis);
        ``w``, when given, is the direction (``scale``: its length relative to the elements' steps)."""
        x = self.p.leaves[leaf].value
        sel: slice | torch.Tensor = slice(lo, hi) if idx is None else idx
        if w is None:
            w = self._direction(leaf, sel) * scale
        points = [x - 2 * w, x - w, x + w, x + 2 * w]
        fm2, fm1, fp1, fp2 = self._evaluate_at(leaf, points)
        if not self.low:
            phi = (torch.stack([fm2, fm1, fp1, fp2]) @ self.u_matrix.T).tolist()  # (4, K)
            num1 = [phi[2][k] - phi[1][k] for k in range(_K)]
            num2 = [phi[3][k] - phi[0][k] for k in range(_K)]
            block = replace(self._judge(leaf, lo, hi, sel, w, num1, num2, terms=1, g_full=g_full), scale=scale)
            return block if g_full is None else replace(block, w=None, num1=None, num2=None)
        dx1 = (points[2] - points[1])[sel]
        dx2 = (points[3] - points[0])[sel]
        # One matrix product per side for all cotangents: phi[t, k] = u_kᵀ f(x + t w).
        phi = (torch.stack([fm2, fm1, self.f0, fp1, fp2]) @ self.u_matrix.T).tolist()  # (5, K)
        g = (self.g_matrix[leaf] if g_full is None else g_full)[:, sel]  # (K, b)
        user = self.atol * self.u_norms[:, None] + self.rtol * g.abs()
        analytic_scale = (g * dx1).norm(dim=1) if self.low else g.abs() @ dx1.abs()
        sides = torch.stack([g @ dx1, g @ dx2, analytic_scale, (dx1 * user).norm(dim=1)]).tolist()  # (4, K)
        noise = self._projection_noise([fm2, fm1, fp1, fp2], whole=dx1.numel() == x.numel())
        ratio, score, suspicious = 0.0, 0.0, False
        norm = float(dx1.norm())
        for k in range(_K):
            d1 = (phi[3][k] - phi[1][k]) - sides[0][k]
            d2 = (phi[4][k] - phi[0][k]) - sides[1][k]
            # d(t) = b·t + c·t³ (+ noise): c from the two steps is the truncation, b a bug.
            trunc = abs(d2 - 2 * d1) / 6
            linear = abs(8 * d1 - d2) / 6
            around = _KAPPA * self.eps_work * sides[2][k]
            stat = abs(d1)
            if self.low:
                # Lower precision: the step is long (ε^(1/3) = 4.9e-3 in float32) and the truncation of a
                # block, summed over its elements, would swamp one wrong element. Richardson's linear part
                # b = (8 d₁ − d₂) / 6 is free of the cubic term and is the bug itself; its noise is √65/6 of d's.
                stat = linear
                tol = _C * (1.5 * noise[k] + around + 0.05 * trunc) + _STAT_T * sides[3][k]
            else:
                tol = _C * (trunc + noise[k] + around) + _STAT_T * sides[3][k]
            r = stat / tol if tol > 0 else (0.0 if stat == 0 else math.inf)
            if not math.isfinite(d1):
                r = math.inf
            # The tolerance is only as good as the model: truncation well above the noise but a
            # "bug" part larger still is not cubic (a jump gives d₂ ≈ d₁, a step longer than the
            # function's scale anything): do not pass such a block, split it.
            if trunc > 4 * (noise[k] + around) and linear > trunc:
                suspicious = True
            ratio = max(ratio, r)
            score = max(score, stat / norm if norm > 0 and math.isfinite(d1) else math.inf)
        return _Block(leaf, lo, hi, ratio, score, suspicious)

    def _judge(self, leaf: int, lo: int, hi: int, sel: slice | torch.Tensor, w: torch.Tensor, num1: list[float],
               num2: list[float] | None, *, terms: int, trunc: list[float] | None = None,
               g_full: torch.Tensor | None = None) -> _Block:
        """The float64 statistic of a block from its numeric sides ``num1 = uᵀ(f(x + w) − f(x − w))`` and
        ``num2`` (at 2w; None: two calls only, the truncation ``trunc`` inherited from a parent whose
        function was smooth). ``terms`` measured projections summed: the rounding noise grows as √terms."""
        x = self.p.leaves[leaf].value
        xs, ws = x[sel], w[sel]  # (b,)
        dx1 = (xs + ws) - (xs - ws)  # exact float64 differences of the points: rounding of the step is moot
        dx2 = (xs + 2 * ws) - (xs - 2 * ws)
        g = (self.g_matrix[leaf] if g_full is None else g_full)[:, sel]  # (K, b)
        user = self.atol * self.u_norms[:, None] + self.rtol * g.abs()
        sides = torch.stack([g @ dx1, g @ dx2, g.abs() @ dx1.abs(), (dx1 * user).norm(dim=1)]).tolist()  # (4, K)
        ratio, score, suspicious, share, rounding = 0.0, 0.0, False, 0.0, 0.0
        norm = float(dx1.norm())
        truncs: list[float] = []
        for k in range(_K):
            noise = self.noise[k] * math.sqrt(terms)
            d1 = num1[k] - sides[0][k]
            around = _KAPPA * self.eps_work * sides[2][k]
            if num2 is not None:
                d2 = num2[k] - sides[1][k]
                # d(t) = b·t + c·t³ (+ noise): c from the two steps is the truncation, b a bug.
                t = abs(d2 - 2 * d1) / 6
                linear = abs(8 * d1 - d2) / 6
                # The tolerance is only as good as the model: truncation well above the noise but a
                # "bug" part larger still is not cubic (a jump gives d₂ ≈ d₁, a step longer than the
                # function's scale anything): do not pass such a block, split it.
                if t > 4 * (noise + around) and linear > t:
                    suspicious = True
            else:
                t = trunc[k] if trunc is not None else math.inf
            truncs.append(t)
            tol = _C * (t + noise + around) + _STAT_T * sides[3][k]
            if tol > 0 and math.isfinite(t):
                share = max(share, _C * t / tol)
            rounding = max(rounding, (noise + around) / t if t > 0 else math.inf)
            stat = abs(d1)
            r = stat / tol if tol > 0 else (0.0 if stat == 0 else math.inf)
            if not math.isfinite(d1):
                r = math.inf
            ratio = max(ratio, r)
            score = max(score, stat / norm if norm > 0 and math.isfinite(d1) else math.inf)
        size = int(xs.numel())
        return _Block(leaf, lo, hi, ratio, score, suspicious, w=w, num1=num1, num2=num2, trunc=truncs, terms=terms,
                      size=size, two_call=num2 is None, share=share, rounding=rounding)

    def smooth(self, block: _Block) -> bool:
        """Did the block show the function smooth (truncation within the rounding noise, no jump)? Then its
        halves are tested with two calls (x ± w), the truncation taken from it."""
        return (not block.suspicious and block.trunc is not None
                and all(t <= self.noise[k] for k, t in enumerate(block.trunc)))

    def can_split(self, leaf: int, parent: _Block, size: int) -> bool:
        """Can ``split`` halve this block? Float64 only, a block measured along its own direction whose
        elements are still all there (a kink found since leaves the sum), and four-call sides to
        subtract unless two calls are allowed."""
        if self.low or parent.w is None or parent.num1 is None or parent.size != size:
            return False
        if parent.num2 is not None:
            return True
        return parent.trunc is not None and self.smooth(parent) and self.two_call_ok.get(leaf, True)

    def split(self, leaf: int, parent: _Block, halves: list[tuple[int, int, torch.Tensor | None]]) -> list[_Block]:
        """Both halves of a failing float64 block for the calls of one: the first is measured along the
        parent's own direction restricted to it, the second is the parent less the first. The numeric
        sides add up exactly (same points on each element), the analytic ones too, and what the second
        half's inferred sides miss is the cubic cross terms, which its truncation estimate from the two
        steps sees as any truncation. Two calls when the parent was smooth, else four."""
        x = self.p.leaves[leaf].value
        assert parent.w is not None and parent.num1 is not None
        sels: list[slice | torch.Tensor] = [slice(lo, hi) if sub is None else sub for lo, hi, sub in halves]
        w_first = torch.zeros_like(x)
        w_first[sels[0]] = parent.w[sels[0]]
        w_second = torch.zeros_like(x)
        w_second[sels[1]] = parent.w[sels[1]]
        two = self.smooth(parent) and self.two_call_ok.get(leaf, True)
        steps = (-1.0, 1.0) if two else (-2.0, -1.0, 1.0, 2.0)
        evals = self._evaluate_at(leaf, [x + t * w_first for t in steps])
        phi = (torch.stack(evals) @ self.u_matrix.T).tolist()  # (len(steps), K)
        if two:
            num1 = [phi[1][k] - phi[0][k] for k in range(_K)]
            num2 = None
        else:
            num1 = [phi[2][k] - phi[1][k] for k in range(_K)]
            num2 = [phi[3][k] - phi[0][k] for k in range(_K)]
        rest1 = [parent.num1[k] - num1[k] for k in range(_K)]
        rest2 = (None if num2 is None or parent.num2 is None else [parent.num2[k] - num2[k] for k in range(_K)])
        trunc = parent.trunc if two else None
        (lo1, hi1, _), (lo2, hi2, _) = halves
        first = self._judge(leaf, lo1, hi1, sels[0], w_first, num1, num2, terms=1, trunc=trunc)
        second = self._judge(leaf, lo2, hi2, sels[1], w_second, rest1, rest2, terms=parent.terms + 1,
                             trunc=trunc if rest2 is None else None)
        return [replace(first, scale=parent.scale), replace(second, scale=parent.scale)]

    # -- one element ---------------------------------------------------------------------------

    def _at(self, leaf: int, i: int, delta: float) -> tuple[torch.Tensor, float]:
        """Outputs with element ``i`` moved by ``delta``, and the element's value there."""
        pt = self.p.leaves[leaf].value.clone()
        pt[i] = pt[i] + delta
        vals = list(self.p.base_values())
        vals[leaf] = pt
        return self.p.evaluate(vals), float(pt[i])

    def check_element(self, leaf: int, i: int) -> WorstElement | None:
        """The element's Jacobian column; None when it passes after all (the block failed by chance,
        or its error estimate was suspicious and the element is fine)."""
        x = self.p.leaves[leaf].value
        self.last_ratio = math.inf
        h = float(self.steps[leaf][i])
        (fm2, xm2), (fm1, xm1), (fp1, xp1), (fp2, xp2) = (self._at(leaf, i, t * h) for t in (-2.0, -1.0, 1.0, 2.0))
        xi = float(x[i])
        sigma = self._sigma(fm2, fm1, fp1, fp2)  # (m,)
        jump = self._jump(leaf, i, h, xi, fm2, fm1, fp1, fp2, sigma)
        if jump is not None:
            return jump
        col1 = (fp1 - fm1) / (xp1 - xm1)  # (m,)
        col2 = (fp2 - fm2) / (xp2 - xm2)
        noise = sigma / (xp1 - xm1)
        trunc = (col2 - col1).abs() / 3
        est = trunc + noise  # (m,) error estimate of col1; col2's is 4·trunc + noise/2
        est2 = 4 * trunc + sigma / (xp2 - xm2)
        # A wrong backward is off by the same amount at steps h and 2h; noise is not, truncation is
        # in the estimate: the element fails only if both steps disagree with the analytic value.
        r1 = self._ratio(leaf, i, col1, est, noise)
        r2 = self._ratio(leaf, i, col2, est2, sigma / (xp2 - xm2))
        # Steps h and 2h that disagree by more than 1% have not converged (the function varies on
        # a scale shorter than the step, sin(x²) at large x): their truncation estimate is then a
        # tolerance loose enough to hide a bug of several percent, so refine before judging, pass or
        # fail (or a kink: the central differences at a kink converge, to the mean of the two slopes).
        # So have steps whose "noise" (measured by the probe, or the function varying at a finer scale
        # still) is a tenth of the column or more, where outputs change at all: agreement within it proves nothing.
        scale = torch.maximum(col1.abs(), col2.abs())
        changed = ((fp1 != fm1) | (fp2 != fm2)).to(noise.dtype)
        u = self.cotangents[0].abs()
        # And so do steps whose truncation estimate is most of the tolerance (over 3x the rounding): steps
        # h and 2h may agree to 1%, yet 8x their difference would pass a bug of a few percent.
        if (not bool(((col2 - col1).abs() <= 0.01 * scale + _C * (noise + sigma / (xp2 - xm2))).all())
                or float(u @ (noise * changed)) > 0.1 * float(u @ col1.abs())
                or float(u @ trunc) > 3 * float(u @ noise)):
            return self._refine(leaf, i, h, col1, noise)
        self.last_ratio = min(r1, r2)
        if self.last_ratio <= 1:
            return None
        j = self._worst_output(leaf, i, col1, est)
        a = float(self._exact_row(j)[leaf][i])
        # One-sided slopes: a kink keeps its jump when the step doubles; curvature would double it.
        f0 = float(self.f0[j])
        right1, left1 = (float(fp1[j]) - f0) / (xp1 - xi), (f0 - float(fm1[j])) / (xi - xm1)
        right2, left2 = (float(fp2[j]) - f0) / (xp2 - xi), (f0 - float(fm2[j])) / (xi - xm2)
        jump1, jump2 = right1 - left1, right2 - left2
        one_sided_noise = 4 * float(noise[j])
        err1 = abs(a - float(col1[j]))
        if abs(jump1) > max(err1 / 2, _C * one_sided_noise) and abs(jump2) < 1.5 * abs(jump1):
            lo_s, hi_s = min(left1, right1), max(left1, right1)
            slack = _C * one_sided_noise + self.atol + self.rtol * max(abs(lo_s), abs(hi_s))
            if lo_s - slack <= a <= hi_s + slack:
                return self._element(leaf, i, j, a, float(col1[j]), float(est[j]), "kink", h,
                                     left_slope=left1, right_slope=right1)
        return self._element(leaf, i, j, a, float(col1[j]), float(est[j]), "wrong", h)


    def _sigma(self, *evaluations: torch.Tensor) -> torch.Tensor:
        """Rounding noise of a central difference per output (√2 of one value's); in lower precision only the
        outputs that moved carry it at the full floor, the others at one ε (what a tiny derivative could hide)."""
        if not self.low:
            return math.sqrt(2) * torch.maximum(self.sigma, _KAPPA * self.eps_work * self.abs_f0)
        full = self.low_floor
        moved = torch.zeros_like(self.f0, dtype=torch.bool)
        for f in evaluations:
            moved |= f != self.f0
        return math.sqrt(2) * torch.where(moved, full, self.eps_work * self.abs_f0)

    def _failing(self, leaf: int, i: int, col: torch.Tensor, est: torch.Tensor,
                 noise: torch.Tensor | None = None) -> bool:
        """Does the column ``col`` (error estimate ``est``, of which ``noise`` is rounding) disagree with the
        analytic rows? In lower precision the rounding part adds in quadrature over the outputs."""
        return self._ratio(leaf, i, col, est, noise) > 1

    def _ratio(self, leaf: int, i: int, col: torch.Tensor, est: torch.Tensor,
               noise: torch.Tensor | None = None) -> float:
        """The largest ``|analytic − numeric| / tolerance`` of the column over the cotangents (inf: non-finite)."""
        worst = 0.0
        for u, row in zip(self.cotangents, self.rows, strict=True):
            a = float(row[leaf][i])
            slack = _STAT_T * (self.atol * float(u.norm()) + self.rtol * float(u.abs() @ col.abs()))
            around = _KAPPA * self.eps_work * abs(a)
            if self.low and noise is not None:
                budget = float(u.abs() @ (est - noise).clamp(min=0)) + float((u * noise).norm())
            else:
                budget = float(u.abs() @ est)
            err, tol = abs(a - float(u @ col)), _C * (budget + around) + slack
            if not (math.isfinite(a) and math.isfinite(err)):
                return math.inf
            worst = max(worst, err / tol if tol > 0 else (0.0 if err == 0 else math.inf))
        return worst

    def _refine(self, leaf: int, i: int, h: float, col: torch.Tensor, noise: torch.Tensor) -> WorstElement | None:
        """Central differences at h/10, h/100, ... until three successive columns agree (then judge the
        analytic value against the finest) or rounding dominates (then the element is unresolved)."""
        prev, prev_noise = col, noise
        u = self.cotangents[0].abs()
        step, last, last_step = h, col, h
        agreed = False  # converged means three successive steps agree: two agreeing by chance is not rare
        for _ in range(8):
            step /= 10
            (fp, xp), (fm, xm) = self._at(leaf, i, step), self._at(leaf, i, -step)
            if xp == xm:
                break
            cur = (fp - fm) / (xp - xm)
            cur_noise = self._sigma(fp, fm) / (xp - xm)
            last, last_step = cur, step
            if float(u @ (cur_noise * (fp != fm).to(cur.dtype))) > 0.1 * float(u @ cur.abs()):
                break  # rounding dominates from here on: agreement within the noise would prove nothing
            diff = (cur - prev).abs()
            agrees = bool((diff <= 0.01 * torch.maximum(cur.abs(), prev.abs()) + _C * (cur_noise + prev_noise)).all())
            if agrees and agreed:
                est = diff / 99 + cur_noise  # Richardson: the error of the finer step is 1/99 of the change
                self.last_ratio = self._ratio(leaf, i, cur, est, cur_noise)
                if self.last_ratio <= 1:
                    self.refined[leaf] = self.refined.get(leaf, 0) + 1
                    self.refined_step[leaf] = min(self.refined_step.get(leaf, math.inf), step)
                    return None
                j = self._worst_output(leaf, i, cur, est)
                return self._element(leaf, i, j, float(self._exact_row(j)[leaf][i]), float(cur[j]), float(est[j]),
                                     "wrong", step)
            agreed = agrees
            prev, prev_noise = cur, cur_noise
        j = self._worst_output(leaf, i, col, noise + (col - last).abs())
        return self._element(leaf, i, j, float(self._exact_row(j)[leaf][i]), float(col[j]), math.inf,
                             "unresolved", h, finest=float(last[j]), finest_step=last_step)

    def _jump(self, leaf: int, i: int, h: float, xi: float, fm2: torch.Tensor, fm1: torch.Tensor, fp1: torch.Tensor,
              fp2: torch.Tensor, sigma: torch.Tensor) -> WorstElement | None:
        """A jump discontinuity at the element: a one-sided change that does not shrink with the step
        (smooth: f(x+2h) − f(x) ≈ 2·(f(x+h) − f(x)); a jump: ≈ the same), confirmed at h/10."""
        floor = 4 * _C * sigma
        f0 = self.f0

        def flat(d1: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
            return (d1.abs() > floor) & ((d2 - d1).abs() < 0.5 * d1.abs())

        right, left = flat(fp1 - f0, fp2 - f0), flat(f0 - fm1, f0 - fm2)
        if not bool((right | left).any()):
            return None
        # A jump keeps its size however small the step; a function that merely varies faster than the
        # step (where d(2h) ≈ d(h) by chance) does not, once the step resolves it: confirm down to h/10⁵.
        up_r, up_l = fp1 - f0, f0 - fm1
        step = h
        for _ in range(5):
            step /= 10
            (fps, xps), (fms, xms) = self._at(leaf, i, step), self._at(leaf, i, -step)
            right &= flat(fps - f0, up_r)
            left &= flat(f0 - fms, up_l)
            if not bool((right | left).any()):
                return None
            up_r, up_l = fps - f0, f0 - fms
        found = right | left
        size = torch.where(found, (fps - fms).abs(), torch.zeros_like(f0))
        j = int(torch.argmax(size))
        a = float(self._exact_row(j)[leaf][i])
        numeric = float((fps[j] - fms[j]) / (xps - xms))
        return self._element(leaf, i, j, a, numeric, math.inf, "jump", step,
                             left_slope=float(f0[j] - fms[j]) / (xi - xms),
                             right_slope=float(fps[j] - f0[j]) / (xps - xi), jump=float(fps[j] - fms[j]))

    def _element(self, leaf: int, i: int, j: int, a: float, n: float, est: float, kind: ElementKind, step: float,
                 **extra: float) -> WorstElement:
        scale = abs(a) if math.isfinite(a) else 0.0  # a NaN analytic value: the tolerance is the numeric side's
        tol = _C * (est + _KAPPA * self.eps_work * scale) + self.atol + self.rtol * abs(n)
        err = abs(a - n)
        denom = max(abs(a), abs(n))
        rel = err / denom if denom > 0 else (0.0 if err == 0 else math.inf)
        out_tensor, out_index = self._output_index(j)
        return WorstElement(element=_unravel(i, self.p.leaves[leaf].shape), output=out_index, analytic=a + 0.0,
                            numeric=n + 0.0, abs_error=err, rel_error=rel, kind=kind, output_tensor=out_tensor,
                            tolerance=tol, step=step, **extra)

    def _exact_row(self, j: int) -> list[torch.Tensor]:
        e = torch.zeros_like(self.f0)
        e[j] = 1.0
        return self.a.row(e, key=("row", j))

    def _worst_output(self, leaf: int, i: int, col: torch.Tensor, est: torch.Tensor) -> int:
        m = col.numel()
        if m == 1:
            return 0
        if m <= _ROWS_DIRECT:
            analytic = torch.stack([self._exact_row(j)[leaf][i] for j in range(m)])
            ratio = (analytic - col).abs() / (_C * est + self.atol + self.rtol * col.abs() + 1e-300)
            bad = ~torch.isfinite(analytic)
            if bool(bad.any()):  # a NaN or Inf of the backward: the output where the function moves most
                return int(torch.argmax(torch.where(bad, col.abs(), torch.full_like(col, -1.0))))
            ratio = torch.nan_to_num(ratio, nan=math.inf)
            return int(torch.argmax(ratio))
        # Bisection over outputs with random weights r: cotangent r on a range gives, for every
        # element at once, Σ_{j in range} r_j J_ji; the other half is the parent minus this one.
        r = self.cotangents[0]
        lo, hi = 0, m
        total = float(self.rows[0][leaf][i])
        while hi - lo > 1:
            mid = (lo + hi) // 2
            c = torch.zeros_like(r)
            c[lo:mid] = r[lo:mid]
            left = float(self.a.row(c, key=("range", lo, mid))[leaf][i])
            right = total - left
            scale_l = float(r[lo:mid].abs() @ est[lo:mid]) + 1e-300
            scale_r = float(r[mid:hi].abs() @ est[mid:hi]) + 1e-300
            err_l = abs(left - float(r[lo:mid] @ col[lo:mid])) / scale_l
            err_r = abs(right - float(r[mid:hi] @ col[mid:hi])) / scale_r
            if not math.isfinite(left) and not math.isfinite(right):
                # A NaN of the backward reaches every range (0 · NaN): follow the numeric column, the output
                # whose entry it is (the diagonal of an elementwise function), not a zero off it.
                go_left = float(col[lo:mid].abs().max()) >= float(col[mid:hi].abs().max())
            elif not math.isfinite(left) or not math.isfinite(right):  # a NaN analytic entry: follow it
                go_left = not math.isfinite(left)
            else:
                go_left = not (err_l < err_r)
            if go_left:
                hi, total = mid, left
            else:
                lo, total = mid, right
        return lo

    def _output_index(self, j: int) -> tuple[int, list[int]]:
        start = 0
        for t, (size, shape) in enumerate(zip(self.a.sizes, self.a.out_shapes, strict=True)):
            if j < start + size:
                return t, _unravel(j - start, shape)
            start += size
        return 0, [j]


def _unravel(i: int, shape: tuple[int, ...]) -> list[int]:
    index = []
    for dim in reversed(shape):
        index.append(i % dim)
        i //= dim
    return list(reversed(index))


# ----------------------------------------------------------------------------------------------
# The public function


def gradcheck(fn: Callable[..., Any] | torch.nn.Module, *inputs: Any, eps: float | None = None, atol: float = 0.0,
              rtol: float | None = None, seed: int = 0, max_reported: int = 5, max_evaluations: int = 4000,
              raise_on_failure: bool = False) -> GradcheckResult:
    """Check the backward of ``fn`` at ``inputs`` against central finite differences in float64.

    Every floating input with ``requires_grad`` is checked (and, for an ``nn.Module``, every
    parameter that requires grad, named by its parameter name), on float64 copies: neither the
    inputs nor the module are modified. The check screens each tensor with random projections
    (a few forward calls for a tensor that passes) and localises a failure to its elements, so a
    backward that is wrong in one element of thousands is found, with the element, the output, the
    analytic and numeric values, and a likely cause.

    Args:
        fn: a callable or an ``nn.Module`` taking ``inputs`` positionally and returning a tensor or
            nested tuples, lists, dicts or namedtuples of tensors. Integer outputs and None are ignored.
        *inputs: its positional arguments; tensors that are not floating or lack ``requires_grad``
            are passed as constants.
        eps: the relative step: element ``i`` moves by ``eps · max(|x_i|, mean|x| / 10)``. Default
            ``ε^(1/3)`` of the working precision (6.1e-6 in float64; 4.9e-3 when the function
            computes in float32 inside).
        atol: absolute slack added to every Jacobian entry's tolerance (default 0: the tolerance is
            the estimated finite-difference error alone).
        rtol: relative slack, times ``|numeric|``. Default 1e-7 in float64, ``√ε`` of the working
            precision's ε when the function computes in lower precision (1e-6 in float32).
        seed: seeds the random projections and every call of ``fn`` (the RNG is restored after).
        max_reported: stop localising a tensor after this many bad elements.
        max_evaluations: budget of forward calls, all of them counted (``evaluations``). A check needs
            at least its set-up calls (some 11) plus 4 per checked tensor; a smaller value is refused
            (``UsageError``). Localisation stops starting new steps once the budget is spent (the last
            step, an element's column with its refinement, may finish up to a few dozen calls past it);
            what is left unchecked is reported (verdict ``unreliable`` or ``fail``).
        raise_on_failure: raise :class:`GradcheckError` (an ``AssertionError``) with the report.

    Returns:
        A :class:`GradcheckResult`, true when it passed; ``print(result)`` shows the report.

    Raises:
        UsageError: nothing to check (no floating input with ``requires_grad``), an output that is
            not a tensor, a non-finite output at the inputs, or ``fn`` (or its backward) raised.

    Example:
        >>> import torch, floatscope
        >>> x = torch.randn(8, dtype=torch.float64, requires_grad=True)
        >>> bool(floatscope.gradcheck(torch.tanh, x))
        True
    """
    if max_reported < 1:
        raise UsageError(f"max_reported={max_reported}: report at least one element (max_reported=1)")
    if eps is not None and not (0 < eps < 1):
        raise UsageError(f"eps={eps} must be a relative step in (0, 1), e.g. 1e-6")
    if atol < 0 or (rtol is not None and rtol < 0):
        raise UsageError(f"atol={atol} and rtol={rtol} must be non-negative")
    if not callable(fn):
        raise UsageError(f"gradcheck's first argument must be a callable or an nn.Module, not {type(fn).__name__}")
    start = time.perf_counter()
    problem = _Problem(fn, inputs, seed=seed)
    notes = problem.notes

    # Prologue: precision scan (with an in-place check), determinism, random draws.
    base = problem.base_values()
    shaped = [v.reshape(leaf.shape).clone() for v, leaf in zip(base, problem.leaves, strict=True)]
    scan = _DtypeScan()
    with torch.no_grad(), problem._rng(), scan:
        outs0 = problem.outputs(problem.raw_call(shaped))
    mutated = [k for k, (s, v) in enumerate(zip(shaped, base, strict=True)) if not torch.equal(s.reshape(-1), v)]
    f0 = torch.cat([o.detach().reshape(-1).to(torch.float64) for o in outs0])
    if not bool(torch.isfinite(f0).all()):
        bad = int((~torch.isfinite(f0)).sum())
        raise UsageError(f"{problem.fn_name} returns {bad} non-finite value{'s' if bad != 1 else ''} at these inputs; "
                         f"finite differences need a point where the function is finite (floatscope.locate finds "
                         f"where a NaN or Inf is born)")
    with torch.no_grad(), problem._rng():
        f1 = torch.cat([o.detach().reshape(-1).to(torch.float64) for o in problem.outputs(problem.raw_call(base_shaped(problem)))])
        f2 = torch.cat([o.detach().reshape(-1).to(torch.float64) for o in problem.outputs(problem.raw_call(base_shaped(problem)))])
    eps_work = torch.finfo(torch.float64).eps
    working = torch.float64
    if scan.lowest is not None:
        working = scan.lowest
        eps_work = torch.finfo(scan.lowest).eps
        op, where = scan.first or ("?", "")
        notes.append(f"{problem.fn_name} computes in {str(scan.lowest).replace('torch.', '')} inside although its "
                     f"inputs are float64 (first: {op}{' at ' + where if where else ''}); the check used steps and "
                     f"tolerances for {str(scan.lowest).replace('torch.', '')} (relative step "
                     f"{(eps if eps is not None else eps_work ** (1 / 3)):.2g}), so it only sees larger errors (in float32, "
                     f"measured: one element wrong by 0.3% of 100, by 3% of 4,096); cast inside the function only "
                     f"where needed")
    # Lower precision: the rounding is estimated (noise probe, outputs that moved, in quadrature); the slack
    # only covers what that misses. A larger one, summed over a block, would hide one wrong element of many.
    rtol_eff = rtol if rtol is not None else (1e-7 if working == torch.float64 else _LOW_RTOL * eps_work)
    low = [leaf for leaf in problem.leaves if torch.finfo(leaf.orig_dtype).eps > torch.finfo(torch.float64).eps]
    for dtype in sorted({leaf.orig_dtype for leaf in low}, key=str):
        fin = torch.finfo(dtype)
        name = str(dtype).replace("torch.", "")
        labels = [_label(leaf) for leaf in low if leaf.orig_dtype == dtype]
        shown = ", ".join(labels[:4]) + (f" and {len(labels) - 4} more" if len(labels) > 4 else "")
        notes.append(f"{shown} {'is' if len(labels) == 1 else 'are'} {name}: checked in float64 copies; finite "
                     f"differences in {name} would have been unreliable (the best step, ~{fin.eps ** (1 / 3):.1g}·|x|, "
                     f"leaves an error of ~{fin.eps ** (2 / 3):.1g} relative, larger than many gradient bugs)")
    spread = float((f1 - f0).abs().max()) if f1.shape == f0.shape and f0.numel() else (0.0 if f1.shape == f0.shape
                                                                                         else math.inf)
    if not torch.equal(f0, f1):
        notes.append(f"two calls at the same point with the same seed differ by up to {spread:.3g} (largest output "
                     f"{float(f0.abs().max()):.3g}): {problem.fn_name} is not deterministic, so finite differences are "
                     f"only as good as that noise")
    elif not torch.equal(f1, f2):
        notes.append(f"{problem.fn_name} draws random numbers (two unseeded calls differ, e.g. dropout): every "
                     f"evaluation used the same seed ({seed}), so the same draws; call model.eval() to check without them")
    nondeterministic = not torch.equal(f0, f1)
    if problem.ignored_outputs:
        shown = ", ".join(problem.ignored_outputs[:4]) + (f" and {len(problem.ignored_outputs) - 4} more"
                                                          if len(problem.ignored_outputs) > 4 else "")
        notes.append(f"{shown} of {problem.fn_name} {'is' if len(problem.ignored_outputs) == 1 else 'are'} not floating "
                     f"tensors: ignored (no gradient flows through them)")
    empty = [leaf for leaf in problem.leaves if leaf.value.numel() == 0]
    if empty:
        notes.append(f"{', '.join(f'{_label(leaf)} {tuple(leaf.shape)}' for leaf in empty)} "
                     f"{'has' if len(empty) == 1 else 'have'} no elements: nothing to check there (passed)")

    checks: list[InputCheck] = []
    if f0.numel() == 0:
        notes.append(f"{problem.fn_name} returns only empty tensors: there is no derivative to check (passed)")
        checks = [InputCheck(index=leaf.index, name=leaf.name, passed=True, worst=[], verdict="pass", cause="",
                             kind=leaf.kind, shape=list(leaf.shape), dtype=str(leaf.orig_dtype))
                  for leaf in problem.leaves]
    else:
        generator = torch.Generator().manual_seed(seed)
        analytic = _Analytic(problem)
        if analytic.mutated and not mutated:
            names = ", ".join(_label(problem.leaves[k]) for k in analytic.mutated)
            notes.append(f"{problem.fn_name} modifies {names} in place when gradients are enabled")
        checker = _Checker(problem, analytic, eps=eps, atol=atol, rtol=rtol_eff, eps_work=eps_work,
                           generator=generator)
        unreliable = nondeterministic and spread > math.sqrt(eps_work) * max(float(f0.abs().max()), 1e-300)
        screened = [k for k, leaf in enumerate(problem.leaves) if leaf.value.numel()]
        need = problem.evaluations + 4 * len(screened)
        if max_evaluations < need:
            raise UsageError(f"max_evaluations={max_evaluations} is below the {need} forward calls this check needs "
                             f"({problem.evaluations} to set up, 4 to screen each of {_count(len(screened), 'checked tensor')}); "
                             f"use max_evaluations={need} or more (--max-evaluations)")
        for k, leaf in enumerate(problem.leaves):
            # The screening of the tensors still to come is reserved out of the budget.
            budget_end = max_evaluations - 4 * sum(1 for j in screened if j > k)
            checks.append(_check_leaf(checker, k, leaf, max_reported=max_reported, budget_end=budget_end,
                                      unreliable=unreliable, analytic=analytic))
        checks = _mix_ups(checker, checks, budget_end=max_evaluations)
        for k, count in checker.refined.items():
            notes.append(f"{_label(problem.leaves[k])}: at the default step the finite differences of "
                         f"{_count(count, 'element')} had not converged ({problem.fn_name} varies faster than the "
                         f"step there); refined down to a step of {checker.refined_step[k]:.2g} they agree with the "
                         f"analytic gradient")
    labels = [_label(problem.leaves[k]) for k in mutated]
    labels += [problem.arg_labels[i] for i in sorted(problem.mutated_args)]
    if labels:
        notes.append(f"{problem.fn_name} modifies {', '.join(labels)} in place: the caller's tensor would change on "
                     f"every call (and a custom autograd.Function that does so must call ctx.mark_dirty); the check "
                     f"gave every call a fresh copy, so your tensors are unchanged")
    passed = all(c.passed for c in checks)
    result = GradcheckResult(passed=passed, seconds=time.perf_counter() - start, inputs=checks,
                             evaluations=problem.evaluations, backward_passes=problem.backward_passes,
                             working_dtype=str(working), notes=notes)
    if raise_on_failure and not passed:
        raise GradcheckError(result)
    return result


def base_shaped(problem: _Problem) -> list[torch.Tensor]:
    return [v.reshape(leaf.shape).clone() for v, leaf in zip(problem.base_values(), problem.leaves, strict=True)]


def _label(leaf: _Leaf) -> str:
    return f"{leaf.kind} {leaf.index}" + (f" '{leaf.name}'" if leaf.name else "")


def _candidates(x: torch.Tensor) -> torch.Tensor:
    """Indices of the elements where kinks and jumps live: exact integers (0 above all: relu, abs, x > 0,
    floor) and ties (max, sort, clamp at equal values). Random inputs have none; inputs after a relu
    or zero padding have many, and checking each one alone would cost a column apiece."""
    special = x == torch.round(x)
    if x.numel() > 1:
        values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
        special |= counts[inverse] > 1
    return special.nonzero().flatten()


def _check_leaf(checker: _Checker, k: int, leaf: _Leaf, *, max_reported: int, budget_end: int, unreliable: bool,
                analytic: _Analytic) -> InputCheck:
    problem = checker.p
    n = leaf.value.numel()
    found: list[WorstElement] = []
    # max_ratio: the largest ratio of the judgments that stand (blocks that passed, elements cleared by their
    # column); a tensor passes only if every one is ≤ 1. screen_max: of every projection, failing ones too.
    max_ratio = screen_max = 0.0
    heap: list[tuple[float, int, int, _Block]] = []
    counter = 0
    # Elements at exact integers or ties are screened apart, as groups (below): a kink or jump among the
    # others' projections would fail every block that holds one, and bisecting to each costs log n blocks.
    candidates = _candidates(leaf.value) if n else torch.zeros(0, dtype=torch.long)
    excluded = torch.zeros(n, dtype=torch.bool)
    excluded[candidates] = True
    group_kinks = group_jumps = 0
    unchecked: list[int] = []

    def rest(lo: int, hi: int) -> torch.Tensor | None:
        if not bool(excluded[lo:hi].any()):
            return None
        return torch.arange(lo, hi)[~excluded[lo:hi]]

    def push(block: _Block) -> None:
        nonlocal counter, max_ratio, screen_max
        screen_max = max(screen_max, block.ratio)
        if block.open:
            counter += 1
            heapq.heappush(heap, (-block.score, block.hi - block.lo, counter, block))
        else:
            max_ratio = max(max_ratio, block.ratio)

    def cleared() -> None:
        nonlocal max_ratio
        max_ratio = max(max_ratio, checker.last_ratio)

    wrong = 0
    # The candidates, as groups: smooth there (central differences agree), or non-differentiable with the
    # analytic gradient a one-sided slope (relu at 0 from the left, x > 0 at 0 from the left); a group
    # that fits neither is split, down to single elements checked one by one.
    groups = [candidates] if candidates.numel() else []
    characterised = 0
    while groups:
        if wrong >= max_reported:
            unchecked.extend(int(i) for g in groups for i in g)
            break
        if problem.evaluations >= budget_end:
            unchecked.extend(int(i) for g in groups for i in g)
            break
        group = groups.pop()
        if group.numel() == 1:
            element = checker.check_element(k, int(group[0]))
            if element is not None:
                found.append(element)
                wrong += element.kind == "wrong"
            else:
                cleared()
            continue
        central = checker.test_block(k, 0, n, idx=group)
        screen_max = max(screen_max, central.ratio)
        if not central.open:
            max_ratio = max(max_ratio, central.ratio)
            continue
        fitted = False
        for side in (-1, 1):
            ratio, _ = checker.one_sided(k, group, side)
            if ratio <= 1:
                max_ratio = max(max_ratio, ratio)
                _, flat = checker.one_sided(k, group, -side)  # the other side: a jump keeps its size
                fitted = True
                break
        if fitted:
            # Rows for the report: the first few characterised one by one (kink, jump, or wrong after all).
            shown = group[:max(0, max_reported - characterised)]
            characterised += int(shown.numel())
            for i in shown.tolist():
                element = checker.check_element(k, i)
                if element is not None:
                    found.append(element)
                    wrong += element.kind == "wrong"
                else:
                    cleared()
            group_kinks += int(group.numel() - shown.numel())
            group_jumps += int(group.numel() - shown.numel()) if flat else 0
            continue
        half = group.numel() // 2
        groups.extend([group[half:], group[:half]])
    if n and candidates.numel() < n:
        idx = rest(0, n)
        push(checker.screen(k, 0, n, idx=idx))
    # Kinks and jumps are not bugs: the search goes on past them (only the reported rows are capped).
    while heap and wrong < max_reported and problem.evaluations < budget_end:
        _, _, _, block = heapq.heappop(heap)
        idx = rest(block.lo, block.hi)
        size = block.hi - block.lo if idx is None else int(idx.numel())
        if size == 0:
            continue
        if size == 1:
            i = block.lo if idx is None else int(idx[0])
            element = checker.check_element(k, i)
            if element is None and block.two_call:
                # Two calls sent the search to a fine element: the truncation taken from the parent did not
                # hold here; the rest of this tensor's halves get all four calls.
                checker.two_call_ok[k] = False
            if element is not None:
                found.append(element)
                wrong += element.kind == "wrong"
                if element.kind in ("kink", "jump"):
                    excluded[i] = True
            else:
                cleared()
            continue
        mid = (block.lo + block.hi) // 2
        if idx is not None:  # split the remaining elements, not the range, in halves
            mid = int(idx[size // 2])
        halves = [(block.lo, mid, rest(block.lo, mid)), (mid, block.hi, rest(mid, block.hi))]
        if checker.can_split(k, block, size):
            for half in checker.split(k, block, halves):
                push(half)
            continue
        for lo, hi in ((block.lo, mid), (mid, block.hi)):
            sub = rest(lo, hi)
            if sub is not None and sub.numel() == 0:
                continue
            push(checker.screen(k, lo, hi, idx=sub))
    wrong_elems = [w for w in found if w.kind == "wrong"]
    kinks = [w for w in found if w.kind in ("kink", "jump")]
    unresolved = [w for w in found if w.kind == "unresolved"]
    failing_left = [b for _, _, _, b in heap if b.ratio > 1]
    doubtful_left = [b for _, _, _, b in heap if b.ratio <= 1]
    complete = not failing_left and not unchecked
    at_least = len(found) + len(failing_left)
    worst = sorted(wrong_elems, key=lambda w: -(w.abs_error / w.tolerance if w.tolerance > 0 else math.inf))
    worst = (worst + unresolved + kinks)[:max_reported]
    n_kinks = len(kinks) + group_kinks
    n_jumps = sum(w.kind == "jump" for w in kinks) + group_jumps
    if wrong_elems:
        verdict: Verdict = "fail"
    elif unreliable or unresolved:
        verdict = "unreliable"
    elif failing_left:
        verdict = "fail"  # blocks failed but the budget ran out before any element was localised
    elif doubtful_left or unchecked:
        verdict = "unreliable"  # the budget ran out with blocks whose error estimate did not fit
    elif n_kinks:
        verdict = "kink"
    else:
        verdict = "pass"
    if verdict in ("pass", "kink") and max_ratio > 1:
        verdict = "unreliable"  # by construction every standing judgment is ≤ 1; never pass against one
    if verdict not in ("pass", "kink"):
        max_ratio = max(max_ratio, screen_max)
    cause = _cause(checker, k, leaf, verdict, wrong_elems, kinks, not failing_left, at_least, analytic,
                   unresolved=unresolved, doubtful=len(doubtful_left), unreliable=unreliable,
                   n_kinks=n_kinks, n_jumps=n_jumps, unchecked=unchecked, budget_end=budget_end)
    return InputCheck(index=leaf.index, name=leaf.name, passed=verdict in ("pass", "kink"), worst=worst,
                      verdict=verdict, cause=cause, kind=leaf.kind, shape=list(leaf.shape), dtype=str(leaf.orig_dtype),
                      step=float(checker.steps[k].median()) if n else 0.0, bad_elements=len(wrong_elems),
                      kinks=n_kinks, bad_elements_at_least=max(at_least - len(kinks) - len(unresolved),
                                                               len(wrong_elems)),
                      complete=complete, max_ratio=max_ratio, jumps=n_jumps, unresolved=len(unresolved))


def _cause(checker: _Checker, k: int, leaf: _Leaf, verdict: Verdict, wrong: list[WorstElement],
           kinks: list[WorstElement], complete: bool, at_least: int, analytic: _Analytic, *,
           unresolved: list[WorstElement], doubtful: int, unreliable: bool, n_kinks: int = 0, n_jumps: int = 0,
           unchecked: Sequence[int] = (), budget_end: int = 0) -> str:
    problem = checker.p
    n_kinks, n_jumps = max(n_kinks, len(kinks)), max(n_jumps, sum(v.kind == "jump" for v in kinks))
    if unreliable and not wrong:
        return ("the function is not deterministic (two calls at the same point differ), beyond what finite "
                "differences can see through; make it deterministic (floatscope determinism finds the op) and check again")
    if verdict == "pass":
        return ""
    parts: list[str] = []
    if unresolved:
        w = unresolved[0]
        parts.append(f"{_count(len(unresolved), 'element')} where the finite differences never converged, so the "
                     f"gradient could not be judged (not a sign that the backward is wrong): e.g. element "
                     f"{tuple(w.element)}: numeric {_g(w.numeric)} at step {w.step:.3g}, {_g(w.finest or 0.0)} at "
                     f"{(w.finest_step or 0.0):.3g}, analytic {_g(w.analytic)}; the function varies faster than the "
                     f"step there (or rounding swamps smaller steps): check at a point where it is smoother, or "
                     f"with a smaller eps")
    if doubtful and not wrong:
        parts.append(f"the evaluation budget ran out with {_count(doubtful, 'block')} of elements whose finite-difference "
                     f"error did not behave like a smooth function's (a jump, or a step longer than the function's "
                     f"scale); raise max_evaluations or use a smaller eps")
    if unchecked:
        shown = ", ".join(str(tuple(_unravel(i, leaf.shape))) for i in list(unchecked)[:6])
        why = "localisation stopped at max_reported wrong elements"
        if problem.evaluations >= budget_end:
            why = "the evaluation budget ran out; raise max_evaluations (--max-evaluations) to check them"
        parts.append(f"{_count(len(unchecked), 'element')} at exact integers or ties (where kinks and jumps live) "
                     f"were left unchecked, e.g. {shown}{' ...' if len(unchecked) > 6 else ''}: {why}")
    if n_kinks:
        grouped = n_kinks - len(kinks)
        group_note = (f"; {grouped} of them, at exact integers or ties, were checked as groups: the analytic gradient "
                      f"is a one-sided slope there" if grouped else "")
        others = ("the other elements were checked" if complete and not unchecked else
                  "the search stopped before every element was checked")
        jumps = [v for v in kinks if v.kind == "jump"]
        if n_jumps:
            example = ""
            if jumps:
                v = jumps[0]
                example = (f" (e.g. element {tuple(v.element)}: output {tuple(v.output or [])} jumps by "
                           f"{_g(v.jump or 0.0)} between x − {v.step:.2g} and x + {v.step:.2g})")
            parts.append(f"{_count(n_jumps, 'element')} at a jump discontinuity, where no derivative exists{example}, "
                         f"as floor, round, sign or a comparison (x > 0) give at a tie; {others}; move the test "
                         f"point off the step to check the gradient there")
        if n_jumps < n_kinks:
            kinked = [v for v in kinks if v.kind == "kink"]
            example = ""
            if kinked:
                w = kinked[0]
                example = (f" (e.g. element {tuple(w.element)}: slope {_g(w.left_slope)} on the left, "
                           f"{_g(w.right_slope)} on the right, analytic {_g(w.analytic)} is a one-sided slope or "
                           f"between them)")
            parts.append(f"{_count(n_kinks - n_jumps, 'element')} at a non-differentiable point, not a bug{example}, "
                         f"as relu, abs or max at a tie give; {others}; move the test point away from it to check "
                         f"the gradient there")
        if group_note:
            parts[-1] += group_note
    if not wrong and verdict == "fail":
        parts.append(f"blocks of elements failed but the evaluation budget ran out ({problem.evaluations} calls) "
                     f"before one was localised; raise max_evaluations (--max-evaluations)")
    if wrong:
        many = "" if complete else f" (at least {at_least - len(kinks)}; localisation stopped at max_reported)"
        count = f"{len(wrong)} wrong element{'s' if len(wrong) != 1 else ''}{many}"
        ratios = [w.analytic / w.numeric for w in wrong if w.numeric != 0 and math.isfinite(w.analytic)]
        pattern = ""
        if (ratios and len(ratios) == len(wrong) and ratios[0] != 0
                and max(ratios) - min(ratios) <= 1e-6 * max(abs(r) for r in ratios)):
            pattern = (f"; the analytic value is {ratios[0]:.6g} times the numeric one in every reported element: "
                       f"{'a wrong sign' if abs(ratios[0] + 1) <= 1e-6 else 'a missing or extra factor'}"
                       if abs(ratios[0] - 1) > 1e-6 else "")
        classes = analytic.graph_functions.get(k, [])
        nonfinite = [w for w in wrong if not math.isfinite(w.analytic)]
        if nonfinite:
            w = nonfinite[0]
            culprit = (f"the backward returns {'NaN' if math.isnan(w.analytic) else 'Inf'} at element "
                       f"{tuple(w.element)} (output {tuple(w.output or [])}) where the function is finite "
                       f"(numeric {_g(w.numeric)})")
            if classes:
                culprit += (": the custom autograd.Function " + ", ".join(f"{c.__qualname__} ({_where(c)})"
                                                                          for c in classes) + " is the likely cause")
        elif all(w.analytic == 0 for w in wrong) and not any(analytic.differentiable):
            culprit = ("no output requires grad: the function cut the graph (.detach(), .data, .numpy(), .item() or "
                       "torch.no_grad()), so the analytic gradient is zero")
        elif all(w.analytic == 0 for w in wrong):
            culprit = "the analytic gradient is 0 where the function does change: "
            if classes:
                named = ", ".join(f"{c.__qualname__} ({_where(c)})" for c in classes)
                culprit += f"the backward of the custom autograd.Function {named} returns 0 (or None) there"
            else:
                culprit += ("a path is cut from the graph (.detach(), .data, .numpy(), .item(), torch.no_grad()) or a "
                            "gradient hook zeroes it")
        else:
            if classes:
                named = ", ".join(f"{c.__qualname__} ({_where(c)})" for c in classes)
                culprit = (f"the backward is wrong: the custom autograd.Function{'s' if len(classes) > 1 else ''} "
                           f"{named} {'are' if len(classes) > 1 else 'is'} between this input and the output, so "
                           f"{'one of their' if len(classes) > 1 else 'its'} backward is the likely cause")
            else:
                culprit = ("the backward is wrong: no custom autograd.Function is in the graph, so look for a gradient "
                           "hook (register_hook, register_full_backward_hook), a torch.autograd.Function applied "
                           "elsewhere, or an op whose derivative torch does not define at this point")
        rounded = _rounded_to(wrong)
        if rounded:
            pattern += (f"; every reported analytic value is exactly a {rounded} number and the numeric ones are not: "
                        f"the backward looks computed in {rounded}")
        parts.insert(0, f"{count}: {culprit}{pattern}")
    if problem.notes and any("computes in" in n for n in problem.notes) and wrong:
        parts.append("the function computes in lower precision inside, which limits what finite differences resolve")
    return "; ".join(parts)


def _mix_ups(checker: _Checker, checks: list[InputCheck], *, budget_end: int) -> list[InputCheck]:
    """Swapped or transposed gradients: the analytic rows of one failing tensor tested, in one projection,
    against the numeric side of another of the same shape (and the other way round), or a failing
    matrix's rows transposed; four calls per hypothesis, and only after a failure."""
    leaves = checker.p.leaves
    failing = [k for k, c in enumerate(checks) if c.verdict == "fail" and leaves[k].value.numel() > 1]
    hints: dict[int, str] = {}

    def fits(k: int, g: torch.Tensor) -> bool:
        if checker.p.evaluations + 4 > budget_end:
            return False  # no budget left for the hypothesis
        block = checker.test_block(k, 0, leaves[k].value.numel(), g_full=g)
        return block.ratio <= 1 and not block.suspicious

    for a in failing:
        for b in failing:
            if b > a and a not in hints and b not in hints and leaves[a].shape == leaves[b].shape:
                if fits(a, checker.g_matrix[b]) and fits(b, checker.g_matrix[a]):
                    hints[a] = hints[b] = (f"the gradients of {_label(leaves[a])} and {_label(leaves[b])} look swapped: "
                                           f"each one's analytic gradient matches the other's numeric one; the backward "
                                           f"returns them in the wrong order")
    for a in failing:
        shape = leaves[a].shape
        if a in hints or len(shape) != 2 or min(shape) < 2:
            continue
        p, q = shape
        g = checker.g_matrix[a].reshape(_K, q, p).transpose(1, 2).reshape(_K, p * q)
        if fits(a, g):
            layout = "its transpose" if p == q else f"its ({q}, {p}) transpose reshaped to {tuple(shape)}"
            hints[a] = (f"the analytic gradient of {_label(leaves[a])} is the numeric one laid out as {layout}: the "
                        f"backward transposes it (e.g. b @ g.T where g @ b.T was meant)")
    return [replace(c, cause=f"{c.cause}; {hints[k]}") if k in hints else c for k, c in enumerate(checks)]


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def _g(value: float | None, digits: int = 6) -> str:
    """``value`` in ``digits`` significant digits, -0 printed as 0."""
    return "?" if value is None else f"{value + 0.0:.{digits}g}"


def _rounded_to(wrong: list[WorstElement]) -> str | None:
    """'float16' or 'bfloat16' when every reported analytic value is exactly representable there (and at
    least one needs more than 4 significant bits, so 1, 0.5 or 3 do not count) while some numeric one is
    not. A float64 value with that many bits lands on the float16 grid by chance with odds below 2^-40."""
    values = [w.analytic for w in wrong if w.analytic != 0 and math.isfinite(w.analytic)]
    if not values:
        return None
    for dtype in (torch.float16, torch.bfloat16):
        t = torch.tensor(values, dtype=torch.float64)
        exact = bool((t.to(dtype).to(torch.float64) == t).all())
        mant, _ = torch.frexp(t)
        rich = bool(((mant * 32) != torch.round(mant * 32)).any())  # more than 5 significant bits somewhere
        numeric = torch.tensor([w.numeric for w in wrong], dtype=torch.float64)
        numeric_exact = bool((numeric.to(dtype).to(torch.float64) == numeric).all())
        if exact and rich and not numeric_exact:
            return str(dtype).replace("torch.", "")
    return None


def _where(cls: type) -> str:
    try:
        backward = inspect.unwrap(cls.backward)  # type: ignore[attr-defined]
        file = inspect.getsourcefile(backward) or "?"
        line = inspect.getsourcelines(backward)[1]
        return f"backward at {file}:{line}"
    except (TypeError, OSError, AttributeError):
        return "backward"
