"""The run store: one SQLite file holding runs, their per-step numbers, health samples and events.

Many processes write one store and any number read it while they do:

- **Readers** (``RunStore(path, readonly=True)``: ``runs``, ``show``, ``health``, ``report``,
  ``diff``) open the file read-only in WAL mode and never write, create or initialise anything: a
  reader never waits for a writer, and a writer never waits for a reader.
- **Writers** (one per watched run: every ``floatscope run``, every rank of a distributed job) keep
  what they record in memory and write it in one short ``BEGIN IMMEDIATE`` transaction every
  ``commit_interval`` seconds and at every event. A transaction holds the write lock for about a
  millisecond. A periodic commit that finds the lock taken waits at most ``_COMMIT_WAIT`` (50 ms),
  keeps its rows and tries again later, backing off while the lock stays taken (and warns once
  after ``busy_timeout``): training never stops for the store. Run starts, events and the final
  commit wait for the lock (``busy_timeout``, and the final one until it is free).

Everything committed before a crash, a signal or ``kill -9`` stays readable. SQLite's locking
needs a local filesystem: on NFS or Lustre give each process its own file (see the README).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import time
import urllib.parse
import uuid
import warnings
from pathlib import Path
from typing import Any

from floatscope._errors import StoreError
from floatscope._results import to_json_value
from floatscope._store.schema import (DDL, MIGRATIONS, RUN_COLUMNS, SCHEMA_NAME, SCHEMA_VERSION, ActivationSample,
                                      Event, PackedLayout, ParamSample, RunConfig, RunRecord, StepRecord, pack_columns,
                                      pack_floats,
                                      unpack_columns, unpack_floats)

__all__ = ["RunStore", "RunRecord", "StepRecord", "StoreMissing", "DEFAULT_STORE"]

DEFAULT_STORE = Path(".floatscope") / "runs.sqlite"
# A run recorded as running on another host with no heartbeat for this long is presumed dead.
_REMOTE_STALE_SECONDS = 15 * 60


class StoreMissing(StoreError):
    """There is no store at the path (for a reader: no runs yet)."""


class RunStore:
    """A floatscope run store (SQLite).

    Args:
        path: The database file. A writer creates it (and its folder) when missing.
        readonly: Open as a reader: never writes, never creates the file, never waits on writers.
        commit_interval: A writer commits what it recorded at least this often (seconds).
        busy_timeout: How long a writer waits for another writer's transaction to end (seconds).

    Raises:
        StoreMissing: ``readonly`` and there is no file at ``path``.
        StoreError: the file is not SQLite, is corrupt, is another program's SQLite file, was
            written by a newer floatscope, or cannot be opened (permissions, a busy lock).

    Example:
        >>> with RunStore(tmp_path / "runs.sqlite", readonly=True) as store:  # doctest: +SKIP
        ...     [r.id for r in store.runs()]
    """

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_STORE, *, readonly: bool = False,
                 commit_interval: float = 0.5, busy_timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.commit_interval = commit_interval
        self.busy_timeout = busy_timeout
        self._last_commit = time.monotonic()
        self._pending: list[tuple[str, tuple[Any, ...]]] = []
        self._config_patches: dict[str, dict[str, Any]] = {}
        self._live: dict[str, bool] = {}  # runs this process writes: their heartbeat goes with each commit
        self._warned = False
        self._locked_since: float | None = None  # first failed periodic commit of the current lock
        self._failures = 0
        self._periodic = False  # inside a commit made by _maybe_commit (the training thread's)
        self._db: sqlite3.Connection | None = None
        if self.path.exists() and self.path.is_dir():
            raise StoreError(f"run store {self.path} is a directory; pass a file path such as "
                             f"{self.path / 'runs.sqlite'}")
        if readonly:
            self._open_reader()
        else:
            self._open_writer()

    # ------------------------------------------------------------------ opening
    def _open_reader(self) -> None:
        if not self.path.exists():
            raise StoreMissing(f"no run store at {self.path}: no runs yet (floatscope run SCRIPT records one; "
                               f"--store PATH reads another store)")
        uri = "file:" + urllib.parse.quote(str(self.path.resolve())) + "?mode=ro"
        try:
            self._db = sqlite3.connect(uri, uri=True, timeout=5.0, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA query_only=ON")
            self._user_version, self._columns = self._check(self._db, writer=False)
        except sqlite3.OperationalError as exc:
            if self._db is not None:
                self._db.close()
            if _is_locked(exc):
                raise self._busy_error() from None
            # A read-only folder without the WAL index files: the file cannot change under us, read it as is.
            try:
                self._db = sqlite3.connect(uri.replace("mode=ro", "mode=ro&immutable=1"), uri=True,
                                           check_same_thread=False, isolation_level=None)
                self._user_version, self._columns = self._check(self._db, writer=False)
            except sqlite3.DatabaseError as again:
                raise self._open_error(again) from None
        except sqlite3.DatabaseError as exc:
            raise self._open_error(exc) from None

    def _open_writer(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the run store's folder {self.path.parent}: {exc.strerror or exc} "
                             f"(a read-only location? pass --store PATH somewhere writable, or --no-store)") from None
        if self.path.exists() and not os.access(self.path, os.W_OK):
            raise StoreError(f"the run store {self.path} is read-only for this user; pass --store PATH somewhere "
                             f"writable, or --no-store")
        if not os.access(self.path.parent, os.W_OK):
            raise StoreError(f"the folder {self.path.parent} is read-only for this user (SQLite needs to create "
                             f"files next to the store); pass --store PATH somewhere writable, or --no-store")
        try:
            self._db = sqlite3.connect(str(self.path), timeout=self.busy_timeout, check_same_thread=False,
                                       isolation_level=None)
            db = self._db
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("BEGIN IMMEDIATE")
            try:
                self._user_version, self._columns = self._check(db, writer=True)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            if self._db is not None:
                self._db.close()
            if _is_locked(exc):
                raise self._busy_error() from None
            raise self._open_error(exc) from None
        except sqlite3.DatabaseError as exc:
            if self._db is not None:
                self._db.close()
            raise self._open_error(exc) from None

    def _check(self, db: sqlite3.Connection, *, writer: bool) -> tuple[int, tuple[str, ...]]:
        """Validate the file; a writer creates or migrates it. Returns (version, columns of ``runs``)."""
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "meta" not in tables:
            raise StoreError(f"{self.path} is an SQLite database but not a floatscope run store (it has tables "
                             f"{', '.join(sorted(tables)[:5])}). Pass a different file with --store PATH.")
        version = SCHEMA_VERSION
        if "meta" in tables:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("schema") != SCHEMA_NAME:
                raise StoreError(f"{self.path} is not a floatscope run store. Pass a different file with --store PATH.")
            version = int(db.execute("PRAGMA user_version").fetchone()[0]) or int(meta.get("version", "1"))
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} was written by a newer floatscope (store version {version}); this "
                                 f"floatscope reads versions 1 to {SCHEMA_VERSION}. Upgrade floatscope "
                                 f"(pip install -U floatscope).")
            if writer and version < SCHEMA_VERSION:
                for v in range(version, SCHEMA_VERSION):
                    for statement in MIGRATIONS[v]:
                        db.execute(statement)
                version = SCHEMA_VERSION
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (str(SCHEMA_VERSION),))
        elif writer:
            for statement in (s.strip() for s in DDL.split(";")):
                if statement:
                    db.execute(statement)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?), ('version', ?)",
                       (SCHEMA_NAME, str(SCHEMA_VERSION)))
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        else:  # an empty file (a reader never initialises one)
            raise StoreMissing(f"{self.path} is an empty file, not a run store yet: no runs")
        columns = tuple(r[1] for r in db.execute("PRAGMA table_info(runs)"))
        return version, columns

    def _busy_error(self) -> StoreError:
        return StoreError(f"the run store {self.path} is busy: another process held its write lock for longer than "
                          f"{self.busy_timeout:g} s. The file is fine; try again, or pass --store PATH to use "
                          f"another one.")

    def _open_error(self, exc: sqlite3.DatabaseError) -> StoreError:
        text = str(exc)
        if _is_locked(exc):
            return self._busy_error()
        if "readonly" in text or "read-only" in text or "unable to open" in text:
            return StoreError(f"cannot open the run store {self.path} ({text}): a read-only location or missing "
                              f"permissions. Pass --store PATH to a writable file.")
        return StoreError(f"{self.path} is not a readable floatscope run store ({text}): it is corrupt or another "
                          f"program's file. Pass a different file with --store PATH, or move this one aside.")

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def version(self) -> int:
        """The store's schema version as found on opening (a writer has migrated it to the current one)."""
        return self._user_version

    # ------------------------------------------------------------------ writing
    def _writer(self) -> sqlite3.Connection:
        if self.readonly or self._db is None:
            raise StoreError(f"the run store {self.path} was opened read-only")
        return self._db

    def new_run(self, *, name: str | None = None, command: str | None = None, env: dict[str, Any] | None = None,
                config: dict[str, Any] | None = None) -> str:
        """Create a run in status ``running``, owned by this process, and return its id."""
        db = self._writer()
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        now = time.time()
        self._transaction(db, [(
            "INSERT INTO runs (id, name, command, started, status, env, config, host, pid, proc_start, heartbeat) "
            "VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?)",
            (run_id, name, command, now, json.dumps(to_json_value(env or {})), json.dumps(to_json_value(config or {})),
             socket.gethostname(), os.getpid(), _proc_start(os.getpid()), now))], wait=True)
        self._live[run_id] = True
        return run_id

    def add_step(self, run_id: str, step: int, *, loss: float | None, grad_norm: float | None,
                 loss_scale: float | None, skipped: bool) -> None:
        self._pending.append(("INSERT OR REPLACE INTO steps VALUES (?, ?, ?, ?, ?, ?)",
                              (run_id, step, _real(loss), _real(grad_norm), _real(loss_scale), int(skipped))))
        self._maybe_commit()

    def set_step_scale(self, run_id: str, step: int, loss_scale: float) -> None:
        self._pending.append(("UPDATE steps SET loss_scale=? WHERE run_id=? AND step=?", (loss_scale, run_id, step)))
        self._maybe_commit()

    def add_event(self, run_id: str, step: int, kind: str, data: dict[str, Any]) -> None:
        """An event (an incident, a skipped step): committed now."""
        self._pending.append(("INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                              (run_id, step, kind, json.dumps(to_json_value(data)), time.time())))
        self._periodic = True  # the training thread: a held lock postpones it, the final commit waits
        try:
            self.commit()
        finally:
            self._periodic = False

    def finish_run(self, run_id: str, *, status: str, steps: int, skipped_steps: int,
                   result: dict[str, Any] | None) -> None:
        """The run's final status and result: committed now (waiting for the lock as long as it takes)."""
        self._pending.append((
            "UPDATE runs SET ended=?, status=?, steps=?, skipped_steps=?, result=? WHERE id=?",
            (time.time(), status, steps, skipped_steps, json.dumps(to_json_value(result)) if result else None, run_id)))
        self._live.pop(run_id, None)
        self.commit(wait=True)

    def set_exit_code(self, run_id: str, code: int) -> None:
        """How ``floatscope run`` exited for this run (committed now)."""
        if "exit_code" in self._columns:
            self._pending.append(("UPDATE runs SET exit_code=? WHERE id=?", (code, run_id)))
            self.commit(wait=True)

    def add_health(self, run_id: str, step: int, kind: str, fields: list[str], layers: list[str],
                   columns: list[list[Any]]) -> None:
        """One step's health samples of one kind ("activation" or "param") for every layer.

        ``columns[j][i]`` is field ``j`` of layer ``i``. Stored as one row (kind "activations"/"params",
        data :func:`~floatscope._store.schema.pack_columns`); :meth:`activations` and :meth:`params`
        read them back as typed samples.
        """
        data = json.dumps(pack_columns(fields, layers, columns))
        self._pending.append(("INSERT INTO health VALUES (?, ?, ?, ?, ?)", (run_id, step, "", kind + "s", data)))
        self._maybe_commit()

    def add_packed_health(self, run_id: str, step: int, kind: str, layout: PackedLayout, numbers: Any) -> None:
        """:meth:`add_health` for samples whose layers and other columns repeat (``layout``): the
        numeric columns, one after the other, in ``numbers`` (NaN for no value)."""
        self._pending.append(("INSERT INTO health VALUES (?, ?, ?, ?, ?)", (run_id, step, "", kind + "s",
                                                                           layout.pack(numbers))))
        self._maybe_commit()

    def delete_health(self, run_id: str, kind: str, steps: list[int]) -> None:
        """Delete the health samples of one kind ("activation" or "param") of ``steps`` (in order with
        the writes buffered before and after)."""
        for step in sorted(set(steps)):
            self._pending.append(("DELETE FROM health WHERE run_id=? AND step=? AND kind=?", (run_id, step, kind + "s")))
        self._maybe_commit()

    def add_fingerprint(self, run_id: str, step: int, kind: str, values: list[float]) -> None:
        """Per-parameter fingerprints of one step: kind "grad" or "weight" (after the step), packed
        (``{"f8": base64}``, :func:`~floatscope._store.schema.pack_floats`)."""
        data = '{"f8": "' + pack_floats(values) + '"}'
        self._pending.append(("INSERT OR REPLACE INTO fingerprints VALUES (?, ?, ?, ?)", (run_id, step, kind, data)))
        self._maybe_commit()

    def update_config(self, run_id: str, patch: dict[str, Any]) -> None:
        """Merge ``patch`` (from :meth:`RunConfig.patch`) into the run's recorded configuration."""
        self._config_patches.setdefault(run_id, {}).update(to_json_value(patch))
        self._maybe_commit()

    def update_env(self, run_id: str, env: dict[str, Any]) -> None:
        self._pending.append(("UPDATE runs SET env=? WHERE id=?", (json.dumps(to_json_value(env)), run_id)))
        self._maybe_commit()

    def update_progress(self, run_id: str, *, steps: int, skipped_steps: int) -> None:
        self._pending.append(("UPDATE runs SET steps=?, skipped_steps=? WHERE id=?", (steps, skipped_steps, run_id)))
        self._maybe_commit()

    def commit(self, *, wait: bool = False) -> None:
        """Write everything recorded so far in one short transaction.

        When another writer holds the lock past ``busy_timeout`` the rows are kept for the next commit
        (with one warning), unless ``wait``, which retries until the lock is free.
        """
        if self.readonly or self._db is None:
            return
        statements = self._pending
        patches = self._config_patches
        heartbeat = [("UPDATE runs SET heartbeat=? WHERE id=?", (time.time(), rid)) for rid in self._live]
        if not statements and not patches and not heartbeat:
            return
        self._pending, self._config_patches = [], {}
        ops: list[Any] = list(statements)
        for run_id, patch in patches.items():
            ops.append(_ConfigMerge(run_id, patch))
        ops.extend(heartbeat)
        quick = not wait and self._periodic
        if quick:  # the training thread calls this: never hold it up for long
            self._db.execute(f"PRAGMA busy_timeout={int(_COMMIT_WAIT * 1000)}")
        try:
            done = self._transaction(self._db, ops, wait=wait, quiet=quick)
        finally:
            if quick:
                self._db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        self._last_commit = time.monotonic()
        if done:
            self._locked_since, self._failures = None, 0
        else:  # keep them, in order, ahead of what comes next
            self._pending = statements + self._pending
            for run_id, patch in patches.items():
                self._config_patches[run_id] = {**patch, **self._config_patches.get(run_id, {})}
            self._failures += 1
            now = time.monotonic()
            self._locked_since = self._locked_since if self._locked_since is not None else now
            if quick and now - self._locked_since >= self.busy_timeout and not self._warned:
                self._warned = True
                warnings.warn(f"floatscope: the run store {self.path} has been locked by another process for "
                              f"{now - self._locked_since:.0f} s; the rows are kept in memory and written when it "
                              f"is free (training goes on)", RuntimeWarning, stacklevel=2)

    def _transaction(self, db: sqlite3.Connection, ops: list[Any], *, wait: bool, quiet: bool = False) -> bool:
        deadline = time.monotonic() + (24 * 3600 if wait else 0)
        while True:
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    for op in ops:
                        if isinstance(op, _ConfigMerge):
                            op.apply(db)
                        else:
                            db.execute(*op)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                return True
            except sqlite3.OperationalError as exc:
                if not _is_locked(exc):
                    raise StoreError(f"writing the run store {self.path} failed: {exc}") from None
                if time.monotonic() < deadline:
                    continue  # busy_timeout already waited; keep waiting for a final write
                if not self._warned and not quiet:
                    self._warned = True
                    warnings.warn(f"floatscope: the run store {self.path} stayed locked by another process for "
                                  f"{self.busy_timeout:g} s; its rows are kept and written at the next commit",
                                  RuntimeWarning, stacklevel=3)
                return False

    def _maybe_commit(self) -> None:
        # While another process holds the lock, wait longer between tries (up to 10 s).
        interval = min(self.commit_interval * 2 ** min(self._failures, 6), max(self.commit_interval, 10.0))
        if time.monotonic() - self._last_commit >= interval:
            self._periodic = True
            try:
                self.commit()
            finally:
                self._periodic = False

    def close(self) -> None:
        if self._db is None:
            return
        try:
            if not self.readonly:
                self.commit(wait=True)
        finally:
            self._db.close()
            self._db = None

    # ------------------------------------------------------------------ reading
    def _reader(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"the run store {self.path} is closed")
        return self._db

    def _select_runs(self, where: str = "", params: tuple[Any, ...] = (), limit: str = "") -> list[RunRecord]:
        cols = ", ".join(c if c in self._columns else f"NULL AS {c}" for c in RUN_COLUMNS)
        rows = self._reader().execute(f"SELECT {cols} FROM runs {where} ORDER BY started DESC {limit}",
                                      params).fetchall()
        return [self._record(r) for r in rows]

    def runs(self) -> list[RunRecord]:
        """All runs, newest first."""
        return self._select_runs()

    def get(self, run_id: str) -> RunRecord:
        """The run with this id, id prefix, or ``last``.

        Raises:
            StoreError: no run, or several runs, match.
        """
        if run_id == "last":
            found = self._select_runs(limit="LIMIT 1")
            if not found:
                raise StoreError(f"the run store {self.path} has no runs yet")
            return found[0]
        found = self._select_runs("WHERE id LIKE ?", (run_id.replace("%", "") + "%",))
        if not found:
            raise StoreError(f"no run '{run_id}' in {self.path}; 'floatscope runs' lists the runs")
        if len(found) > 1 and found[0].id != run_id:
            ids = ", ".join(r.id for r in found[:5])
            raise StoreError(f"'{run_id}' matches {len(found)} runs ({ids}); give more of the id")
        return found[0]

    def config(self, run_id: str) -> RunConfig:
        row = self._reader().execute("SELECT config FROM runs WHERE id=?", (run_id,)).fetchone()
        return RunConfig.from_dict(json.loads(row[0]) if row and row[0] else {})

    def steps(self, run_id: str) -> list[StepRecord]:
        rows = self._reader().execute(
            "SELECT step, loss, grad_norm, loss_scale, skipped FROM steps WHERE run_id=? ORDER BY step", (run_id,)
        ).fetchall()
        return [StepRecord(s, _unreal(l), _unreal(g), _unreal(sc), bool(k)) for s, l, g, sc, k in rows]

    def events(self, run_id: str) -> list[Event]:
        rows = self._reader().execute("SELECT step, kind, data, created FROM events WHERE run_id=? ORDER BY created",
                                      (run_id,)).fetchall()
        return [Event(step, kind, json.loads(data), created) for step, kind, data, created in rows]

    def _health_rows(self, run_id: str, kind: str) -> list[tuple[int, str, dict[str, Any]]]:
        rows = self._reader().execute(
            "SELECT step, name, kind, data FROM health WHERE run_id=? AND kind IN (?, ?) ORDER BY step, rowid",
            (run_id, kind, kind + "s")).fetchall()
        out = []
        for step, name, row_kind, data in rows:
            if row_kind == kind + "s":  # one row per step
                table = json.loads(data)
                if "columns" in table:  # version 3: packed columns
                    out.extend((step, layer, values) for layer, values in unpack_columns(table))
                    continue
                names = table["fields"]  # version 2: {"fields": [...], "layers": {layer: [value, ...]}}
                out.extend((step, layer, dict(zip(names, values, strict=False)))
                           for layer, values in table["layers"].items())
            else:  # one row per layer (version 1 stores)
                out.append((step, name, json.loads(data)))
        return out

    def activations(self, run_id: str) -> list[ActivationSample]:
        """Every activation health sample of a run, by step then layer order."""
        return [ActivationSample.from_dict(step, layer, data) for step, layer, data in
                self._health_rows(run_id, "activation")]

    def params(self, run_id: str) -> list[ParamSample]:
        """Every parameter health sample of a run; several rows of one (step, name) are merged."""
        merged: dict[tuple[int, str], ParamSample] = {}
        for step, name, data in self._health_rows(run_id, "param"):
            sample = ParamSample.from_dict(step, name, data)
            key = (step, name)
            merged[key] = sample.merged(merged[key]) if key in merged else sample
        return list(merged.values())

    def fingerprints(self, run_id: str, kind: str) -> dict[int, list[float | str | None]]:
        """Per-parameter norms per step (``kind`` "grad" or "weight"), in ``RunConfig.fingerprint_params`` order."""
        rows = self._reader().execute("SELECT step, data FROM fingerprints WHERE run_id=? AND kind=? ORDER BY step",
                                      (run_id, kind)).fetchall()
        out: dict[int, list[float | str | None]] = {}
        for step, data in rows:
            if data.startswith("{"):  # version 3: packed float64
                out[step] = [v if v - v == 0 else _json_float(v) for v in unpack_floats(json.loads(data)["f8"])]
            else:  # a JSON list, NaN and Inf as strings
                out[step] = json.loads(data)
        return out

    def _record(self, row: tuple[Any, ...]) -> RunRecord:
        (rid, name, command, started, ended, status, steps, skipped, env, _config, result, host, pid, proc_start,
         heartbeat, exit_code) = row
        shown = status
        if status == "running" and rid not in self._live and not _alive(host, pid, proc_start, heartbeat):
            shown = "died"
        return RunRecord(rid, name, command, started, ended, shown, steps, skipped,
                         json.loads(env) if env else {}, json.loads(result) if result else None, host=host, pid=pid,
                         heartbeat=heartbeat, exit_code=exit_code, recorded_status=status)


class _ConfigMerge:
    """Merge a patch into a run's stored configuration inside the commit's transaction."""

    def __init__(self, run_id: str, patch: dict[str, Any]) -> None:
        self.run_id, self.patch = run_id, patch

    def apply(self, db: sqlite3.Connection) -> None:
        row = db.execute("SELECT config FROM runs WHERE id=?", (self.run_id,)).fetchone()
        config = json.loads(row[0]) if row and row[0] else {}
        config.update(self.patch)
        db.execute("UPDATE runs SET config=? WHERE id=?", (json.dumps(config), self.run_id))


_COMMIT_WAIT = 0.05  # seconds a periodic commit waits for another writer's lock


def _is_locked(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _proc_start(pid: int) -> str | None:
    """The process's start time (Linux: ticks since boot, from /proc), which tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19] if ")" in stat else None


def _alive(host: str | None, pid: int | None, proc_start: str | None, heartbeat: float | None) -> bool:
    """Is the process that records this run still running? Unknown (a version 1 run) counts as alive."""
    if pid is None or host is None:
        return True
    if host != socket.gethostname():
        return heartbeat is None or time.time() - heartbeat < _REMOTE_STALE_SECONDS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's live process
    if proc_start is not None:
        now = _proc_start(pid)
        if now is not None and now != proc_start:
            return False  # the pid was reused
    return True


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
