"""SIGTERM while watching: end the watched block cleanly so its record is kept (status ``terminated``).

A watch installs its handler only in the main thread and only where the process has none of its
own (the default action, which would kill the process before anything is written); it puts the
previous handler back on exit, unless something else replaced it in the meantime.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from floatscope._errors import Terminated

__all__ = ["TermHandler"]


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"signal {signum} (SIGTERM)")


class TermHandler:
    """Install on ``install()``, restore on ``remove()``; a no-op where it cannot or need not act."""

    def __init__(self) -> None:
        self._previous: Any = None
        self._installed = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            current = signal.getsignal(signal.SIGTERM)
        except (ValueError, AttributeError):  # no SIGTERM on this platform
            return
        if current is not signal.SIG_DFL:
            return  # the program handles SIGTERM itself (Lightning's SLURM handler, a requeue script)
        signal.signal(signal.SIGTERM, _raise_terminated)
        self._previous, self._installed = current, True

    def remove(self) -> None:
        if not self._installed:
            return
        self._installed = False
        if signal.getsignal(signal.SIGTERM) is _raise_terminated:
            signal.signal(signal.SIGTERM, self._previous)
