"""The floatscope error tree. User errors also inherit the matching builtin."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from floatscope._results import Incident

__all__ = ["FloatscopeError", "NonFiniteError", "UsageError", "StoreError", "Terminated"]


class FloatscopeError(Exception):
    """Root of every error floatscope raises."""


class NonFiniteError(FloatscopeError, FloatingPointError):
    """A non-finite value was born while watching; ``incident`` says where and why.

    The message is the full diagnosis, so an uncaught one reads like a report.
    """

    def __init__(self, incident: "Incident") -> None:
        super().__init__(incident.diagnosis())
        self.incident = incident


class UsageError(FloatscopeError, ValueError):
    """floatscope was called with an argument it cannot use; the message says how to fix it."""


class StoreError(FloatscopeError, OSError):
    """The run store is missing, corrupt or not a floatscope store."""


class Terminated(BaseException):
    """SIGTERM arrived (SLURM preemption, ``docker stop``, ``kill``) while a watch was active.

    Raised in the main thread by the handler a watch installs when the process has none, so the
    watched block ends through its ``with`` exit: the run is recorded as ``terminated`` and
    ``floatscope run`` exits 143 (128 + SIGTERM), as an unhandled SIGTERM would.
    """
