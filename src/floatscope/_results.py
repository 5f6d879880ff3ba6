"""Frozen result objects. The same classes define the JSON that floatscope writes."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

__all__ = ["OperandStats", "Incident", "RunResult", "Phase", "Category", "to_json_value"]

Phase = Literal["forward", "backward", "optimizer"]
Kind = Literal["nan", "inf"]
Category = Literal[
    "overflow",
    "underflow",
    "division-by-zero",
    "invalid",
    "optimizer",
    "loss-scale-collapse",
    "input",
    "parameter",
    "unknown",
]
Status = Literal["clean", "nonfinite", "error", "unwatched", "interrupted", "terminated"]


def to_json_value(value: Any) -> Any:
    """Make ``value`` strict-JSON safe: non-finite floats become None (JSON null).

    Counts of NaN and Inf are always reported separately, so nothing is hidden by this.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    return value


@dataclass(frozen=True)
class OperandStats:
    """Statistics of one tensor operand, over its finite elements.

    ``min``/``max``/``absmax`` ignore NaN and Inf (NaN when no element is finite);
    ``headroom_bits`` is ``log2(dtype_max / absmax)``; ``below_normal`` counts non-zero values
    under ``dtype_smallest_normal``.
    """

    dtype: str
    shape: list[int]
    min: float
    max: float
    absmax: float
    nan: int
    inf: int
    zeros: int
    below_normal: int
    headroom_bits: float
    dtype_max: float
    dtype_smallest_normal: float

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def describe(self) -> str:
        """One line: ``float16[4, 8] range [-3.1, 12.5] absmax 12.5, 2 inf, 0 nan, 5 zeros``."""
        shape = ", ".join(str(s) for s in self.shape)
        parts = [f"{self.dtype}[{shape}]"]
        if math.isnan(self.absmax):
            parts.append("no finite element")
        else:
            parts.append(f"range [{self.min:.4g}, {self.max:.4g}]")
            if math.isfinite(self.headroom_bits):
                parts.append(f"headroom {self.headroom_bits:.1f} bits to max {self.dtype_max:.4g}")
        counts = [f"{self.nan} nan", f"{self.inf} inf", f"{self.zeros} zeros"]
        if self.below_normal:
            counts.append(f"{self.below_normal} below smallest normal {self.dtype_smallest_normal:.3g}")
        return " ".join(parts[:2]) + (f", {parts[2]}" if len(parts) > 2 else "") + "; " + ", ".join(counts)


@dataclass(frozen=True)
class Incident:
    """Where and why the first non-finite value was born.

    ``step`` counts training iterations completed before the incident (see the README for the rule
    with several optimizers, gradient accumulation, closures and loops without an optimizer); 0 is
    the first iteration. For a backward-phase origin, ``op``, ``file`` and ``line`` name the
    *forward* op whose gradient produced the value and ``backward_node`` names the autograd node.
    ``module`` is the dotted path inside the root model ``model`` ("" for the root itself), or
    None when the op ran outside every watched module. ``exact`` is False when the origin could
    not be replayed to an op; the explanation then says what was and was not replayed.
    """

    step: int
    phase: Phase
    kind: Kind
    op: str
    backward_node: str | None
    module: str | None
    param: str | None
    file: str
    line: int
    category: Category
    explanation: str
    suggestions: list[str]
    operands: list[OperandStats]
    output: OperandStats | None = None
    code: str | None = None
    function: str | None = None    # the user's function holding ``line`` ("<module>" for top-level code)
    optimizer_state: list[str] = field(default_factory=list)
    consequence: str | None = None
    exact: bool = True
    replay_seconds: float | None = None
    model: str | None = None
    call: str | None = None        # the torch callable that ran the op (torch.nn.functional.cross_entropy)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the ``incident`` field (non-finite floats become null)."""
        return to_json_value(asdict(self))

    def to_json(self, **kwargs: Any) -> str:
        """Serialise :meth:`to_dict` as strict JSON."""
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "Incident":
        """Rebuild an incident from :meth:`to_dict` output (null floats read back as NaN)."""

        def stats(d: dict[str, Any] | None) -> OperandStats | None:
            if d is None:
                return None
            fixed = {k: (math.nan if v is None and k in _FLOAT_FIELDS else v) for k, v in d.items()}
            return OperandStats(**fixed)

        known = {f.name for f in fields(Incident)}
        values = {k: v for k, v in data.items() if k in known}  # fields of other versions are dropped
        values["operands"] = [stats(o) for o in data.get("operands", [])]
        values["output"] = stats(data.get("output"))
        return Incident(**values)

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}"

    def diagnosis(self) -> str:
        """The full plain-text diagnosis (also the message of :class:`NonFiniteError`)."""
        what = "NaN" if self.kind == "nan" else "Inf"
        if self.category == "parameter":
            head = f"{what} in parameter '{self.param}' before step {self.step} used it: {self.op}"
        else:
            head = f"first {what} born in {self.phase} at step {self.step}: {self.op}"
        if self.backward_node:
            head += f" (gradient, autograd node {self.backward_node})"
        lines = [head]
        where = []
        if self.module is not None:
            root = f" of {self.model}" if self.model else ""
            where.append(f"module '{self.module}'{root}" if self.module else f"module <root>{root}")
        if self.param:
            where.append(f"parameter '{self.param}'")
        where.append(f"at {self.location}")
        lines.append("  " + ", ".join(where))
        if self.code:
            lines.append(f"    {self.code.strip()}")
        lines.append(f"  category: {self.category}{'' if self.exact else ' (not replayed to an op; see why)'}")
        for i, op in enumerate(self.operands):
            lines.append(f"  input {i}: {op.describe()}")
        if self.output is not None:
            lines.append(f"  output:  {self.output.describe()}")
        if self.optimizer_state:
            lines.append("  optimizer state: " + "; ".join(self.optimizer_state))
        lines.append("  why: " + self.explanation)
        if self.consequence:
            lines.append("  then: " + self.consequence)
        if self.suggestions:
            lines.append("  fix:")
            lines.extend(f"    - {s}" for s in self.suggestions)
        return "\n".join(lines)


_FLOAT_FIELDS = {"min", "max", "absmax", "headroom_bits", "dtype_max", "dtype_smallest_normal"}


@dataclass(frozen=True)
class RunResult:
    """What ``floatscope run`` and :class:`floatscope.Watch` report at the end of a run.

    Serialised by :meth:`to_json` into the ``--json`` contract.
    """

    status: Status
    run_id: str
    steps: int
    skipped_steps: int
    incident: Incident | None
    loss_scale: float | None = None
    error: str | None = None
    watched: dict[str, int] = field(default_factory=dict)
    contained: list[Incident] = field(default_factory=list)
    exit_code: int | None = None          # floatscope run's exit status (None for the Python API)
    script_exit_code: int | None = None   # the script's own sys.exit status, when it called one

    def to_dict(self) -> dict[str, Any]:
        data = to_json_value(asdict(self))
        data["incident"] = self.incident.to_dict() if self.incident else None
        data["contained"] = [c.to_dict() for c in self.contained]
        return data

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)
