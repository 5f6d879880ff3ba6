"""Why do two runs differ? Configuration first, then the first divergent step and tensor.

The configuration each run recorded (environment, precision, seeds, optimizer hyperparameters,
model structure, per-parameter initialisation statistics, statistics of the first input batches)
is flattened to ``key -> value`` and compared. Then the runs are walked step by step. Within a
step, the order of comparison follows the computation:

1. the weights the step starts from (the initial values at step 0);
2. layer activations (on health-sampling steps), in execution order;
3. the loss;
4. the gradients, parameter by parameter;
5. the weights after the optimizer update.

The first mismatch names the divergent step and tensor. Values match when they are bitwise equal
(``exact=True``) or within a relative tolerance: ``|a - b| <= tol * max(|a|, |b|)``. Floating values
are the fingerprints the watch recorded: per-parameter L2 norms and per-layer absmax/RMS. These are
deterministic for identical tensors and differ for all but contrived different ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from floatscope._results import to_json_value
from floatscope._store.schema import RunConfig
from floatscope._store.sqlite import RunStore

__all__ = ["RunDiff", "ConfigDifference", "DivergencePoint", "diff_runs"]

_IGNORED = {"on_anomaly", "global", "max_consecutive_skips", "fingerprint_params", "health_every"}


@dataclass(frozen=True)
class ConfigDifference:
    key: str
    a: Any
    b: Any


@dataclass(frozen=True)
class DivergencePoint:
    step: int
    loss_a: float | None
    loss_b: float | None
    weight_rel_diff: float | None


@dataclass(frozen=True)
class RunDiff:
    """The result of :func:`diff_runs`; ``to_dict()`` gives the ``diff --json`` contract."""

    run_a: str
    run_b: str
    config_differences: list[ConfigDifference]
    first_divergent_step: int | None
    first_divergent_tensor: str | None
    divergence: list[DivergencePoint]
    exact: bool
    tolerance: float
    causes: list[str]
    explanation: str
    steps_a: int = 0                # iterations each run completed
    steps_b: int = 0
    status_a: str = ""
    status_b: str = ""
    compared_steps: int = 0         # steps recorded by both, the ones compared

    @property
    def identical(self) -> bool:
        return (not self.config_differences and self.first_divergent_step is None and self.steps_a == self.steps_b
                and "running" not in (self.status_a, self.status_b))

    def to_dict(self) -> dict[str, Any]:
        return to_json_value(asdict(self))


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            _flatten(v, f"{prefix}.{i}", out)
    else:
        out[prefix] = value


def _config_view(record_env: dict[str, Any], config: RunConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    _flatten({k: v for k, v in config.to_dict().items() if k not in _IGNORED and k != "model"}, "", flat)
    model = config.model
    flat["model.type"] = model.type if model else None
    flat["model.structure"] = [list(s) for s in model.structure] if model else None
    for name, (shape, dtype) in (model.parameters if model else {}).items():
        flat[f"model.parameters.{name}"] = [shape, dtype]
    _flatten(record_env, "env", flat)
    return flat


def _same(a: Any, b: Any, exact: bool, tol: float) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        fa, fb = float(a), float(b)
        if math.isnan(fa) and math.isnan(fb):
            return True
        if exact or math.isinf(fa) or math.isinf(fb):
            return fa == fb
        return abs(fa - fb) <= tol * max(abs(fa), abs(fb))
    if isinstance(a, str) and isinstance(b, str) and a in ("nan", "inf", "-inf"):
        return a == b
    return a == b


def _as_float(v: Any) -> float | None:
    if isinstance(v, (int, float)):
        return float(v)
    if v in ("nan", "inf", "-inf"):
        return float(v)
    return None


def _cause(key: str) -> str:
    if key.startswith("env.torch_initial_seed") or key.startswith("seeds"):
        return "seed"
    if key.startswith("env."):
        return "environment"
    if key.startswith(("precision", "grad_scaler")) or key.endswith("param_dtypes"):
        return "precision"
    if key.startswith("optimizers"):
        return "optimizer"
    if key.startswith("model"):
        return "model structure"
    if key.startswith("init"):
        return "initialisation"
    if key.startswith("data"):
        return "input data"
    return "configuration"


def diff_runs(store_a: RunStore, run_a: str, store_b: RunStore, run_b: str, *, exact: bool = False,
              tolerance: float = 1e-6) -> RunDiff:
    """Compare two stored runs; see the module docstring.

    Example:
        >>> d = diff_runs(store, "last", store, "20261123-1312")  # doctest: +SKIP
        >>> d.first_divergent_step, d.first_divergent_tensor  # doctest: +SKIP
        (0, 'fc1.weight (after the optimizer update)')
    """
    rec_a, rec_b = store_a.get(run_a), store_b.get(run_b)
    cfg_a, cfg_b = store_a.config(rec_a.id), store_b.config(rec_b.id)
    view_a, view_b = _config_view(rec_a.env, cfg_a), _config_view(rec_b.env, cfg_b)
    differences = []
    for key in sorted(set(view_a) | set(view_b)):
        a, b = view_a.get(key), view_b.get(key)
        if key.startswith(("init.", "data.")):
            same = _same(a, b, exact, tolerance)
        else:
            same = a == b
        if not same:
            differences.append(ConfigDifference(key, a, b))

    losses_a = {s.step: s.loss for s in store_a.steps(rec_a.id)}
    losses_b = {s.step: s.loss for s in store_b.steps(rec_b.id)}
    names_a, names_b = cfg_a.fingerprint_params, cfg_b.fingerprint_params
    grads_a, grads_b = store_a.fingerprints(rec_a.id, "grad"), store_b.fingerprints(rec_b.id, "grad")
    weights_a, weights_b = store_a.fingerprints(rec_a.id, "weight"), store_b.fingerprints(rec_b.id, "weight")
    acts_a, acts_b = _activations(store_a, rec_a.id), _activations(store_b, rec_b.id)
    init_a = {n: v.get("norm") for n, v in cfg_a.init.items()}
    init_b = {n: v.get("norm") for n, v in cfg_b.init.items()}

    def named(values: list[Any] | None, names: list[str]) -> dict[str, Any]:
        return dict(zip(names, values or [], strict=False))

    common_params = [n for n in names_a if n in set(names_b)]
    steps = sorted(set(losses_a) & set(losses_b) | (set(grads_a) & set(grads_b)))
    first_step: int | None = None
    first_tensor: str | None = None
    curve: list[DivergencePoint] = []
    for step in steps:
        before_a = named(weights_a.get(step - 1), names_a) if step > 0 else init_a
        before_b = named(weights_b.get(step - 1), names_b) if step > 0 else init_b
        after_a, after_b = named(weights_a.get(step), names_a), named(weights_b.get(step), names_b)
        checks: list[tuple[str, Any, Any]] = []
        for n in common_params:
            if n in before_a and n in before_b:
                checks.append((f"{n} ({'initial value' if step == 0 else 'weights at the start of the step'})",
                               before_a[n], before_b[n]))
        for layer, (a, b) in _paired_activations(acts_a.get(step, {}), acts_b.get(step, {})):
            checks.append((f"activation of module '{layer}'", a, b))
        checks.append(("loss", losses_a.get(step), losses_b.get(step)))
        ga, gb = named(grads_a.get(step), names_a), named(grads_b.get(step), names_b)
        for n in common_params:
            if n in ga and n in gb:
                checks.append((f"gradient of {n}", ga[n], gb[n]))
        for n in common_params:
            if n in after_a and n in after_b:
                checks.append((f"{n} (after the optimizer update)", after_a[n], after_b[n]))
        if first_step is None:
            for label, a, b in checks:
                if a is None or b is None:
                    continue
                if not _same(a, b, exact, tolerance):
                    first_step, first_tensor = step, label
                    break
        rel = None
        for n in common_params:
            a, b = _as_float(after_a.get(n)), _as_float(after_b.get(n))
            if a is not None and b is not None and math.isfinite(a) and math.isfinite(b) and max(abs(a), abs(b)) > 0:
                r = abs(a - b) / max(abs(a), abs(b))
                rel = r if rel is None else max(rel, r)
        curve.append(DivergencePoint(step, losses_a.get(step), losses_b.get(step), rel))

    causes = sorted({_cause(d.key) for d in differences})
    explanation = _explain(differences, causes, first_step, first_tensor, exact)
    if first_step is None and (rec_a.steps != rec_b.steps or "running" in (rec_a.status, rec_b.status)):
        running = [f"{label} is still running" for label, r in (("A", rec_a), ("B", rec_b)) if r.status == "running"]
        explanation = (explanation.replace("the runs are identical: ", "").replace("Every recorded step matches.", "")
                       .rstrip() + f" The comparison covers the {len(steps)} step(s) both runs recorded: A completed "
                       f"{rec_a.steps} step(s) ({rec_a.status}) and B {rec_b.steps} ({rec_b.status})"
                       + (f"; {', '.join(running)}" if running else "") + ", so they are not shown identical beyond "
                       "that.")
        explanation = explanation[0].upper() + explanation[1:]
    return RunDiff(rec_a.id, rec_b.id, differences, first_step, first_tensor, curve, exact, tolerance, causes,
                   explanation, steps_a=rec_a.steps, steps_b=rec_b.steps, status_a=rec_a.status,
                   status_b=rec_b.status, compared_steps=len(steps))


def _activations(store: RunStore, run_id: str) -> dict[int, list[tuple[str, tuple[Any, Any]]]]:
    out: dict[int, list[tuple[str, tuple[Any, Any]]]] = {}
    for a in store.activations(run_id):
        out.setdefault(a.step, []).append((a.layer, (a.absmax, a.rms)))
    return out


def _paired_activations(a: Any, b: Any) -> list[tuple[str, tuple[Any, Any]]]:
    bmap = dict(b) if b else {}
    pairs = []
    for name, values in a or []:
        if name in bmap:
            pairs.append((name, (values[0], bmap[name][0])))
            pairs.append((name, (values[1], bmap[name][1])))
    return pairs


def _explain(differences: list[ConfigDifference], causes: list[str], step: int | None, tensor: str | None,
             exact: bool) -> str:
    if not differences and step is None:
        return "the runs are identical: same configuration, and every recorded fingerprint matches" + (
            " bitwise." if exact else " within tolerance.")
    parts = []
    if differences:
        shown = ", ".join(f"{d.key} ({_short(d.a)} vs {_short(d.b)})" for d in differences[:4])
        more = f" and {len(differences) - 4} more" if len(differences) > 4 else ""
        parts.append(f"the runs differ in {', '.join(causes)}: {shown}{more}.")
    else:
        parts.append("the recorded configuration is the same: the difference comes from something not recorded "
                     "(non-deterministic kernels, thread scheduling, data order).")
    if step is not None:
        parts.append(f"They first diverge at step {step}, in {tensor}.")
    else:
        parts.append("Every recorded step matches.")
    return " ".join(parts)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."
