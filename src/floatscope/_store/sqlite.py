"""The run store: one SQLite file holding runs, their per-step numbers and their events.

Written in WAL mode and committed at least every ``commit_interval`` seconds and at every event,
so everything committed before a crash or ``kill -9`` of the training process stays readable.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from floatscope._errors import StoreError
from floatscope._results import Incident, to_json_value

__all__ = ["RunStore", "RunRecord", "StepRecord", "DEFAULT_STORE"]

DEFAULT_STORE = Path(".floatscope") / "runs.sqlite"
_SCHEMA_NAME = "floatscope-runs"
_SCHEMA_VERSION = "1"

_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, name TEXT, command TEXT, started REAL NOT NULL, ended REAL,
    status TEXT NOT NULL, steps INTEGER NOT NULL DEFAULT 0, skipped_steps INTEGER NOT NULL DEFAULT 0,
    env TEXT, config TEXT, result TEXT);
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
"""


@dataclass(frozen=True)
class RunRecord:
    """One run as stored."""

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

    @property
    def incident(self) -> Incident | None:
        data = (self.result or {}).get("incident")
        return Incident.from_dict(data) if data else None


@dataclass(frozen=True)
class StepRecord:
    step: int
    loss: float | None
    grad_norm: float | None
    loss_scale: float | None
    skipped: bool


