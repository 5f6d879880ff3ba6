"""Turn an origin event into a diagnosis: category, plain explanation, concrete fixes."""

from __future__ import annotations

import math

from floatscope._events import OriginEvent, op_stem
from floatscope._instrument import ops as kinds
from floatscope._numerics.formats import format_of
from floatscope._results import Category, Incident, OperandStats

__all__ = ["incident_from_event", "categorize"]


def _base(op: str) -> str:
    return op_stem(op)


def _is(op: str, kind: kinds.OpKind) -> bool:
    return kinds.is_(op, kind)


def _zeros(op: OperandStats) -> bool:
    return op.zeros > 0


def categorize(event: OriginEvent) -> Category:
    """Classify an origin event.

    * ``overflow``: a finite result too large for the dtype became Inf (exp, matmul, sum, cast).
    * ``underflow``: values that underflowed to 0 upstream (softmax, exp, product) then hit a
      log or a division.
    * ``division-by-zero``: x/0 with x != 0, log(0), or a gradient with a 1/0 pole (sqrt at 0).
    * ``invalid``: 0/0, inf-inf, 0*inf, or an argument outside the op's domain (sqrt/log of a
      negative, acos of |x|>1).
    """
    base = _base(event.op)
    operands = event.operands
    if event.kind == "nan":
        if _is(base, kinds.DOMAIN) and operands and operands[0].min < 0 and base not in {"pow"}:
            return "invalid"
        if base in {"acos", "asin", "atanh"}:
            return "invalid"
        if _is(base, kinds.LOG) and operands and _zeros(operands[0]) and _came_from_underflow(event, 0):
            return "underflow"
        return "invalid"
    # Inf born from finite inputs.
    if _is(base, kinds.DIVISION):
        if len(operands) >= 2 and _zeros(operands[1]):
            return "underflow" if _came_from_underflow(event, 1) and event.phase != "backward" else "division-by-zero"
        if base in {"reciprocal", "rsqrt"} and operands and _zeros(operands[0]):
            return "division-by-zero"
        if len(operands) == 1 and 0.0 in event.scalars:  # x / 0.0: a zero numerator cannot make Inf
            return "division-by-zero"
        return "overflow"
    if _is(base, kinds.LOG):
        if operands and _zeros(operands[0]) and _came_from_underflow(event, 0):
            return "underflow"
        return "division-by-zero"
    return "overflow"


def _came_from_underflow(event: OriginEvent, index: int) -> bool:
    """The operand's zeros were made by rounding non-zero values (not by an exact zero factor)."""
    producer = event.producers[index] if index < len(event.producers) else None
    exact = index < len(event.producer_zero_inputs) and event.producer_zero_inputs[index]
    return producer is not None and _is(producer, kinds.UNDERFLOW_PRODUCER) and not exact


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.4g}"


