"""Read the run store from Python: list runs, load a run's steps, health samples and findings, diff two runs.

Every function opens the store read-only (it never writes, never creates a file and never waits
for a run that is writing) or takes a store you opened with :func:`open_store`. A store that
does not exist has no runs.

Example:
    >>> import floatscope.runs as fr
    >>> [r.status for r in fr.list_runs(tmp_path / "none.sqlite")]  # doctest: +SKIP
    []
    >>> with fr.open_store(".floatscope/runs.sqlite") as store:  # doctest: +SKIP
    ...     run = store.get("last")
    ...     losses = [s.loss for s in store.steps(run.id)]
    ...     problems = fr.findings(run.id, store=store)
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

from floatscope._diagnose.diff import ConfigDifference, RunDiff, diff_runs
from floatscope._diagnose.health import KINDS, Finding, findings_for
from floatscope._store.schema import (SCHEMA_VERSION, STATUSES, ActivationSample, Event, ModelInfo, ParamSample,
                                      PrecisionInfo, RunConfig, RunRecord, StepRecord)
from floatscope._errors import StoreError
from floatscope._store.sqlite import DEFAULT_STORE, RunStore, StoreMissing

__all__ = ["open_store", "list_runs", "load_run", "steps", "events", "activations", "params", "config", "findings",
           "diff", "RunStore", "RunRecord", "StepRecord", "Event", "ActivationSample", "ParamSample", "RunConfig",
           "ModelInfo", "PrecisionInfo", "Finding", "RunDiff", "ConfigDifference", "StoreError", "StoreMissing", "DEFAULT_STORE",
           "SCHEMA_VERSION", "STATUSES", "KINDS"]

StoreArg = Union[str, "os.PathLike[str]", RunStore]


def open_store(path: str | os.PathLike[str] = DEFAULT_STORE) -> RunStore:
    """Open a store read-only (a context manager; close it, or use ``with``).

    Raises:
        StoreMissing: there is no store at ``path``.
        StoreError: it is not a readable floatscope store.
    """
    return RunStore(path, readonly=True)


@contextmanager
def _reading(store: StoreArg) -> Iterator[RunStore]:
    if isinstance(store, RunStore):
        yield store
        return
    opened = RunStore(Path(store), readonly=True)
    try:
        yield opened
    finally:
        opened.close()


def list_runs(store: StoreArg = DEFAULT_STORE) -> list[RunRecord]:
    """Every run, newest first (``[]`` when the store does not exist yet)."""
    try:
        with _reading(store) as s:
            return s.runs()
    except StoreMissing:
        return []


def load_run(run: str = "last", *, store: StoreArg = DEFAULT_STORE) -> RunRecord:
    """One run by id, id prefix or ``"last"``."""
    with _reading(store) as s:
        return s.get(run)


def steps(run: str = "last", *, store: StoreArg = DEFAULT_STORE) -> list[StepRecord]:
    """A run's per-step loss, gradient norm, loss scale and skipped flag, in step order."""
    with _reading(store) as s:
        return s.steps(s.get(run).id)


def events(run: str = "last", *, store: StoreArg = DEFAULT_STORE) -> list[Event]:
    """A run's incidents and skipped steps, in order."""
    with _reading(store) as s:
        return s.events(s.get(run).id)


def activations(run: str = "last", *, store: StoreArg = DEFAULT_STORE) -> list[ActivationSample]:
    """A run's per-layer activation health samples."""
    with _reading(store) as s:
        return s.activations(s.get(run).id)


def params(run: str = "last", *, store: StoreArg = DEFAULT_STORE) -> list[ParamSample]:
    """A run's per-parameter gradient and update health samples."""
    with _reading(store) as s:
        return s.params(s.get(run).id)


def config(run: str = "last", *, store: StoreArg = DEFAULT_STORE) -> RunConfig:
    """What the run was configured with (model, precision, optimizers, seeds, ...)."""
    with _reading(store) as s:
        return s.config(s.get(run).id)


def findings(run: str = "last", *, store: StoreArg = DEFAULT_STORE) -> list[Finding]:
    """The health findings of a run (what ``floatscope health`` prints), most severe first."""
    with _reading(store) as s:
        return findings_for(s, s.get(run).id)


def diff(run_a: str, run_b: str, *, store: StoreArg = DEFAULT_STORE, store_b: StoreArg | None = None,
         exact: bool = False, tolerance: float = 1e-6) -> RunDiff:
    """Why two runs differ: configuration differences, then the first divergent step and tensor."""
    with _reading(store) as a:
        if store_b is None:
            return diff_runs(a, run_a, a, run_b, exact=exact, tolerance=tolerance)
        with _reading(store_b) as b:
            return diff_runs(a, run_a, b, run_b, exact=exact, tolerance=tolerance)
