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
3. **Localisation.** A failing block is split in halves and both are tested, best first (the
   largest error per unit step), down to single elements, until ``max_reported`` bad elements are
   found or the evaluation budget is spent.
4. **Elements.** For a bad element, its whole numeric Jacobian column (steps h and 2h, same error
   estimate per output) and the analytic value of the output that disagrees most (all rows when
   the function has at most 64 outputs, else a bisection over outputs with shared backward passes)
   give the reported entry. One-sided slopes ``(f(x+h) − f(x))/h`` and ``(f(x) − f(x−h))/h`` that
   disagree, and keep disagreeing at 2h, mark a **kink** (relu or abs at 0, max at a tie): a
   non-differentiable point, not a bug, when the analytic value lies between the two slopes.

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
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch.overrides import TorchFunctionMode

from floatscope._errors import FloatscopeError, UsageError
from floatscope._results import to_json_value

__all__ = ["gradcheck", "GradcheckResult", "InputCheck", "WorstElement", "GradcheckError"]

Verdict = Literal["pass", "fail", "kink", "unreliable"]
ElementKind = Literal["wrong", "kink"]

_C = 8.0            # safety factor on the finite-difference error estimate
_KAPPA = 16.0       # rounding floor: this many machine epsilons of the values involved
_STAT_T = 6.0       # sub-Gaussian bound for the user slack summed over a projection
_K = 2              # random cotangents
_ROWS_DIRECT = 64   # at most this many outputs: compute every analytic row of a bad element


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
    plus ``atol + rtol·|numeric|``). For a kink, ``left_slope`` and ``right_slope`` are the
    one-sided difference quotients.
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