def _explain(event: OriginEvent, category: Category, fwd_base: str) -> tuple[str, list[str]]:
    """Explanation and fixes, specific to the forward op, the category and the dtype."""
    ops = event.operands
    dtype = ops[0].dtype if ops else event.output.dtype
    limit = event.output.dtype_max
    # The user's own backward code (a custom autograd.Function) is explained like forward code.
    backward = event.backward_node is not None and not event.custom_backward
    producer = _base(event.producers[0]) if event.producers and event.producers[0] else None
    fixes: list[str] = []

    if fwd_base.startswith("nll_loss") and event.detail:
        text = (f"cross-entropy with reduction='mean' averages over the targets that are not ignored; "
                f"{event.detail} = NaN. A batch whose labels are all masked (-100 for padding or prompt tokens) "
                f"does this.")
        return text, ["skip batches with no valid target: if (labels != -100).any(): ... before the loss",
                      "or sum and divide by the count yourself: F.cross_entropy(logits, y, reduction='sum') / "
                      "(y != -100).sum().clamp_min(1)"]
    if backward and fwd_base in {"sqrt", "rsqrt"}:
        text = (f"sqrt's gradient is 1/(2*sqrt(x)); {ops and ops[-1].zeros or 'some'} input element(s) sit at "
                f"x = 0, where the gradient is infinite, although the forward value is a harmless 0.")
        fixes = ["put an epsilon inside the root: torch.sqrt(x + 1e-12) (or x.clamp_min(1e-12))",
                 "for a distance or norm, use torch.linalg.vector_norm(v, dim=...), whose gradient at 0 is 0",
                 "if this is a std, compute torch.sqrt(var + eps) instead of x.std()"]
        return text, fixes
    if backward and fwd_base in {"linalg_vector_norm", "norm", "std", "var", "std_mean"}:
        text = "the gradient of a norm/std is x/norm; at a zero norm (constant input) it is 0/0."
        return text, ["add eps: torch.sqrt(var + eps), or (x.pow(2).sum() + eps).sqrt()",
                      "skip constant inputs, or use torch.nn.functional.normalize(x, eps=1e-12)"]
    if fwd_base in {"acos", "asin"}:
        side = "'s gradient -1/sqrt(1-x^2) is infinite at |x| = 1" if backward else " is undefined for |x| > 1"
        reach = max(abs(ops[0].min), abs(ops[0].max)) if ops else math.nan
        return (f"{fwd_base}{side}; inputs reach {reach:.9g}"
                f" (rounding of a cosine similarity or dot product pushes them to or past 1)."), [
            f"clamp the argument: torch.{fwd_base}(x.clamp(-1 + 1e-6, 1 - 1e-6))",
            "for angles between vectors, use torch.atan2(cross_norm, dot), which is stable at the boundary"]
    if fwd_base == "atan2":
        return ("atan2's gradient y/(x^2+y^2), x/(x^2+y^2) is 0/0 at x = y = 0."), [
            "add a tiny offset to the operands at the origin: torch.atan2(y, x + 1e-12)",
            "mask points at the origin out of the loss"]
    if fwd_base in {"binary_cross_entropy"}:
        return ("binary_cross_entropy takes log(p) and log(1-p); a sigmoid saturated to exactly 0 or 1 makes "
                "them -inf (PyTorch clamps the value at -100, but the gradient 1/(p(1-p)) is still infinite)."), [
            "feed logits to torch.nn.BCEWithLogitsLoss / F.binary_cross_entropy_with_logits instead of "
            "sigmoid + BCE",
        ]
    if _is(fwd_base, kinds.LOG) and not backward:
        exact_zero = bool(event.producer_zero_inputs) and event.producer_zero_inputs[0]
        if ops and ops[0].min < 0 and event.kind == "nan":
            text = f"log of a negative number ({_fmt(ops[0].min)}) is NaN."
            fixes = ["check the sign of the argument; use log(x.clamp_min(eps)) if it must be positive"]
            if producer in {"rsub", "sub"}:
                text += (" The argument is a difference (x - c): it became negative when x fell below c, so the "
                         "log is outside its domain.")
            return text, fixes
        if exact_zero and producer in {"mul", "div"}:
            how = ("div had a zero numerator (0 / y is 0 exactly, no rounding involved)" if producer == "div" else
                   "mul had an exact zero factor (x * 0 is 0 exactly, no rounding involved)")
            text = f"log of zero: {ops[0].zeros} element(s) of the argument are exactly 0 because {how}; log(0) = -inf."
            return text, ["put a safe value inside the log: torch.log(torch.where(keep, p, 1.0)) (a torch.where "
                          "around the log still back-propagates NaN: its gradient is 0 * inf), or add a floor: "
                          "torch.log(x.clamp_min(1e-12))"]
        if producer in {"_softmax", "softmax"}:
            text = (f"log of a softmax: {ops[0].zeros} probabilities underflowed to exactly 0 in {dtype} "
                    f"(logit gaps beyond ~{_log_range(dtype):.0f}), and log(0) = -inf.")
            fixes = ["use torch.log_softmax(logits, dim) (or F.cross_entropy on the logits), which works in log "
                     "space and never forms the 0"]
        elif producer == "sigmoid":
            text = f"log of a sigmoid: {ops[0].zeros} values saturated to exactly 0 in {dtype}; log(0) = -inf."
            fixes = ["use F.logsigmoid(x), or F.binary_cross_entropy_with_logits for a loss"]
        elif producer in {"prod", "mul", "cumprod"}:
            text = (f"log of a product: multiplying many probabilities underflowed to exactly 0 in {dtype} "
                    f"(below {ops[0].dtype_smallest_normal:.3g} and then below the subnormals); log(0) = -inf.")
            fixes = ["sum logs instead of multiplying probabilities: torch.log(p).sum(dim) (or log_softmax "
                     "outputs summed)"]
        elif producer in {"rsub", "sub"}:
            text = (f"log(1 - p) with p saturated to exactly 1 in {dtype} (a sigmoid or softmax of large logits): "
                    f"{ops[0].zeros} element(s) of 1 - p are 0, and log(0) = -inf. This is binary cross-entropy "
                    f"written by hand on a saturated sigmoid.")
            fixes = ["compute BCE from logits: F.binary_cross_entropy_with_logits(logits, y) "
                     "(or F.logsigmoid(x) and F.logsigmoid(-x) for log p and log(1 - p))"]
        elif producer in {"exp", "exp2"}:
            text = f"log(exp(x)) with exp underflowed to 0 in {dtype}; log(0) = -inf."
            fixes = ["stay in log space: log(exp(x)) is x; use torch.logsumexp for log(sum(exp(x)))"]
        elif ops and ops[0].min < 0:
            text = f"log of a negative number ({_fmt(ops[0].min)}) is NaN."
            fixes = ["check the sign of the argument; use log(x.clamp_min(eps)) if it must be positive"]
        else:
            text = f"log of zero: {ops[0].zeros if ops else 'some'} input element(s) are exactly 0; log(0) = -inf."
            fixes = ["add a floor: torch.log(x.clamp_min(1e-12)) or torch.log(x + eps)",
                     "if x is a probability from softmax/sigmoid, use log_softmax / logsigmoid instead"]
        return text, fixes
    if fwd_base == "log1p" or (_is(fwd_base, kinds.LOG) and producer in {"exp"}):
        return ("log(1 + exp(x)) overflows: exp(x) is Inf for large x, so the result is Inf."), [
            "use torch.nn.functional.softplus(x) (or torch.logaddexp(0, x)), which is exact for large x"]
    if _is(fwd_base, kinds.EXP_LIKE) and category == "overflow":
        threshold = math.log(limit) if limit > 0 else float("nan")
        text = (f"{fwd_base} overflowed {dtype}: inputs reach {_fmt(ops[0].max if ops else math.nan)}, and "
                f"exp(x) exceeds {dtype}'s max {limit:.4g} for x > {threshold:.2f}.")
        fixes = ["subtract the max before exponentiating (softmax/logsumexp do this): torch.softmax(x, dim) or "
                 "torch.logsumexp(x, dim)"]
        if dtype == "float16":
            fixes += ["compute this op in float32 (x.float().exp()); autocast does so only for the ops on its "
                      "float32 list, which differs between devices (CUDA autocast runs exp and softmax in float32, "
                      "CPU autocast does not)",
                      "train in bfloat16, whose range matches float32"]
        fixes.append("if this is log(1 + exp(x)), use torch.nn.functional.softplus(x), which never forms exp(x)")
        fixes.append("if this is a VAE's exp(logvar) or a learned temperature, clamp the exponent "
                     "(e.g. logvar.clamp(-30, 20)) before exp")
        return text, fixes
    if category == "overflow":
        if _is(fwd_base, kinds.CAST):
            source = max(ops, key=lambda o: o.absmax if not math.isnan(o.absmax) else -1.0) if ops else None
            text = (f"casting to {event.output.dtype} overflowed: values reach "
                    f"{_fmt(source.absmax) if source else 'nan'} ({source.dtype if source else '?'}), beyond "
                    f"{event.output.dtype}'s max {limit:.4g}.")
            return text, ["keep this tensor in float32 (or bfloat16, which has float32's range)",
                          "rescale the values before the cast (normalise inputs, lower the learning rate)"]
        if _is(fwd_base, kinds.MATMUL | kinds.REDUCTION) or fwd_base in {"mul", "add", "sub", "pow"}:
            ranges = ", ".join(f"|x| <= {_fmt(o.absmax)}" for o in ops)
            text = (f"{fwd_base} overflowed {event.output.dtype}: operands are finite ({ranges}) but the result "
                    f"exceeds max {limit:.4g}.")
            fixes = []
            if event.output.dtype == "float16" and event.module is None and not backward:
                fixes.append(f"compute this in float32: outside any layer (a loss or metric), cast the operands "
                             f"first, e.g. (pred.float() - y.float()).pow(2).mean(); float16's max is {limit:.4g}")
            elif event.output.dtype == "float16":
                fixes.append("use bfloat16 (float32's range) or run this layer in float32 "
                             "(torch.autocast(..., enabled=False) around it)")
            fixes += ["find why activations or weights grew this large: lower the learning rate, clip gradients "
                      "(torch.nn.utils.clip_grad_norm_), add normalisation"]
            if _is(fwd_base, kinds.REDUCTION) and event.output.dtype in ("float16", "bfloat16"):
                fixes.append("accumulate in float32: x.sum(dtype=torch.float32)")
            elif _is(fwd_base, kinds.REDUCTION) and fwd_base != "mean":
                fixes.append("rescale before reducing (divide by the count first: x.mean() rather than x.sum() / n), "
                             "or accumulate in float64 if the magnitudes are real")
            return text, fixes
        return (f"{fwd_base} produced Inf from finite inputs in {event.output.dtype} (max {limit:.4g})."), [
            "compute in a wider format or rescale the inputs"]
    if category in {"division-by-zero", "underflow"} and _is(fwd_base, kinds.DIVISION):
        denom = ops[1] if len(ops) > 1 else (ops[0] if ops else None)
        zeros = denom.zeros if denom else 0
        if len(ops) == 1 and 0.0 in event.scalars and fwd_base not in {"reciprocal", "rsqrt"}:
            text = "division by zero: the denominator is the number 0.0."
        elif category == "underflow":
            text = (f"division by a denominator that underflowed to 0: {zeros} element(s) are exactly 0 after "
                    f"{_base(event.producers[1] or '?')} in {dtype}.")
        else:
            text = f"division by zero: the denominator has {zeros} exact zero(s)."
        if backward:
            text = f"the gradient of {fwd_base} divides by its denominator, which is 0 here: " + text
        return text, ["add eps to the denominator: x / (d + eps), or d.clamp_min(eps)",
                      "for normalisation, use F.normalize(x, dim=..., eps=1e-12)"]
    if fwd_base in {"_softmax", "softmax", "_log_softmax", "log_softmax", "_safe_softmax"}:
        if event.external_inf_inputs or (ops and ops[0].inf > 0):
            text = ("softmax of a row that is entirely -inf is 0/0 = NaN: every position of some row is masked "
                    "(masked_fill(mask, -inf) or an additive -inf mask), so the normaliser is 0.")
            return text, ["make sure every query has at least one unmasked key (e.g. always attend to self or a "
                          "BOS token)",
                          "mask with torch.finfo(dtype).min instead of -inf so fully masked rows give a "
                          "uniform distribution, then zero them",
                          "or use F.scaled_dot_product_attention, or torch.nan_to_num on the result for "
                          "padded rows"]
        return "softmax produced NaN from finite logits.", ["check the logits' range"]
    if category == "invalid":
        if _is(fwd_base, kinds.DIVISION):
            both = [o.zeros for o in ops[:2]]
            text = f"0/0: numerator and denominator are both 0 (zeros: {both})."
            if event.external_inf_inputs or any(o.inf for o in ops):
                text = "Inf/Inf or 0*Inf: inputs already held infinities and the division made them NaN."
            return text, ["add eps to the denominator: x / (d + eps), or F.normalize(x, eps=1e-12)",
                          "for a masked mean (x * mask).sum() / mask.sum(), divide by mask.sum().clamp_min(1): "
                          "a batch with no selected element is then 0, not 0/0",
                          "guard empty or constant rows before normalising"]
        if fwd_base in {"sqrt", "rsqrt", "pow"} and ops and ops[0].min < 0:
            return (f"{fwd_base} of a negative number ({_fmt(ops[0].min)}) is NaN; rounding often makes a value that "
                    f"should be >= 0 (a variance as E[x^2]-E[x]^2) slightly negative."), [
                "clamp the argument: x.clamp_min(0) before the root",
                "compute variance as ((x - mean)**2).mean() (two-pass / Welford), not E[x^2] - E[x]^2"]
        if fwd_base in {"sub", "add", "rsub"}:
            return "Inf - Inf is NaN: both operands had overflowed to infinity.", [
                "find where the infinities came from (an earlier overflow) and fix that op"]
        if fwd_base in {"mul"}:
            return "0 * Inf is NaN: one operand was infinite where the other was zero.", [
                "find where the infinity came from (an earlier overflow) and fix that op"]
        if fwd_base in {"std", "var", "std_mean", "var_mean"} and ops and event.output.shape is not None:
            n = math.prod(ops[0].shape) // max(1, math.prod(event.output.shape or [1]))
            if n <= 1:
                return (f"{fwd_base} over {n} element(s): the unbiased estimate divides by n - 1 = {n - 1} "
                        f"(Bessel's correction), so it is 0/0 = NaN (a batch or group of one sample)."), [
                    "skip the statistic for groups of one sample, or use correction=0 (the biased estimate)",
                    "for normalisation over a batch, make sure batches hold more than one sample "
                    "(DataLoader(drop_last=True)) or use LayerNorm/GroupNorm, which normalise within a sample"]
        return f"{fwd_base} produced NaN from inputs without NaN (an invalid operation).", [
            "check the op's domain and the inputs' range listed above"]
    return f"{fwd_base} produced a non-finite value.", ["check the inputs' range listed above"]


