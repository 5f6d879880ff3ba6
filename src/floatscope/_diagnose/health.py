"""Findings about a run's numerical health, from the samples in the run store.

Each rule needs its signal to persist (the median over samples, not one sample), because false
alarms are what make tools of this kind useless: the calibration tests train healthy MLPs, CNNs,
transformers and LSTMs, in fp32 and bf16 autocast, and require no finding on any of them.

Thresholds (documented in the README):

* vanishing-gradient: the gradient RMS of the first weight layer is below 1e-3 x that of the last,
  at the median over samples.
* exploding-gradient: the total gradient norm rises above 100 x its median over the first fifth of
  the run (at least its first 3 steps), or turns non-finite.
* saturation: a Sigmoid/Tanh module with a median of more than half its inputs beyond +-5.
* dead-relu: a ReLU module with a median of at least half its units zero for the whole batch, over
  the second half of the run.
* overflow-risk: a layer's fp16/bf16 output within 2 bits of the format's max (error when it
  reached Inf).
* gradient-underflow: in fp16 training, a median of more than 5% of a parameter's non-zero gradient
  elements would flush to zero at the current loss scale.
* loss-spike: a loss more than 6 standard deviations above the mean of the previous 128 steps
  (at least 20 of them), more than 3x their median, and a jump of more than a tenth of the loss's
  early level (the median of the first 20 losses).
* update-ratio: a weight matrix whose median update/weight norm ratio is below 1e-7 or above 0.3.
* loss-scale-collapse: the GradScaler's scale below 1, or 32 skipped steps in a row.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Literal

from floatscope._instrument.health import FLUSH_SCALES
from floatscope._results import to_json_value
from floatscope._store.schema import ActivationSample, ParamSample, RunConfig
from floatscope._store.sqlite import RunStore

__all__ = ["Finding", "findings_for", "KINDS"]

Kind = Literal["vanishing-gradient", "exploding-gradient", "saturation", "dead-relu", "overflow-risk",
               "gradient-underflow", "loss-spike", "update-ratio", "loss-scale-collapse"]
KINDS = ("vanishing-gradient", "exploding-gradient", "saturation", "dead-relu", "overflow-risk",
         "gradient-underflow", "loss-spike", "update-ratio", "loss-scale-collapse")
_LOW = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38}


@dataclass(frozen=True)
class Finding:
    """One health finding: evidence, why it matters and what to change."""

    kind: Kind
    severity: Literal["info", "warning", "error"]
    layers: list[str]
    steps: list[int]
    evidence: dict[str, Any]
    explanation: str
    suggestions: list[str]

    def to_dict(self) -> dict[str, Any]:
        return to_json_value(asdict(self))


@dataclass
class _Run:
    steps: list[Any]
    activations: dict[int, dict[str, ActivationSample]]
    params: dict[int, dict[str, ParamSample]]
    config: RunConfig
    incident: Any

    @property
    def shapes(self) -> dict[str, tuple[list[int], str]]:
        return self.config.model.parameters if self.config.model else {}


def _load(store: RunStore, run_id: str) -> _Run:
    activations: dict[int, dict[str, ActivationSample]] = {}
    params: dict[int, dict[str, ParamSample]] = {}
    for a in store.activations(run_id):
        activations.setdefault(a.step, {})[a.layer] = a
    for p in store.params(run_id):
        params.setdefault(p.step, {})[p.name] = p
    return _Run(store.steps(run_id), activations, params, store.config(run_id), store.get(run_id).incident)


def findings_for(store: RunStore, run_id: str) -> list[Finding]:
    """All findings for a stored run, most severe first."""
    run = _load(store, run_id)
    found: list[Finding] = []
    for rule in (_vanishing, _exploding, _saturation, _dead_relu, _overflow_risk, _underflow, _loss_spikes,
                 _update_ratio, _scale_collapse):
        found.extend(rule(run))
    # Tiny updates of layers whose gradients vanish are the same finding, not another one.
    vanishing = {layer for f in found if f.kind == "vanishing-gradient" for layer in f.layers}
    found = [f for f in found if not (f.kind == "update-ratio" and set(f.layers) <= vanishing
                                      and f.evidence["median_update_to_weight_ratio"] < 1e-7)]
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(found, key=lambda f: order[f.severity])


def _median(values: list[float]) -> float:
    clean = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def _weight_layers(run: _Run) -> list[str]:
    """Weight parameters (2-D and up) in registration order, which follows the forward order."""
    shapes = run.shapes
    order = run.config.fingerprint_params or list(shapes)
    return [n for n in order if n in shapes and len(shapes[n][0]) >= 2 and n.endswith("weight")]


def _numel(run: _Run, name: str) -> int:
    shape = run.shapes.get(name, ([1], ""))[0]
    return max(1, math.prod(shape))


# --------------------------------------------------------------------------- rules
def _vanishing(run: _Run) -> list[Finding]:
    layers = _weight_layers(run)
    if len(layers) < 3 or not run.params:
        return []
    ratios, steps, last_profile = [], [], {}
    for step, params in sorted(run.params.items()):
        rms = {n: params[n].grad_norm / math.sqrt(_numel(run, n)) for n in layers
               if n in params and params[n].grad_norm is not None}
        if layers[0] not in rms or layers[-1] not in rms or not rms[layers[-1]] > 0:
            continue
        ratios.append(rms[layers[0]] / rms[layers[-1]])
        steps.append(step)
        last_profile = rms
    if not ratios or not (_median(ratios) < 1e-3):
        return []
    ordered = [(n, last_profile[n]) for n in layers if n in last_profile]
    top = max(v for _, v in ordered) or 1.0
    weak = [n for n, v in ordered if v < 1e-3 * top]
    per_layer = (ordered[0][1] / ordered[-1][1]) ** (1 / max(1, len(ordered) - 1)) if ordered[-1][1] > 0 else 0.0
    return [Finding(
        kind="vanishing-gradient", severity="warning", layers=weak, steps=steps,
        evidence={"first_to_last_grad_rms_ratio": _median(ratios), "grad_rms_by_layer": dict(ordered),
                  "factor_per_layer": per_layer},
        explanation=(f"gradients shrink by about {_factor(per_layer)} per layer from the output back to the input: "
                     f"the first layer's gradient RMS is {_ratio(_median(ratios))} of the last layer's, so the early "
                     f"layers "
                     f"({', '.join(weak[:4])}) barely learn. Saturating activations (sigmoid/tanh derivatives are at "
                     f"most 0.25/1) and small weights multiply down the chain rule."),
        suggestions=["use ReLU/GELU/SiLU instead of sigmoid/tanh in hidden layers",
                     "initialise with Kaiming/Xavier (nn.init.kaiming_normal_) for the activation used",
                     "add normalisation (LayerNorm/BatchNorm) or residual connections between layers"])]


def _factor(x: float) -> str:
    """A per-layer factor for text: "0.31x", or "over 1000x smaller" when it rounds to 0."""
    return f"{x:.3g}x" if x >= 1e-3 else "a factor below 0.001"


def _ratio(x: float) -> str:
    return f"{x:.2g}" if x > 0 else "0 (no gradient reaches it)"


def _exploding(run: _Run) -> list[Finding]:
    # A step row without a gradient norm was not measured there (the loss scale of the final read).
    norms = [(s.step, s.grad_norm) for s in run.steps if not s.skipped and s.grad_norm is not None]
    if len(norms) < 10:
        return []
    head = [g for _, g in norms[: max(3, len(norms) // 10)] if g is not None and math.isfinite(g)]
    if not head:
        return []
    base = statistics.median(head)
    # A rise: after the early window, and also far above the steps just before it. A run that converges fast
    # starts with its largest gradients; they are not an explosion.
    start = max(3, len(norms) // 10)
    bad = []
    for i in range(start, len(norms)):
        s, g = norms[i]
        recent = [v for _, v in norms[max(0, i - 20):i] if math.isfinite(v)]
        if not math.isfinite(g) or (g > 100 * base and (not recent or g > 10 * statistics.median(recent))):
            bad.append((s, g))
        elif bad and g > 100 * base:
            bad.append((s, g))  # still exploded
    if not bad:
        return []
    finite = [g for _, g in norms if g is not None and math.isfinite(g) and g > 0]
    trend = (math.log(finite[-1]) - math.log(finite[0])) / max(1, len(finite) - 1) if len(finite) > 1 else 0.0
    clip = sorted(head)[min(len(head) - 1, int(0.9 * len(head)))]
    finite_peak = max((g for _, g in bad if math.isfinite(g)), default=None)
    first_bad = next((g for _, g in bad if not math.isfinite(g)), None)
    if finite_peak is not None:
        peak, reached = finite_peak, f"{finite_peak:.3g}"
    else:
        peak = first_bad if first_bad is not None else math.inf
        reached = "NaN" if first_bad is not None and math.isnan(first_bad) else "Inf"
    if finite_peak is not None and first_bad is not None:
        reached += f", then {'NaN' if math.isnan(first_bad) else 'Inf'}"
    layer_growth = _layer_growth(run)
    types = {layer_type for _, layer_type in (run.config.model.structure if run.config.model else [])}
    recurrent = sorted(types & {"LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"})
    where = (f" The model's recurrent layers ({', '.join(recurrent)}) multiply the same weights at every time "
             f"step, which is where this usually starts: clip gradients for them." if recurrent else
             (f" The gradients grew most in {', '.join(layer_growth[:3])}." if layer_growth else ""))
    return [Finding(
        kind="exploding-gradient", severity="error" if any(not math.isfinite(g) for _, g in bad)
        else "warning", layers=layer_growth[:3], steps=[s for s, _ in bad][:20],
        evidence={"early_median_grad_norm": base, "peak_grad_norm": peak, "first_exploding_step": bad[0][0],
                  "log_growth_per_step": trend, "recommended_max_norm": clip},
        explanation=(f"the gradient norm rose from a median of {base:.3g} over the early steps to {reached} (step "
                     f"{bad[0][0]} onwards): updates this large throw the weights out of the region where the loss "
                     f"is smooth, and the run heads for Inf/NaN.{where}"),
        suggestions=[f"clip gradients: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={clip:.3g}) "
                     "(the 90th percentile of the healthy early gradient norms)",
                     "lower the learning rate or add warm-up"])]


def _layer_growth(run: _Run) -> list[str]:
    samples = sorted(run.params.items())
    if len(samples) < 2:
        return []
    first = samples[0][1]
    best: dict[str, float] = {}
    for _, later in samples[1:]:
        for name, data in later.items():
            a, b = first[name].grad_norm if name in first else None, data.grad_norm
            if a and b is not None and a > 0 and math.isfinite(b):
                best[name] = max(best.get(name, 0.0), b / a)
    return [n for n, g in sorted(best.items(), key=lambda kv: kv[1], reverse=True) if g > 10.0]


def _activation_series(run: _Run, key: str, types: tuple[str, ...] | None = None) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for step, layers in sorted(run.activations.items()):
        for name, data in layers.items():
            if types is not None and data.type not in types:
                continue
            value = getattr(data, key)
            if value is not None:
                series.setdefault(name, []).append((step, value))
    return series


def _saturation(run: _Run) -> list[Finding]:
    out = []
    run_types = {path: kind for path, kind in (run.config.model.structure if run.config.model else [])}
    for name, values in _activation_series(run, "saturation", ("Sigmoid", "Tanh")).items():
        med = _median([v for _, v in values])
        if med > 0.5:
            tanh = run_types.get(name) == "Tanh"
            # tanh'(5) = 1.8e-4 and its values round to +-1; sigmoid'(5) = 6.6e-3 and its values to 0 or 1.
            fn, slope, ends = ("tanh", "1.8e-4", "-1 or 1") if tanh else ("sigmoid", "0.0067", "0 or 1")
            suggestions = ["normalise the pre-activations (LayerNorm/BatchNorm before the nonlinearity)",
                           "lower the initial weight scale or the learning rate"]
            if not tanh:
                suggestions.append("for a classifier output, feed logits to BCEWithLogitsLoss instead of sigmoid + BCE")
            out.append(Finding(
                kind="saturation", severity="warning", layers=[name], steps=[s for s, v in values if v > 0.5],
                evidence={"median_fraction_beyond_5": med, "samples": len(values)},
                explanation=(f"{med:.0%} of the inputs to {name} ({fn}) lie beyond +-5, where {fn} is flat: its "
                             f"derivative is below {slope}, so gradients through this layer vanish, and its outputs "
                             f"round to {ends}."),
                suggestions=suggestions))
    return out


def _dead_relu(run: _Run) -> list[Finding]:
    out = []
    for name, values in _activation_series(run, "dead_frac", ("ReLU", "ReLU6")).items():
        late = values[len(values) // 2:] or values
        med = _median([v for _, v in late])
        if med >= 0.5:
            out.append(Finding(
                kind="dead-relu", severity="warning", layers=[name], steps=[s for s, _ in late],
                evidence={"median_dead_fraction": med, "samples": len(late)},
                explanation=(f"{med:.0%} of the units of {name} output 0 for every example of the batch: they get "
                             f"no gradient and cannot recover. A large learning rate or a large negative bias drives "
                             f"units there."),
                suggestions=["lower the learning rate", "use LeakyReLU/GELU, or initialise biases at a small positive "
                             "value", "use Kaiming initialisation for ReLU layers"]))
    return out


def _overflow_risk(run: _Run) -> list[Finding]:
    out = []
    worst: dict[str, tuple[float, int, str, float, int]] = {}
    for step, layers in sorted(run.activations.items()):
        for name, data in layers.items():
            dtype = data.dtype
            if dtype not in _LOW:
                continue
            headroom = data.headroom_bits
            inf = int(data.inf)
            if inf or (headroom is not None and headroom < 2.0):
                h = -math.inf if inf else headroom
                if name not in worst or h < worst[name][0]:
                    worst[name] = (h, step, dtype, data.absmax if data.absmax is not None else math.nan, inf)
    for name, (h, step, dtype, absmax, inf) in worst.items():
        out.append(Finding(
            kind="overflow-risk", severity="error" if inf else "warning", layers=[name], steps=[step],
            evidence={"dtype": dtype, "absmax": absmax, "headroom_bits": h, "dtype_max": _LOW[dtype], "inf": inf},
            explanation=(f"{name}'s {dtype} output reaches {absmax:.4g}, within {max(h, 0):.1f} bits of {dtype}'s max "
                         f"{_LOW[dtype]:.4g}" + (f", and {inf} values overflowed to Inf." if inf else
                                                 ": a slightly larger batch or weight update overflows it.")),
            suggestions=["run this layer in float32 (floatscope precision shows which layers need it)",
                         "train in bfloat16, whose range matches float32",
                         "rescale: normalise inputs, add LayerNorm before this layer, or lower the learning rate"]))
    return out


def _underflow(run: _Run) -> list[Finding]:
    if run.config.precision is None or not run.config.precision.uses_float16:
        return []
    out = []
    by_param: dict[str, list[tuple[int, ParamSample]]] = {}
    losses = {s.step: s.loss for s in run.steps}
    for step, params in sorted(run.params.items()):
        for name, data in params.items():
            if data.grad_flush_frac is not None and data.grad_nonzero is not None:
                by_param.setdefault(name, []).append((step, data))

    def flushed(step: int, data: ParamSample, factor: float) -> float:
        if data.grad_nonzero:
            assert data.grad_flush_frac is not None
            return data.grad_flush_frac[f"{factor:g}"]
        # Every element is exactly 0 while the loss is not: it all flushed in the fp16 backward.
        return 1.0 if losses.get(step) else 0.0

    for name, samples in by_param.items():
        current = _median([flushed(s, d, FLUSH_SCALES[0]) for s, d in samples])
        if not current > 0.05:
            continue
        last_step, last = samples[-1]
        scale = last.loss_scale or 1.0
        if last.grad_nonzero and last.grad_flush_frac is not None:
            fracs = last.grad_flush_frac
            factor = next((k for k in FLUSH_SCALES if fracs[f"{k:g}"] < 0.01), FLUSH_SCALES[-1])
        else:
            factor = FLUSH_SCALES[-1]  # nothing survived to measure: GradScaler's default range
        absmax = last.grad_absmax or 0.0
        ceiling = 65504.0 / (absmax * scale) if absmax > 0 else math.inf
        factor = min(factor, 2.0 ** math.floor(math.log2(ceiling))) if math.isfinite(ceiling) else factor
        recommended = scale * factor
        out.append(Finding(
            kind="gradient-underflow", severity="warning", layers=[name], steps=[s for s, _ in samples],
            evidence={"flush_fraction_at_current_scale": current, "loss_scale": scale,
                      "recommended_scale": recommended, "grad_absmax": absmax},
            explanation=(f"{current:.0%} of {name}'s non-zero gradient elements are below fp16's smallest subnormal "
                         f"(6e-8) at loss scale {scale:g}: in fp16 backward they flush to 0 and that part of the signal "
                         f"is lost."),
            suggestions=[f"use a loss scale of about {recommended:g}: torch.amp.GradScaler(init_scale={recommended:g})",
                         "or train in bfloat16, whose range needs no loss scaling"]))
    return out


# A loss spike: over 6 standard deviations above the rolling mean, over 3x the rolling median, and a jump of
# over a tenth of the loss's early level (calibrated on healthy 1,000-step runs: tests/test_health_calibration.py).
_SPIKE_SIGMAS, _SPIKE_FACTOR, _SPIKE_OF_EARLY = 6.0, 3.0, 0.1


def _loss_spikes(run: _Run) -> list[Finding]:
    losses = [(s.step, s.loss) for s in run.steps if s.loss is not None and not s.skipped]
    early = [v for _, v in losses[:20] if math.isfinite(v)]
    # The loss's own scale: a jump that is large next to a loss already near 0 (0.0004 -> 0.004 late in a
    # classifier's training) is batch noise, not a spike. A spike must stand out three ways.
    level = statistics.median(early) if early else 0.0
    spikes = []
    for i in range(20, len(losses)):
        window = [v for _, v in losses[max(0, i - 128):i] if math.isfinite(v)]
        if len(window) < 20:
            continue
        mean, std = statistics.fmean(window), statistics.pstdev(window)
        median = statistics.median(window)
        value = losses[i][1]
        if (math.isfinite(value) and std > 0 and (value - mean) / std > _SPIKE_SIGMAS
                and value > _SPIKE_FACTOR * median and value - median > _SPIKE_OF_EARLY * level):
            spikes.append((losses[i][0], value, (value - mean) / std, mean))
    if not spikes:
        return []
    return [Finding(
        kind="loss-spike", severity="warning", layers=[], steps=[s for s, *_ in spikes][:20],
        evidence={"spikes": [{"step": s, "loss": v, "z": z, "rolling_mean": m} for s, v, z, m in spikes[:10]]},
        explanation=(f"the loss jumped {len(spikes)} time(s) more than 6 standard deviations above its rolling mean, "
                     f"to over 3x its rolling median "
                     f"(first at step {spikes[0][0]}: {spikes[0][1]:.4g} against {spikes[0][3]:.4g}). Spikes precede "
                     f"divergence: a bad batch, a learning rate too high for the current curvature, or Adam's second "
                     f"moment underestimating a rare large gradient."),
        suggestions=["clip gradients (torch.nn.utils.clip_grad_norm_)", "lower the learning rate or extend warm-up",
                     "inspect the batches at the listed steps"])]


def _update_ratio(run: _Run) -> list[Finding]:
    out = []
    layers = set(_weight_layers(run))
    series: dict[str, list[tuple[int, float]]] = {}
    for step, params in sorted(run.params.items()):
        for name, data in params.items():
            if name in layers and data.update_ratio is not None and (data.grad_norm or 0) > 0:
                series.setdefault(name, []).append((step, data.update_ratio))
    for name, values in series.items():
        med = _median([v for _, v in values])
        if med < 1e-7 or med > 0.3:
            low = med < 1e-7
            out.append(Finding(
                kind="update-ratio", severity="warning", layers=[name], steps=[s for s, _ in values],
                evidence={"median_update_to_weight_ratio": med, "healthy_around": 1e-3},
                explanation=(f"each step changes {name} by {med:.2g} of its norm ("
                             + ("so little that it barely trains: the learning rate is too small for this layer, or "
                                "its gradients vanish)." if low else
                                "so much that the weights are rewritten every step: the learning rate is too large).")),
                suggestions=["scale the learning rate so updates are about 1e-3 of the weights",
                             "use per-layer learning rates or a warm-up"]))
    return out


def _scale_collapse(run: _Run) -> list[Finding]:
    scales = [(s.step, s.loss_scale) for s in run.steps if s.loss_scale is not None]
    streak, longest, streak_steps, longest_steps = 0, 0, [], []
    for s in run.steps:
        if s.skipped:
            streak += 1
            streak_steps.append(s.step)
            if streak > longest:
                longest, longest_steps = streak, list(streak_steps)
        else:
            streak, streak_steps = 0, []
    below = [(st, v) for st, v in scales if v < 1.0]
    incident = run.incident if run.incident is not None and run.incident.category == "loss-scale-collapse" else None
    if not below and longest < 32 and incident is None:
        return []
    evidence: dict[str, Any] = {"longest_skip_streak": longest, "min_scale": min((v for _, v in scales), default=None)}
    if incident is not None:
        evidence["origin"] = f"{incident.op} ({incident.phase}) at {incident.file}:{incident.line}"
    return [Finding(
        kind="loss-scale-collapse", severity="error", layers=[incident.module] if incident and incident.module else [],
        steps=[st for st, _ in below][:20] or longest_steps[:20], evidence=evidence,
        explanation=("the GradScaler kept finding inf/NaN gradients and backed off until the scale "
                     + ("fell below 1" if below else f"had skipped {longest} steps in a row")
                     + ": gradients now underflow instead of being protected, and skipped steps do not train."
                     + (f" The replay names the op that keeps overflowing: {evidence['origin']}." if incident else "")),
        suggestions=["find the op that produces inf/NaN gradients (floatscope run names it) and fix it",
                     "or train in bfloat16 without a GradScaler"])]