@dataclass(frozen=True)
class InputCheck:
    """The check of one input tensor (or module parameter).

    ``index``: the positional index of an input; a module parameter's is ``len(inputs) + k`` in
    ``named_parameters()`` order. ``bad_elements`` counts the elements localised as wrong;
    ``complete`` is False when the search stopped (``max_reported`` or the budget) with failing
    blocks left, so there are at least ``bad_elements_at_least`` bad elements. ``max_ratio`` is the
    largest ``|analytic − numeric| / tolerance`` of the screening projections (below 1 passes).
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
        bad = [f"{c.name or c.index}: {c.verdict}" for c in self.inputs if c.verdict != "pass"]
        return (f"GradcheckResult(passed={self.passed}, {len(self.inputs)} inputs"
                f"{', ' + ', '.join(bad) if bad else ''}, {self.evaluations} evaluations, {self.seconds:.3g} s)")

    def __str__(self) -> str:
        lines = [f"gradcheck {'passed' if self.passed else 'FAILED'}: {len(self.inputs)} checked "
                 f"tensor{'s' if len(self.inputs) != 1 else ''}, {self.evaluations} forward and "
                 f"{self.backward_passes} backward evaluations, {self.seconds:.3g} s"]
        for c in self.inputs:
            label = f"{c.kind} {c.index}" + (f" '{c.name}'" if c.name else "")
            lines.append(f"  {label} {tuple(c.shape)} {c.dtype.replace('torch.', '')}: {c.verdict}")
            for w in c.worst:
                out = "?" if w.output is None else str(tuple(w.output))
                lines.append(f"    element {tuple(w.element)} output{'' if w.output_tensor == 0 else ' ' + str(w.output_tensor)}"
                             f" {out}: analytic {w.analytic:.9g}, numeric {w.numeric:.9g}, abs error "
                             f"{w.abs_error:.3g}, rel error {w.rel_error:.3g} ({w.kind})")
            if c.cause:
                lines.append(f"    cause: {c.cause}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


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
        self.fn_name = getattr(fn, "__qualname__", None) or type(fn).__name__
        names = _arg_names(fn.forward if isinstance(fn, torch.nn.Module) else fn, len(inputs))
        self.args: list[Any] = []
        self.leaves: list[_Leaf] = []
        self.arg_slot: dict[int, int] = {}  # leaf number -> positional index
        described: list[str] = []
        for i, value in enumerate(inputs):
            label = f"input {i}" + (f" '{names[i]}'" if names[i] else "")
            if isinstance(value, torch.Tensor):
                if value.is_complex():
                    raise UsageError(f"{label} is a complex tensor ({value.dtype}); floatscope.gradcheck checks real "
                                     f"floating tensors only: split it with torch.view_as_real")
                if value.is_floating_point():
                    copy64 = value.detach().to(torch.float64)
                    if value.requires_grad:
                        self.arg_slot[len(self.leaves)] = i
                        self.leaves.append(_Leaf(i, names[i], "input", copy64.reshape(-1).clone(),
                                                 tuple(value.shape), value.dtype))
                        described.append(f"{label}: {value.dtype} {tuple(value.shape)}, requires_grad")
                    else:
                        described.append(f"{label}: {value.dtype} {tuple(value.shape)} without requires_grad "
                                         f"(a constant)")
                    self.args.append(copy64)
                else:
                    described.append(f"{label}: {value.dtype} {tuple(value.shape)} (not floating: a constant)")
                    self.args.append(value)
            else:
                described.append(f"{label}: {type(value).__name__} (a constant)")
                self.args.append(value)
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
            raise UsageError(f"calling {self.fn_name} raised {type(exc).__name__}: {exc}{hint}") from exc

    def outputs(self, out: Any) -> list[torch.Tensor]:
        """The floating output tensors, in order; refuse what is not a tensor."""
        items = list(out) if isinstance(out, (tuple, list)) else [out]
        floats: list[torch.Tensor] = []
        for j, item in enumerate(items):
            where = "the output" if not isinstance(out, (tuple, list)) else f"output {j}"
            if not isinstance(item, torch.Tensor):
                raise UsageError(f"{self.fn_name} returned {type(item).__name__} as {where}; gradcheck needs a tensor "
                                 f"or a tuple of tensors: return torch.as_tensor(...) or drop the non-tensor from "
                                 f"what is returned")
            if item.is_complex():
                raise UsageError(f"{where} of {self.fn_name} is complex ({item.dtype}); return torch.view_as_real(...)")
            if item.is_floating_point():
                floats.append(item)
        if not floats:
            raise UsageError(f"{self.fn_name} returned no floating tensor (only integer or boolean ones); there is no "
                             f"gradient to check")
        return floats

    def evaluate(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        """Flattened float64 outputs at ``values`` (flat float64 tensors), seeded, without grad."""
        shaped = [v.reshape(leaf.shape) for v, leaf in zip(values, self.leaves, strict=True)]
        with torch.no_grad(), self._rng():
            outs = self.outputs(self.raw_call(shaped))
        return torch.cat([o.detach().reshape(-1).to(torch.float64) for o in outs])

    def base_values(self) -> list[torch.Tensor]:
        return [leaf.value for leaf in self.leaves]


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
    """Records the lowest floating precision any torch call produced, and the first call (and line) that did.

    A function mode, not a dispatch mode: it sees the user's calls (``x.float()``) and its first use
    costs a millisecond, where a dispatch mode's first use costs a second.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lowest: torch.dtype | None = None
        self.first: tuple[str, str] | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                if self.lowest is None or torch.finfo(t.dtype).eps > torch.finfo(self.lowest).eps:
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