class RunStore:
    """A floatscope run store (SQLite).

    Args:
        path: The database file; created with its folder when missing.

    Raises:
        StoreError: the file is not SQLite, is corrupt, or is an SQLite file of something else.

    Example:
        >>> store = RunStore(tmp_path / "runs.sqlite")  # doctest: +SKIP
        >>> [r.id for r in store.runs()]  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_STORE, *, commit_interval: float = 0.5) -> None:
        self.path = Path(path)
        self.commit_interval = commit_interval
        self._last_commit = time.monotonic()
        if self.path.exists() and self.path.is_dir():
            raise StoreError(f"run store {self.path} is a directory; pass a file path such as {self.path / 'runs.sqlite'}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=10.0, check_same_thread=False)
            self._check_and_init()
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"{self.path} is not a readable floatscope run store ({exc}); it may be corrupt or another "
                f"program's file. Pass a different file with --store PATH, or move this one aside."
            ) from None
        except OSError as exc:
            raise StoreError(f"cannot open run store {self.path}: {exc.strerror or exc}") from None

    def _check_and_init(self) -> None:
        db = self._db
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "meta" not in tables:
            raise StoreError(
                f"{self.path} is an SQLite database but not a floatscope run store (it has tables "
                f"{', '.join(sorted(tables)[:5])}). Pass a different file with --store PATH."
            )
        if "meta" in tables:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("schema") != _SCHEMA_NAME:
                raise StoreError(f"{self.path} is not a floatscope run store. Pass a different file with --store PATH.")
            if meta.get("version") != _SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} was written by a floatscope with store version {meta.get('version')}; this "
                    f"floatscope reads version {_SCHEMA_VERSION}. Use a new --store PATH."
                )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_DDL)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?), ('version', ?)", (_SCHEMA_NAME, _SCHEMA_VERSION))
        db.commit()

    # ------------------------------------------------------------------ writing
    def new_run(self, *, name: str | None = None, command: str | None = None, env: dict[str, Any] | None = None,
                config: dict[str, Any] | None = None) -> str:
        """Create a run in status ``running`` and return its id."""
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self._db.execute(
            "INSERT INTO runs (id, name, command, started, status, env, config) VALUES (?, ?, ?, ?, 'running', ?, ?)",
            (run_id, name, command, time.time(), json.dumps(to_json_value(env or {})),
             json.dumps(to_json_value(config or {}))),
        )
        self._db.commit()
        return run_id

    def add_step(self, run_id: str, step: int, *, loss: float | None, grad_norm: float | None,
                 loss_scale: float | None, skipped: bool) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO steps VALUES (?, ?, ?, ?, ?, ?)",
            (run_id, step, _real(loss), _real(grad_norm), _real(loss_scale), int(skipped)),
        )
        self._maybe_commit()

    def set_step_scale(self, run_id: str, step: int, loss_scale: float) -> None:
        self._db.execute("UPDATE steps SET loss_scale=? WHERE run_id=? AND step=?", (loss_scale, run_id, step))
        self._maybe_commit()

    def add_event(self, run_id: str, step: int, kind: str, data: dict[str, Any]) -> None:
        self._db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                         (run_id, step, kind, json.dumps(to_json_value(data)), time.time()))
        self.commit()

    def finish_run(self, run_id: str, *, status: str, steps: int, skipped_steps: int,
                   result: dict[str, Any] | None) -> None:
        self._db.execute(
            "UPDATE runs SET ended=?, status=?, steps=?, skipped_steps=?, result=? WHERE id=?",
            (time.time(), status, steps, skipped_steps, json.dumps(to_json_value(result)) if result else None, run_id),
        )
        self.commit()

    def add_health(self, run_id: str, step: int, kind: str, fields: list[str],
                   layers: dict[str, list[Any]]) -> None:
        """One step's health samples of one kind ("activation" or "param") for every layer.

        Stored as one row (kind "activations"/"params", data ``{"fields": [...], "layers": {layer:
        [value, ...]}}``); :meth:`health` reads it back one record per layer.
        """
        data = {"fields": fields, "layers": layers}
        self._db.execute("INSERT INTO health VALUES (?, ?, ?, ?, ?)", (run_id, step, "", kind + "s", _dumps(data)))
        self._maybe_commit()

    def add_fingerprint(self, run_id: str, step: int, kind: str, values: list[float]) -> None:
        """Per-parameter fingerprints of one step: kind "grad" or "weight" (after the step)."""
        if all(map(math.isfinite, values)):
            data = json.dumps(values)
        else:
            data = json.dumps([_json_float(v) for v in values])
        self._db.execute("INSERT OR REPLACE INTO fingerprints VALUES (?, ?, ?, ?)", (run_id, step, kind, data))
        self._maybe_commit()

    def update_config(self, run_id: str, patch: dict[str, Any]) -> None:
        """Merge ``patch`` into the run's recorded configuration."""
        row = self._db.execute("SELECT config FROM runs WHERE id=?", (run_id,)).fetchone()
        config = json.loads(row[0]) if row and row[0] else {}
        config.update(to_json_value(patch))
        self._db.execute("UPDATE runs SET config=? WHERE id=?", (json.dumps(config), run_id))
        self._maybe_commit()

    def update_env(self, run_id: str, env: dict[str, Any]) -> None:
        self._db.execute("UPDATE runs SET env=? WHERE id=?", (json.dumps(to_json_value(env)), run_id))
        self._maybe_commit()

    def config(self, run_id: str) -> dict[str, Any]:
        row = self._db.execute("SELECT config FROM runs WHERE id=?", (run_id,)).fetchone()
        return json.loads(row[0]) if row and row[0] else {}

    def health(self, run_id: str) -> list[tuple[int, str, str, dict[str, Any]]]:
        """(step, layer, "activation" | "param", record) for every health sample of a run, in order."""
        rows = self._db.execute("SELECT step, name, kind, data FROM health WHERE run_id=? ORDER BY step, rowid",
                                (run_id,)).fetchall()
        out = []
        for step, name, kind, data in rows:
            if kind in ("activations", "params"):
                table = json.loads(data)
                fields = table["fields"]
                out.extend((step, layer, kind[:-1], dict(zip(fields, values, strict=False)))
                           for layer, values in table["layers"].items())
            else:  # one row per layer (stores written before packing)
                out.append((step, name, kind, json.loads(data)))
        return out

    def fingerprints(self, run_id: str, kind: str) -> dict[int, list[float | str | None]]:
        rows = self._db.execute("SELECT step, data FROM fingerprints WHERE run_id=? AND kind=? ORDER BY step",
                                (run_id, kind)).fetchall()
        return {step: json.loads(data) for step, data in rows}

    def update_progress(self, run_id: str, *, steps: int, skipped_steps: int) -> None:
        self._db.execute("UPDATE runs SET steps=?, skipped_steps=? WHERE id=?", (steps, skipped_steps, run_id))
        self._maybe_commit()

    def commit(self) -> None:
        self._db.commit()
        self._last_commit = time.monotonic()

    def _maybe_commit(self) -> None:
        if time.monotonic() - self._last_commit >= self.commit_interval:
            self.commit()

    def close(self) -> None:
        try:
            self._db.commit()
        finally:
            self._db.close()

    # ------------------------------------------------------------------ reading
    def runs(self) -> list[RunRecord]:
        """All runs, newest first."""
        rows = self._db.execute("SELECT * FROM runs ORDER BY started DESC").fetchall()
        return [self._record(r) for r in rows]

    def get(self, run_id: str) -> RunRecord:
        """The run with this id, id prefix, or ``last``.

        Raises:
            StoreError: no run, or several runs, match.
        """
        if run_id == "last":
            row = self._db.execute("SELECT * FROM runs ORDER BY started DESC LIMIT 1").fetchone()
            if row is None:
                raise StoreError(f"the run store {self.path} has no runs yet")
            return self._record(row)
        rows = self._db.execute("SELECT * FROM runs WHERE id LIKE ? ORDER BY started DESC",
                                (run_id.replace("%", "") + "%",)).fetchall()
        if not rows:
            raise StoreError(f"no run '{run_id}' in {self.path}; 'floatscope runs' lists the runs")
        if len(rows) > 1 and rows[0][0] != run_id:
            ids = ", ".join(r[0] for r in rows[:5])
            raise StoreError(f"'{run_id}' matches {len(rows)} runs ({ids}); give more of the id")
        return self._record(rows[0])

    def steps(self, run_id: str) -> list[StepRecord]:
        rows = self._db.execute(
            "SELECT step, loss, grad_norm, loss_scale, skipped FROM steps WHERE run_id=? ORDER BY step", (run_id,)
        ).fetchall()
        return [StepRecord(s, _unreal(l), _unreal(g), _unreal(sc), bool(k)) for s, l, g, sc, k in rows]

    def events(self, run_id: str) -> Iterator[tuple[int, str, dict[str, Any]]]:
        for step, kind, data in self._db.execute(
            "SELECT step, kind, data FROM events WHERE run_id=? ORDER BY created", (run_id,)
        ):
            yield step, kind, json.loads(data)

    def _record(self, row: tuple[Any, ...]) -> RunRecord:
        rid, name, command, started, ended, status, steps, skipped, env, _config, result = row
        return RunRecord(rid, name, command, started, ended, status, steps, skipped,
                         json.loads(env) if env else {}, json.loads(result) if result else None)


def _dumps(data: Any) -> str:
    """Strict JSON of a record (non-finite floats as null); the common all-finite case without a copy."""
    text = json.dumps(data)
    if "NaN" in text or "Infinity" in text:
        text = json.dumps(to_json_value(data))
    return text


def _json_float(value: float) -> float | str:
    """Fingerprints keep NaN and Inf visible: as the strings "nan", "inf", "-inf"."""
    if value != value:
        return "nan"
    if value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return value


def _real(value: float | None) -> float | str | None:
    """SQLite turns a NaN REAL into NULL; store non-finite values as the text "nan"/"inf"/"-inf"."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else _json_float(value)


def _unreal(value: Any) -> float | None:
    if isinstance(value, str):
        return float(value)
    return value
