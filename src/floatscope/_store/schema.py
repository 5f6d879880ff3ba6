"""The run store's schema in one place: its tables, its version and migrations, and the typed
records that the run recorder writes and every reader (``health``, ``diff``, the report, the
public :mod:`floatscope.runs` API) reads.

Versions are integers in SQLite's ``PRAGMA user_version`` (stores of version 1 kept it as the text
``'1'`` in the ``meta`` table, and ``user_version`` 0). A store written by any earlier version
stays readable: readers adapt to the columns present and never write; a writer migrates the file
forward, one step at a time, in one transaction (the plan of coverage.py's ``sqldata.py``).
"""

from __future__ import annotations

import array
import base64
import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from floatscope._results import Incident, to_json_value

__all__ = ["SCHEMA_NAME", "SCHEMA_VERSION", "DDL", "pack_floats", "unpack_floats", "pack_columns", "unpack_columns", "PackedLayout", "MIGRATIONS", "RUN_COLUMNS", "STATUSES", "RunRecord",
           "StepRecord", "Event", "ActivationSample", "ParamSample", "ModelInfo", "PrecisionInfo", "RunConfig"]

SCHEMA_NAME = "floatscope-runs"
SCHEMA_VERSION = 3

# Recorded statuses; "died" is derived by readers for a "running" run whose process is gone.
STATUSES = ("running", "clean", "nonfinite", "error", "interrupted", "terminated", "unwatched", "died")

DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, name TEXT, command TEXT, started REAL NOT NULL, ended REAL,
    status TEXT NOT NULL, steps INTEGER NOT NULL DEFAULT 0, skipped_steps INTEGER NOT NULL DEFAULT 0,
    env TEXT, config TEXT, result TEXT,
    host TEXT, pid INTEGER, proc_start TEXT, heartbeat REAL, exit_code INTEGER);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, loss REAL, grad_norm REAL, loss_scale REAL,
    skipped INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (run_id, step));
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS health (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS fingerprints (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (run_id, step, kind));
CREATE INDEX IF NOT EXISTS events_run ON events (run_id);
CREATE INDEX IF NOT EXISTS health_run ON health (run_id, step);
"""

# MIGRATIONS[k]: the statements that take a store from version k to k + 1.
MIGRATIONS: dict[int, list[str]] = {
    1: [
        # Who is writing the run (liveness for readers: a "running" run whose process is gone died), and
        # how floatscope run exited.
        "ALTER TABLE runs ADD COLUMN host TEXT",
        "ALTER TABLE runs ADD COLUMN pid INTEGER",
        "ALTER TABLE runs ADD COLUMN proc_start TEXT",
        "ALTER TABLE runs ADD COLUMN heartbeat REAL",
        "ALTER TABLE runs ADD COLUMN exit_code INTEGER",
        "CREATE INDEX IF NOT EXISTS events_run ON events (run_id)",
        "CREATE INDEX IF NOT EXISTS health_run ON health (run_id, step)",
    ],
    # Version 3 packs the numbers of health samples and fingerprints (see pack_columns): no table changes,
    # and rows written by version 2 stay readable next to the new ones.
    2: [],
}


# ---------------------------------------------------------------------- packed numbers (version 3)
# A step's health samples (hundreds of layers) and fingerprints (a norm per parameter) are written on
# the training thread. Their floats travel as base64 of little-endian float64: exact, and about thirty
# times cheaper to write than JSON numbers. Readers turn NaN and Inf back into what JSON rows held.


def _doubles(values: list[Any]) -> array.array:
    """float64 array of numbers (None as NaN); TypeError for anything else."""
    try:
        return array.array("d", values)
    except TypeError:
        return array.array("d", [math.nan if v is None else v for v in values])


def _base64(packed: array.array) -> str:
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def pack_floats(values: list[Any]) -> str:
    """Base64 of little-endian float64 (None is written as NaN)."""
    return _base64(_doubles(values))


def unpack_floats(text: str) -> list[float]:
    packed = array.array("d", base64.b64decode(text))
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tolist()


def pack_columns(fields: list[str], layers: list[str], columns: list[list[Any]]) -> dict[str, Any]:
    """One step's samples, column by column: ``{"fields", "layers", "f8", "columns"}``.

    ``columns[j][i]`` is field ``j`` of layer ``i``. The columns of numbers (or None) are packed
    together, in order, as ``"f8"`` (:func:`pack_floats`) and stand as null in ``"columns"``; any
    other column (dtypes, module types, dicts) is a JSON list there, or ``{"all": value}`` when every
    layer has the same value. Non-finite numbers read back as None, as in JSON rows (the
    ``nan``/``inf`` fields say what a layer held).
    """
    numbers = array.array("d")
    packed: list[Any] = []
    for column in columns:
        try:
            numbers.extend(_doubles(column))
        except TypeError:  # not numbers
            packed.append(_pack_other(column))
        else:
            packed.append(None)
    return {"fields": list(fields), "layers": list(layers), "f8": _base64(numbers), "columns": packed}


def _pack_other(column: list[Any]) -> Any:
    column = list(column)
    if column and type(column[0]) is str and column.count(column[0]) == len(column):
        return {"all": column[0]}
    return column if all(type(v) is str for v in column) else to_json_value(column)


class PackedLayout:
    """The part of :func:`pack_columns`'s text that repeats from step to step: the fields, the layers
    and the columns that are not numbers, made into JSON once. The numeric columns come first.

    ``pack(numbers)`` gives the same stored text as :func:`pack_columns` with the numbers' columns, one
    after the other in ``numbers`` (a flat sequence of floats, NaN for no value).
    """

    __slots__ = ("_head", "size")

    def __init__(self, fields: list[str], layers: list[str], numeric: int, others: list[list[Any]]) -> None:
        if numeric + len(others) != len(fields):
            raise ValueError(f"{len(fields)} fields but {numeric} numeric and {len(others)} other columns")
        head = json.dumps({"fields": list(fields), "layers": list(layers),
                           "columns": [None] * numeric + [_pack_other(c) for c in others]})
        self._head = head[:-1] + ', "f8": "'
        self.size = numeric * len(layers)

    def pack(self, numbers: Any) -> str:
        if len(numbers) != self.size:
            raise ValueError(f"{len(numbers)} numbers for a layout of {self.size}")
        return self._head + _base64(_doubles(numbers)) + '"}'


def unpack_columns(table: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The inverse of :func:`pack_columns`: ``[(layer, {field: value})]`` in the stored order."""
    layers = table["layers"]
    n = len(layers)
    numbers = [v if v - v == 0 else None for v in unpack_floats(table["f8"])]
    columns, k = [], 0
    for column in table["columns"]:
        if column is None:
            columns.append(numbers[k * n:(k + 1) * n])
            k += 1
        elif isinstance(column, dict) and "all" in column:
            columns.append([column["all"]] * n)
        else:
            columns.append(column)
    fields = table["fields"]
    return [(layer, dict(zip(fields, (c[i] for c in columns), strict=True))) for i, layer in enumerate(layers)]


RUN_COLUMNS = ("id", "name", "command", "started", "ended", "status", "steps", "skipped_steps", "env", "config",
               "result", "host", "pid", "proc_start", "heartbeat", "exit_code")


@dataclass(frozen=True)
class RunRecord:
    """One run as stored.

    ``status`` is what a reader should believe: a run recorded as ``running`` whose process is gone
    (same host: its pid is dead or reused; another host: no heartbeat for a long time) is
    ``died``. ``recorded_status`` is the value in the file.
    """

    id: str
    name: str | None
    command: str | None
    started: float
    ended: float | None
    status: str
    steps: int
    skipped_steps: int
    env: dict[str, Any]
    result: dict[str, Any] | None
    host: str | None = None
    pid: int | None = None
    heartbeat: float | None = None
    exit_code: int | None = None
    recorded_status: str = ""

    @property
    def incident(self) -> Incident | None:
        data = (self.result or {}).get("incident")
        return Incident.from_dict(data) if data else None

    def to_dict(self) -> dict[str, Any]:
        """The ``floatscope runs --json`` entry of this run."""
        import datetime

        def iso(t: float | None) -> str | None:
            # ISO 8601 with a colon in the offset (+00:00), which datetime.fromisoformat reads on every Python.
            return None if t is None else datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")

        return {"run_id": self.id, "name": self.name or "", "status": self.status, "steps": self.steps,
                "started": iso(self.started), "ended": iso(self.ended), "host": self.host or "",
                "pid": self.pid if self.pid is not None else -1, "command": self.command or ""}


@dataclass(frozen=True)
class StepRecord:
    """One training iteration's numbers."""

    step: int
    loss: float | None
    grad_norm: float | None
    loss_scale: float | None
    skipped: bool


@dataclass(frozen=True)
class Event:
    """An incident or a skipped step, with its JSON data."""

    step: int
    kind: str
    data: dict[str, Any]
    created: float


def _opt(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class ActivationSample:
    """One layer's output statistics at one health-sampling step.

    ``nan``/``inf`` are 1 when the output held any; fractions are of the output's elements;
    ``saturation`` (sigmoid/tanh) and ``dead_frac`` (ReLU) are None where they do not apply.
    """

    step: int
    layer: str
    type: str | None
    dtype: str | None
    absmax: float | None
    rms: float | None
    zero_frac: float | None
    nan: float
    inf: float
    below_normal_frac: float | None
    saturation: float | None
    dead_frac: float | None
    headroom_bits: float | None

    FIELDS = ("absmax", "rms", "zero_frac", "nan", "inf", "below_normal_frac", "saturation", "dead_frac",
              "headroom_bits", "dtype", "type")

    @classmethod
    def from_dict(cls, step: int, layer: str, data: dict[str, Any]) -> "ActivationSample":
        return cls(step=step, layer=layer, type=data.get("type"), dtype=data.get("dtype"),
                   absmax=_opt(data.get("absmax")), rms=_opt(data.get("rms")), zero_frac=_opt(data.get("zero_frac")),
                   nan=float(data.get("nan") or 0), inf=float(data.get("inf") or 0),
                   below_normal_frac=_opt(data.get("below_normal_frac")), saturation=_opt(data.get("saturation")),
                   dead_frac=_opt(data.get("dead_frac")), headroom_bits=_opt(data.get("headroom_bits")))


@dataclass(frozen=True)
class ParamSample:
    """One parameter's gradient and update statistics at one health-sampling step.

    ``grad_flush_frac`` maps a loss-scale factor (``"1"``, ``"16"``, ...) to the fraction of non-zero
    gradient elements that would flush to zero in float16 at that scale (fp16 runs only).
    """

    step: int
    name: str
    grad_norm: float | None = None
    weight_norm: float | None = None
    update_norm: float | None = None
    grad_nonzero: float | None = None
    grad_flush_frac: dict[str, float] | None = None
    grad_absmax: float | None = None
    loss_scale: float | None = None
    update_ratio: float | None = None

    FIELDS = ("grad_norm", "weight_norm", "update_norm", "grad_nonzero", "grad_flush_frac", "grad_absmax",
              "loss_scale", "update_ratio")

    @classmethod
    def from_dict(cls, step: int, name: str, data: dict[str, Any]) -> "ParamSample":
        flush = data.get("grad_flush_frac")
        return cls(step=step, name=name, grad_norm=_opt(data.get("grad_norm")),
                   weight_norm=_opt(data.get("weight_norm")), update_norm=_opt(data.get("update_norm")),
                   grad_nonzero=_opt(data.get("grad_nonzero")),
                   grad_flush_frac={str(k): float(v) for k, v in flush.items()} if isinstance(flush, dict) else None,
                   grad_absmax=_opt(data.get("grad_absmax")), loss_scale=_opt(data.get("loss_scale")),
                   update_ratio=_opt(data.get("update_ratio")))

    def merged(self, other: "ParamSample") -> "ParamSample":
        """This sample with ``other``'s values where this one has none (two rows of one step)."""
        values = {f.name: getattr(self, f.name) if getattr(self, f.name) is not None else getattr(other, f.name)
                  for f in fields(self)}
        return ParamSample(**values)


@dataclass(frozen=True)
class ModelInfo:
    """The first watched model: its class, its modules and its parameters' shapes and dtypes."""

    type: str
    structure: list[tuple[str, str]]               # (module path, class name), in registration order
    parameters: dict[str, tuple[list[int], str]]   # name -> (shape, dtype)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelInfo":
        return cls(type=str(data.get("type", "")), structure=[(str(a), str(b)) for a, b in data.get("structure", [])],
                   parameters={n: (list(v[0]), str(v[1])) for n, v in data.get("parameters", {}).items()})

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "structure": [list(s) for s in self.structure],
                "parameters": {n: [shape, dtype] for n, (shape, dtype) in self.parameters.items()}}

    def numel(self, name: str) -> int:
        shape = self.parameters.get(name, ([1], ""))[0]
        return max(1, math.prod(shape))


@dataclass(frozen=True)
class PrecisionInfo:
    """Precision settings as of the first model call."""

    autocast: list[dict[str, Any]]    # [{"device": str, "enabled": bool, "dtype": str}]
    param_dtypes: list[str]
    default_dtype: str | None
    grad_scaler: bool

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrecisionInfo":
        return cls(autocast=list(data.get("autocast", [])), param_dtypes=list(data.get("param_dtypes", [])),
                   default_dtype=data.get("default_dtype"), grad_scaler=bool(data.get("grad_scaler", False)))

    @property
    def uses_float16(self) -> bool:
        return "float16" in self.param_dtypes or any(a.get("dtype") == "float16" for a in self.autocast)


@dataclass(frozen=True)
class RunConfig:
    """What a run was configured with, as the recorder wrote it (``diff`` compares these).

    Keys of the stored JSON are the field names; unknown keys (a later version's) are kept in
    ``extra``.
    """

    on_anomaly: str | None = None
    global_watch: bool | None = None
    max_consecutive_skips: int | None = None
    health_every: int | None = None
    model: ModelInfo | None = None
    precision: PrecisionInfo | None = None
    optimizers: list[dict[str, Any]] = field(default_factory=list)
    grad_scaler: dict[str, Any] | None = None
    init: dict[str, dict[str, float]] = field(default_factory=dict)      # param -> mean, std, absmax, norm
    data: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # batchN -> per input mean/std/min/max
    seeds: dict[str, Any] | None = None
    fingerprint_params: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    _KEYS = {"global": "global_watch"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            name = cls._KEYS.get(key, key)
            if name in known and name != "extra":
                values[name] = value
            else:
                extra[key] = value
        if isinstance(values.get("model"), dict):
            values["model"] = ModelInfo.from_dict(values["model"])
        if isinstance(values.get("precision"), dict):
            values["precision"] = PrecisionInfo.from_dict(values["precision"])
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The stored JSON form (what ``diff`` flattens and compares)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None or value == [] or value == {}:
                continue
            key = next((k for k, v in self._KEYS.items() if v == f.name), f.name)
            out[key] = value.to_dict() if isinstance(value, ModelInfo) else (
                asdict(value) if isinstance(value, PrecisionInfo) else value)
        out.update(self.extra)
        return out

    @staticmethod
    def patch(**values: Any) -> dict[str, Any]:
        """A JSON patch of the stored configuration, from typed field values (the recorder's only way in)."""
        known = {f.name for f in fields(RunConfig)} - {"extra"}
        out: dict[str, Any] = {}
        for name, value in values.items():
            if name not in known:
                raise TypeError(f"RunConfig has no field {name!r}")
            key = next((k for k, v in RunConfig._KEYS.items() if v == name), name)
            out[key] = value.to_dict() if isinstance(value, ModelInfo) else (
                asdict(value) if isinstance(value, PrecisionInfo) else value)
        return out