class _Checker:
    def __init__(self, problem: _Problem, analytic: _Analytic, *, eps: float | None, atol: float, rtol: float,
                 eps_work: float, generator: torch.Generator) -> None:
        self.p = problem
        self.a = analytic
        self.atol = atol
        self.rtol = rtol
        self.eps_work = eps_work
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
        self.u_matrix = torch.stack(self.cotangents)  # (K, m)
        self.u_norms = self.u_matrix.norm(dim=1)  # (K,)
        self.g_matrix = [torch.stack([row[leaf] for row in self.rows]) for leaf in range(len(problem.leaves))]  # (K, n)
        floor = torch.maximum(self.sigma, _KAPPA * eps_work * self.abs_f0)
        self.noise = (math.sqrt(2) * (self.u_matrix.abs() @ floor)).tolist()  # (K,) rounding noise of a projection

    def _noise_probe(self) -> torch.Tensor:
        """Rounding noise of each output: fourth differences along a random direction at a spacing of
        a thousandth of the step, where smooth variation (and a kink's) is far below the noise."""
        directions = []
        for leaf, h in zip(self.p.leaves, self.steps, strict=True):
            signs = torch.where(torch.rand(h.numel(), generator=self.gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
            directions.append(1e-3 * signs.to(h.device) * h)
        f = [self.f0]
        for k in range(1, 7):
            f.append(self.p.evaluate([leaf.value + k * d for leaf, d in zip(self.p.leaves, directions, strict=True)]))
        fourth = torch.stack([f[k] - 4 * f[k + 1] + 6 * f[k + 2] - 4 * f[k + 3] + f[k + 4] for k in range(3)])
        return fourth.pow(2).mean(0).sqrt() / math.sqrt(70)  # RMS of three samples, per output

    # -- one projection ------------------------------------------------------------------------

    def test_block(self, leaf: int, lo: int, hi: int) -> _Block:
        x = self.p.leaves[leaf].value
        n = hi - lo
        signs = torch.where(torch.rand(n, generator=self.gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
        mags = 1.0 + torch.rand(n, generator=self.gen, dtype=torch.float64)
        w = torch.zeros_like(x)
        w[lo:hi] = (signs * mags).to(x.device) * self.steps[leaf][lo:hi]
        points = [x - 2 * w, x - w, x + w, x + 2 * w]
        values = self.p.base_values()
        evals = []
        for pt in points:
            vals = list(values)
            vals[leaf] = pt
            evals.append(self.p.evaluate(vals))
        fm2, fm1, fp1, fp2 = evals
        dx1 = (points[2] - points[1])[lo:hi]
        dx2 = (points[3] - points[0])[lo:hi]
        # One matrix product per side for all cotangents: phi[t, k] = u_kᵀ f(x + t w).
        phi = (torch.stack([fm2, fm1, self.f0, fp1, fp2]) @ self.u_matrix.T).tolist()  # (5, K)
        g = self.g_matrix[leaf][:, lo:hi]  # (K, b)
        user = self.atol * self.u_norms[:, None] + self.rtol * g.abs()
        sides = torch.stack([g @ dx1, g @ dx2, g.abs() @ dx1.abs(), (dx1 * user).norm(dim=1)]).tolist()  # (4, K)
        ratio, score = 0.0, 0.0
        norm = float(dx1.norm())
        for k in range(_K):
            d1 = (phi[3][k] - phi[1][k]) - sides[0][k]
            d2 = (phi[4][k] - phi[0][k]) - sides[1][k]
            trunc = abs(d2 - 2 * d1) / 6
            around = _KAPPA * self.eps_work * sides[2][k]
            tol = _C * (trunc + self.noise[k] + around) + _STAT_T * sides[3][k]
            r = abs(d1) / tol if tol > 0 else (0.0 if d1 == 0 else math.inf)
            if not math.isfinite(d1):
                r = math.inf
            ratio = max(ratio, r)
            score = max(score, abs(d1) / norm if norm > 0 and math.isfinite(d1) else math.inf)
        return _Block(leaf, lo, hi, ratio, score)

    # -- one element ---------------------------------------------------------------------------

    def check_element(self, leaf: int, i: int) -> WorstElement | None:
        """The element's Jacobian column; None when it passes after all (the block failed by chance)."""
        x = self.p.leaves[leaf].value
        h = float(self.steps[leaf][i])
        values = self.p.base_values()
        evals, pts = [], []
        for t in (-2.0, -1.0, 1.0, 2.0):
            pt = x.clone()
            pt[i] = x[i] + t * h
            pts.append(pt)
            vals = list(values)
            vals[leaf] = pt
            evals.append(self.p.evaluate(vals))
        fm2, fm1, fp1, fp2 = evals
        xi = float(x[i])
        xm2, xm1, xp1, xp2 = (float(pt[i]) for pt in pts)
        col1 = (fp1 - fm1) / (xp1 - xm1)  # (m,)
        col2 = (fp2 - fm2) / (xp2 - xm2)
        sigma = math.sqrt(2) * torch.maximum(self.sigma, _KAPPA * self.eps_work * self.abs_f0)
        noise = sigma / (xp1 - xm1)
        trunc = (col2 - col1).abs() / 3
        est = trunc + noise  # (m,) error estimate of col1; col2's is 4·trunc + noise/2
        est2 = 4 * trunc + sigma / (xp2 - xm2)
        # A wrong backward is off by the same amount at steps h and 2h; noise is not, truncation is
        # in the estimate: the element fails only if both steps disagree with the analytic value.
        failing = False
        for u, row in zip(self.cotangents, self.rows, strict=True):
            a = float(row[leaf][i])
            slack = _STAT_T * (self.atol * float(u.norm()) + self.rtol * float(u.abs() @ col1.abs()))
            around = _KAPPA * self.eps_work * abs(a)
            off1 = abs(a - float(u @ col1)) > _C * (float(u.abs() @ est) + around) + slack
            off2 = abs(a - float(u @ col2)) > _C * (float(u.abs() @ est2) + around) + slack
            if (off1 and off2) or not math.isfinite(a):
                failing = True
        if not failing:
            return None
        j = self._worst_output(leaf, i, col1, est)
        a = float(self._exact_row(j)[leaf][i])
        n = float(col1[j])
        tol = _C * (float(est[j]) + _KAPPA * self.eps_work * abs(a)) + self.atol + self.rtol * abs(n)
        err = abs(a - n)
        denom = max(abs(a), abs(n))
        rel = err / denom if denom > 0 else (0.0 if err == 0 else math.inf)
        # One-sided slopes: a kink keeps its jump when the step doubles; curvature would double it.
        f0 = float(self.f0[j])
        right1, left1 = (float(fp1[j]) - f0) / (xp1 - xi), (f0 - float(fm1[j])) / (xi - xm1)
        right2, left2 = (float(fp2[j]) - f0) / (xp2 - xi), (f0 - float(fm2[j])) / (xi - xm2)
        jump1, jump2 = right1 - left1, right2 - left2
        one_sided_noise = 4 * float(noise[j])
        kink = (abs(jump1) > max(err / 2, _C * one_sided_noise) and abs(jump2) < 1.5 * abs(jump1))
        kind: ElementKind = "wrong"
        if kink:
            lo_s, hi_s = min(left1, right1), max(left1, right1)
            slack = _C * one_sided_noise + self.atol + self.rtol * max(abs(lo_s), abs(hi_s))
            if lo_s - slack <= a <= hi_s + slack:
                kind = "kink"
        out_tensor, out_index = self._output_index(j)
        return WorstElement(element=_unravel(i, self.p.leaves[leaf].shape), output=out_index, analytic=a,
                            numeric=n, abs_error=err, rel_error=rel, kind=kind, output_tensor=out_tensor,
                            tolerance=tol, left_slope=left1 if kink else None, right_slope=right1 if kink else None)

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
            if not (err_l < err_r):  # NaN goes left
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
        fn: a callable or an ``nn.Module`` taking ``inputs`` positionally and returning a tensor or a
            tuple (or list) of tensors. Integer outputs are ignored.
        *inputs: its positional arguments; tensors that are not floating or lack ``requires_grad``
            are passed as constants.
        eps: the relative step: element ``i`` moves by ``eps · max(|x_i|, mean|x| / 10)``. Default
            ``ε^(1/3)`` of the working precision (6.1e-6 in float64; 4.9e-3 when the function
            computes in float32 inside).
        atol: absolute slack added to every Jacobian entry's tolerance (default 0: the tolerance is
            the estimated finite-difference error alone).
        rtol: relative slack, times ``|numeric|``. Default 1e-7 in float64, ``√ε`` of the working
            precision when the function computes in lower precision (3.5e-4 in float32).
        seed: seeds the random projections and every call of ``fn`` (the RNG is restored after).
        max_reported: stop localising a tensor after this many bad elements.
        max_evaluations: budget of forward calls for the localisation.
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
                     f"{(eps if eps is not None else eps_work ** (1 / 3)):.2g}), so it only sees errors above about "
                     f"{eps_work ** (2 / 3):.1g} relative; cast inside the function only where needed")
    rtol_eff = rtol if rtol is not None else (1e-7 if working == torch.float64 else math.sqrt(eps_work))
    low = [leaf for leaf in problem.leaves if torch.finfo(leaf.orig_dtype).eps > torch.finfo(torch.float64).eps]
    for dtype in sorted({leaf.orig_dtype for leaf in low}, key=str):
        fin = torch.finfo(dtype)
        name = str(dtype).replace("torch.", "")
        labels = [_label(leaf) for leaf in low if leaf.orig_dtype == dtype]
        shown = ", ".join(labels[:4]) + (f" and {len(labels) - 4} more" if len(labels) > 4 else "")
        notes.append(f"{shown} {'is' if len(labels) == 1 else 'are'} {name}: checked in float64 copies; finite "
                     f"differences in {name} would have been unreliable (the best step, ~{fin.eps ** (1 / 3):.1g}·|x|, "
                     f"leaves an error of ~{fin.eps ** (2 / 3):.1g} relative, larger than many gradient bugs)")
    if mutated:
        names = ", ".join(_label(problem.leaves[k]) for k in mutated)
        notes.append(f"{problem.fn_name} modifies {names} in place: the caller's tensor changes on every call, and a "
                     f"custom autograd.Function that does so must call ctx.mark_dirty; the check perturbed copies")
    spread = float((f1 - f0).abs().max()) if f1.shape == f0.shape else math.inf
    if not torch.equal(f0, f1):
        notes.append(f"two calls at the same point with the same seed differ by up to {spread:.3g} (largest output "
                     f"{float(f0.abs().max()):.3g}): {problem.fn_name} is not deterministic, so finite differences are "
                     f"only as good as that noise")
    elif not torch.equal(f1, f2):
        notes.append(f"{problem.fn_name} draws random numbers (two unseeded calls differ, e.g. dropout): every "
                     f"evaluation used the same seed ({seed}), so the same draws; call model.eval() to check without them")
    nondeterministic = not torch.equal(f0, f1)

    generator = torch.Generator().manual_seed(seed)
    analytic = _Analytic(problem)
    if analytic.mutated and not mutated:
        names = ", ".join(_label(problem.leaves[k]) for k in analytic.mutated)
        notes.append(f"{problem.fn_name} modifies {names} in place when gradients are enabled")
    checker = _Checker(problem, analytic, eps=eps, atol=atol, rtol=rtol_eff, eps_work=eps_work, generator=generator)

    unreliable = nondeterministic and spread > math.sqrt(eps_work) * max(float(f0.abs().max()), 1e-300)
    checks: list[InputCheck] = []
    budget_end = problem.evaluations + max_evaluations
    for k, leaf in enumerate(problem.leaves):
        checks.append(_check_leaf(checker, k, leaf, max_reported=max_reported, budget_end=budget_end,
                                  unreliable=unreliable, analytic=analytic))
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


def _check_leaf(checker: _Checker, k: int, leaf: _Leaf, *, max_reported: int, budget_end: int, unreliable: bool,
                analytic: _Analytic) -> InputCheck:
    problem = checker.p
    n = leaf.value.numel()
    found: list[WorstElement] = []
    max_ratio = 0.0
    heap: list[tuple[float, int, int, _Block]] = []
    counter = 0
    if n:
        root = checker.test_block(k, 0, n)
        max_ratio = root.ratio
        if root.ratio > 1:
            heapq.heappush(heap, (-root.score, n, counter, root))
    wrong = kinks_found = 0
    # Kinks are not bugs but each costs a column; past 4x max_reported of them, stop (the report says so).
    while heap and wrong < max_reported and kinks_found < 4 * max_reported and problem.evaluations < budget_end:
        _, _, _, block = heapq.heappop(heap)
        if block.hi - block.lo == 1:
            element = checker.check_element(k, block.lo)
            if element is not None:
                found.append(element)
                wrong += element.kind == "wrong"
                kinks_found += element.kind == "kink"
            continue
        mid = (block.lo + block.hi) // 2
        for lo, hi in ((block.lo, mid), (mid, block.hi)):
            child = checker.test_block(k, lo, hi)
            if child.ratio > 1:
                counter += 1
                heapq.heappush(heap, (-child.score, hi - lo, counter, child))
    wrong_elems = [w for w in found if w.kind == "wrong"]
    kinks = [w for w in found if w.kind == "kink"]
    complete = not heap
    at_least = len(found) + len(heap)
    worst = sorted(wrong_elems, key=lambda w: -(w.abs_error / w.tolerance if w.tolerance > 0 else math.inf))
    worst = (worst + kinks)[:max_reported]
    if wrong_elems:
        verdict: Verdict = "fail"
    elif unreliable:
        verdict = "unreliable"
    elif kinks:
        verdict = "kink"
    elif not complete:
        verdict = "fail"  # blocks failed but the budget ran out before any element was localised
    else:
        verdict = "pass"
    cause = _cause(checker, k, leaf, verdict, wrong_elems, kinks, complete, at_least, analytic)
    return InputCheck(index=leaf.index, name=leaf.name, passed=verdict in ("pass", "kink"), worst=worst,
                      verdict=verdict, cause=cause, kind=leaf.kind, shape=list(leaf.shape), dtype=str(leaf.orig_dtype),
                      step=float(checker.steps[k].median()) if n else 0.0, bad_elements=len(wrong_elems),
                      kinks=len(kinks), bad_elements_at_least=max(at_least - len(kinks), len(wrong_elems)),
                      complete=complete, max_ratio=max_ratio)


def _cause(checker: _Checker, k: int, leaf: _Leaf, verdict: Verdict, wrong: list[WorstElement],
           kinks: list[WorstElement], complete: bool, at_least: int, analytic: _Analytic) -> str:
    problem = checker.p
    if verdict == "unreliable":
        return ("the function is not deterministic (two calls at the same point differ), beyond what finite "
                "differences can see through; make it deterministic (floatscope determinism finds the op) and check again")
    if verdict == "pass":
        return ""
    parts: list[str] = []
    if kinks:
        w = kinks[0]
        more = "" if complete or wrong else " (the search stopped there: there may be more)"
        parts.append(f"{len(kinks)} element{'s' if len(kinks) != 1 else ''}{more} at a non-differentiable point, not a bug "
                     f"(e.g. element {tuple(w.element)}: slope {w.left_slope:.6g} on the left, {w.right_slope:.6g} on the "
                     f"right, analytic {w.analytic:.6g} is a one-sided slope or between them, as relu, abs or max at a tie "
                     f"give); move the test point away from it to check the gradient there")
    if not wrong and verdict == "fail":
        parts.append("blocks of elements failed but the evaluation budget ran out before one was localised; raise "
                     "max_evaluations")
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
        if all(w.analytic == 0 for w in wrong) and not any(analytic.differentiable):
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
        parts.insert(0, f"{count}: {culprit}{pattern}")
    if problem.notes and any("computes in" in n for n in problem.notes) and wrong:
        parts.append("the function computes in lower precision inside, which limits what finite differences resolve")
    return "; ".join(parts)


def _where(cls: type) -> str:
    try:
        backward = inspect.unwrap(cls.backward)  # type: ignore[attr-defined]
        file = inspect.getsourcefile(backward) or "?"
        line = inspect.getsourcelines(backward)[1]
        return f"backward at {file}:{line}"
    except (TypeError, OSError, AttributeError):
        return "backward"
