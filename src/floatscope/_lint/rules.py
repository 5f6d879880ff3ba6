"""The lint rule table: one ``Rule`` per unstable pattern, and rule selection (``--select``/``--ignore``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from floatscope._errors import UsageError

__all__ = ["Rule", "RULES", "Severity", "is_selected", "check_codes"]

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Rule:
    """One lint rule.

    Attributes:
        id: ``FS101``..; ``FS0xx`` are about the file itself, ``FS1xx`` are source patterns, ``FS2xx`` depend on
            the compute dtype (from the source when it shows the dtype, from a model graph otherwise).
        name: a short kebab-case name (SARIF ``name``).
        severity: ``error`` when the pattern produces NaN or Inf, ``warning`` when it loses precision.
        pattern: the unstable spelling.
        why: the failure it causes and when.
        rewrite: the stable spelling.
        autofix: ``yes`` when ``--fix`` rewrites every instance, ``some`` when it rewrites the spellings whose
            rewrite computes the same function, ``no`` when the rewrite changes values (an epsilon, a clamp) and is
            only suggested.
    """

    id: str
    name: str
    severity: Severity
    pattern: str
    why: str
    rewrite: str
    autofix: Literal["yes", "some", "no"]


_TABLE = (
    Rule("FS001", "syntax-error", "error", "a file that does not parse", "nothing in it can be checked",
         "fix the syntax error", "no"),
    Rule("FS002", "internal-error", "error", "a statement (or file) floatscope failed to analyse: a floatscope bug",
         "the findings of that statement are missing; the rest of the file and the other files were checked",
         "report it with the statement; silence it with # floatscope: ignore[FS002] meanwhile", "no"),
    Rule("FS101", "log-of-softmax", "error", "log(softmax(z))",
         "a probability underflows to 0 once a logit trails the largest by more than 104 (float32), 92.8 (bfloat16) "
         "or 17.3 (float16); log(0) = -inf and its gradient is NaN",
         "log_softmax(z, dim)", "some"),
    Rule("FS102", "cross-entropy-from-probabilities", "error",
         "nll_loss(log(p)), -log(p[i, y]), -log(p.gather(1, y)), -log(p.diag()) or -(y * log(p)).sum() with "
         "p = softmax(z)",
         "the same underflow as FS101: one confident wrong prediction makes the loss inf and every gradient NaN",
         "F.cross_entropy(z, y) on the logits", "some"),
    Rule("FS103", "log-of-sigmoid", "error", "log(sigmoid(z))",
         "sigmoid(z) is 0 for z below -88.7 (float32) or -17.3 (float16); log(0) = -inf",
         "F.logsigmoid(z)", "some"),
    Rule("FS104", "log-one-minus-sigmoid", "error", "log(1 - sigmoid(z))",
         "1 - sigmoid(z) rounds to 0 for z above 16.6 (float32), 8.3 (float16) or 6.2 (bfloat16); log(0) = -inf",
         "F.logsigmoid(-z)", "some"),
    Rule("FS105", "bce-on-sigmoid", "error", "binary_cross_entropy(sigmoid(z), y), BCELoss()(sigmoid(z), y)",
         "sigmoid saturates to exactly 0 or 1 (|z| > 16.6 in float32), BCE clamps log(0) to -100, so the loss caps at "
         "100 and the gradient is 0; under autocast PyTorch refuses binary_cross_entropy",
         "F.binary_cross_entropy_with_logits(z, y) or BCEWithLogitsLoss", "no"),
    Rule("FS106", "softmax-without-max", "error", "exp(x) / exp(x).sum() with no max subtracted",
         "exp overflows to inf above 88.7 (float32, bfloat16) or 11.1 (float16), and inf / inf = NaN",
         "torch.softmax(x, dim) or exp(x - x.amax(dim, keepdim=True))", "some"),
    Rule("FS107", "log-sum-exp", "error", "log(sum(exp(x)))",
         "exp overflows above 88.7 (float32) or 11.1 (float16) giving inf, and all terms underflow below -104 "
         "(float32) giving log(0) = -inf",
         "torch.logsumexp(x, dim)", "some"),
    Rule("FS108", "log-of-product", "error", "log(prod(p))",
         "a product of probabilities underflows to 0 (150 factors of 0.5 in float32, 25 in float16), then "
         "log(0) = -inf",
         "log(p).sum(dim)", "no"),
    Rule("FS109", "naive-variance", "warning", "E[x**2] - E[x]**2 (mean of squares minus squared mean)",
         "catastrophic cancellation: the relative error is about eps * mean**2 / var (float32 eps 1.2e-7), so data "
         "with mean 1e4 and std 1 loses every digit and can come out negative; sqrt of it is NaN",
         "x.var(dim, correction=0) (torch), np.var(x) (numpy)", "some"),
    Rule("FS110", "log-one-plus", "warning", "log(1 + x)",
         "1 + x rounds to 1 for |x| below 6e-8 (float32), 4.9e-4 (float16) or 3.9e-3 (bfloat16), so the result is 0 "
         "instead of about x",
         "log1p(x)", "yes"),
    Rule("FS111", "exp-minus-one", "warning", "exp(x) - 1",
         "exp(x) rounds to 1 for |x| below 6e-8 (float32), so the result is 0 instead of about x; the relative error "
         "is eps / |x| for small x",
         "expm1(x)", "yes"),
    Rule("FS112", "division-without-epsilon", "error", "x / x.norm(), x / x.std(), x / x.sum() with no epsilon",
         "an all-zero row (padding, a dead feature, an empty mask) has norm, std or sum 0, and 0 / 0 = NaN (or "
         "x / 0 = inf) in the forward and the backward",
         "F.normalize(x, dim) or x / x.norm(dim, keepdim=True).clamp_min(eps); x / (x.std(dim) + eps); "
         "x / x.sum().clamp_min(eps)", "no"),
    Rule("FS113", "sqrt-of-squared-distance", "error", "sqrt(((a - b) ** 2).sum(-1))",
         "the gradient of sqrt is 1 / (2 sqrt(d)), infinite where two points coincide (d = 0); the backward then "
         "gives 0 * inf = NaN",
         "torch.linalg.vector_norm(a - b, dim=-1) (gradient 0 at 0) or sqrt(d + eps)", "no"),
    Rule("FS114", "inverse-sqrt-of-variance", "error", "1 / sqrt(var), rsqrt(var), x / sqrt(var)",
         "a constant feature (or one that flushes below 6e-8 in float16) has variance 0; 1 / sqrt(0) = inf and "
         "normalising gives 0 * inf = NaN",
         "torch.rsqrt(var + eps) with eps = 1e-5 (LayerNorm's default)", "no"),
    Rule("FS115", "acos-without-clamp", "error",
         "acos(cosine_similarity(a, b)), asin(dot(u, v) / (|u| |v|)), acos(c.clamp(-1, 1))",
         "rounding puts a cosine of parallel vectors at 1.0000001, and acos of it is NaN; the gradient "
         "-1 / sqrt(1 - c**2) is infinite at c = +-1, so a clamp exactly at +-1 keeps the forward but not the "
         "backward",
         "acos(c.clamp(-1 + 1e-7, 1 - 1e-7)), or atan2(|a x b|, a . b) for the angle", "no"),
    Rule("FS116", "naive-softplus", "error", "log(1 + exp(x))",
         "exp overflows above 88.7 (float32) or 11.1 (float16), so the result is inf where it should be about x",
         "F.softplus(x) or torch.logaddexp(x, torch.zeros_like(x))", "no"),
    Rule("FS201", "epsilon-rounds-to-zero", "error", "x + 1e-8 (or clamp(min=1e-8)) in float16",
         "1e-8 is below float16's smallest subnormal (6e-8) and rounds to 0, so the epsilon guards nothing: "
         "x / (norm + 1e-8) is still 0 / 0",
         "an epsilon the dtype can hold (1e-4 or more in float16 near 1) or compute the guarded op in float32",
         "no"),
    Rule("FS202", "optimizer-eps-in-float16", "error", "Adam/AdamW/RMSprop with eps=1e-8 on float16 parameters",
         "the optimizer adds eps to sqrt(exp_avg_sq) in the parameters' dtype; 1e-8 rounds to 0 in float16 and "
         "exp_avg_sq underflows, so the update divides by 0",
         "keep float32 master weights (torch.autocast plus GradScaler), or eps=1e-4 for pure float16", "no"),
    Rule("FS203", "mask-constant-out-of-range", "error", "masked_fill(mask, -1e9) in float16",
         "-1e9 is beyond float16's range (max 65504): eager PyTorch refuses it, exported or compiled graphs store "
         "-inf, and a row with every position masked then gives softmax = NaN",
         "masked_fill(mask, torch.finfo(x.dtype).min)", "no"),
    Rule("FS204", "literal-overflows-dtype", "error", "a literal beyond the compute dtype's range (x * 1e5 in float16)",
         "the literal becomes inf in float16 (max 65504); inf * 0 = NaN and inf - inf = NaN downstream",
         "scale in float32, or use a constant the dtype holds (torch.finfo(dtype).max)", "no"),
)

RULES: dict[str, Rule] = {rule.id: rule for rule in _TABLE}


def check_codes(codes: list[str] | tuple[str, ...], option: str) -> tuple[str, ...]:
    """Validate rule ids or prefixes (``FS1``, ``FS101``, ``ALL``); raise a ``UsageError`` naming the bad one."""
    out = []
    for code in codes:
        code = code.strip().upper()
        if not code:
            continue
        if code != "ALL" and not any(rule_id.startswith(code) for rule_id in RULES):
            raise UsageError(f"{option} {code}: no rule has that id or prefix; the rules are {', '.join(RULES)}")
        out.append(code)
    return tuple(out)


def is_selected(rule_id: str, select: tuple[str, ...] | None, ignore: tuple[str, ...]) -> bool:
    """A rule runs when a ``select`` prefix matches (every rule when ``select`` is None) and no ``ignore`` does.

    The longer matching prefix wins, as in ruff: ``select=["FS1"], ignore=["FS110"]`` runs FS1 except FS110, and
    ``select=["FS110"], ignore=["FS1"]`` runs FS110 only.
    """
    def longest(prefixes: tuple[str, ...]) -> int:
        return max((len(p) if p != "ALL" else 0 for p in prefixes if p == "ALL" or rule_id.startswith(p)), default=-1)

    chosen = 0 if select is None else longest(select)
    dropped = longest(ignore)
    return chosen >= 0 and chosen > dropped
