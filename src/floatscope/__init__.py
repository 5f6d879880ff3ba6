"""floatscope: find, explain and fix floating-point failures in PyTorch models.

Importing floatscope patches nothing and registers nothing; instruments act only inside their
``with`` blocks.

Example:
    >>> import torch, floatscope
    >>> x = torch.tensor([0.0, 1.0], requires_grad=True)
    >>> floatscope.locate(lambda: torch.sqrt(x).sum().backward()).op
    'aten.sqrt.default'
"""

from __future__ import annotations

from floatscope._version import __version__ as __version__

from floatscope._errors import FloatscopeError, NonFiniteError, StoreError, UsageError
from floatscope._engines.locate import locate
from floatscope._engines.watch import Watch, watch
from floatscope._numerics.formats import FORMATS, FloatFormat, format_of
from floatscope._results import Incident, OperandStats, RunResult
from floatscope._engines.repro import SeedRecord, seed_everything
from floatscope._store.env import Environment, capture_env
from floatscope._store.sqlite import RunStore

__all__ = [
    "Environment",
    "FORMATS",
    "FloatFormat",
    "FloatscopeError",
    "Incident",
    "NonFiniteError",
    "OperandStats",
    "RunResult",
    "RunStore",
    "SeedRecord",
    "StoreError",
    "UsageError",
    "Watch",
    "capture_env",
    "format_of",
    "gradcheck",
    "locate",
    "seed_everything",
    "watch",
]


def __getattr__(name: str) -> object:
    # floatscope.precision, floatscope.compare, floatscope.runs and floatscope.lint load on first use (PEP 562).
    if name in ("precision", "compare", "runs", "lint"):
        import importlib

        return importlib.import_module(f"floatscope.{name}")
    if name in ("gradcheck", "GradcheckResult", "GradcheckError"):
        # floatscope.gradcheck is a function; its engine loads on first use.
        from floatscope._engines import gradcheck as _gradcheck

        value = getattr(_gradcheck, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'floatscope' has no attribute {name!r}")