def _log_range(dtype: str) -> float:
    """Logit gap beyond which exp underflows to 0 in ``dtype``: ln(max / smallest subnormal) / 2-ish."""
    try:
        return format_of(dtype).log_range
    except ValueError:
        return 100.0


def incident_from_event(root: OriginEvent, last: OriginEvent | None, *, step: int, module_prefix: str | None = None,
                        exact: bool = True, replay_seconds: float | None = None) -> Incident:
    """Build the :class:`Incident` for ``root``; ``last`` is the event that reached the failure."""
    category = categorize(root)
    fwd_op = root.forward_op
    explanation, fixes = _explain(root, category, _base(fwd_op))
    if root.custom_backward:
        function = (root.backward_node or "").removesuffix("Backward")
        explanation = f"in the backward of {function} (a custom autograd.Function: your code), " + explanation
        fixes = fixes + [f"check {function}.backward against a finite-difference gradient "
                         f"(torch.autograd.gradcheck on float64 inputs)"]
    consequence = None
    if last is not None and last is not root:
        where = f"{last.backward_node} in backward" if last.backward_node else f"{last.op} in {last.phase}"
        what = "NaN" if last.kind == "nan" else "Inf"
        consequence = (f"downstream, the {'Inf' if root.kind == 'inf' else 'NaN'} from {fwd_op} became {what} at "
                       f"{where} ({last.frame.file}:{last.frame.line}).")
    return Incident(
        step=step,
        phase=root.phase,  # type: ignore[arg-type]
        kind=root.kind,  # type: ignore[arg-type]
        op=fwd_op,
        backward_node=root.backward_node,
        module=root.module,
        param=None,
        file=root.frame.file,
        line=root.frame.line,
        category=category,
        explanation=explanation,
        suggestions=fixes,
        operands=root.operands,
        output=root.output,
        code=root.frame.code or None,
        function=root.frame.function if root.frame.known else None,
        call=root.function,
        consequence=consequence,
        exact=exact,
        replay_seconds=replay_seconds,
        model=root.model if root.module is not None else None,
    )
