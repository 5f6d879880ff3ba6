"""Autocast state: capture it where a call ran, re-enter it where the call is replayed."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["AutocastState", "autocast_state", "restore_autocast"]

AutocastState = tuple[tuple[str, bool, torch.dtype], ...]
_DEVICE_TYPES = ("cpu", "cuda")
_OFF: AutocastState = ()


def autocast_state() -> AutocastState:
    """Autocast enabled/dtype for each device type where it is on (``()`` when it is off everywhere)."""
    state = []
    for device in _DEVICE_TYPES:
        try:
            if torch.is_autocast_enabled(device):
                state.append((device, True, torch.get_autocast_dtype(device)))
        except (RuntimeError, TypeError):  # device type unsupported by this build
            continue
    return tuple(state) if state else _OFF


class restore_autocast:
    """Context manager that re-enters the autocast state captured by :func:`autocast_state`.

    Device types not in the state have autocast turned off inside, as they were when captured.
    """

    def __init__(self, state: AutocastState) -> None:
        enabled = {device for device, on, _ in state if on}
        self.contexts: list[Any] = [torch.autocast(device, dtype=dtype) for device, on, dtype in state if on]
        for device in _DEVICE_TYPES:
            if device not in enabled:
                try:
                    if torch.is_autocast_enabled(device):
                        self.contexts.append(torch.autocast(device, enabled=False))
                except (RuntimeError, TypeError):
                    continue

    def __enter__(self) -> None:
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc: object) -> None:
        for c in reversed(self.contexts):
            c.__exit__(None, None, None)
