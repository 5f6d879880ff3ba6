"""The loss tape: a record of the torch calls between a model's output and ``backward()``.

Code between the model and ``loss.backward()`` (the loss, its scaling, regularisers) runs outside
any module, so module hooks cannot replay it. While a watched forward's output waits for its
backward, a ``TorchFunctionMode`` records those few top-level calls with their arguments and the
user's source line, so a failing step can be replayed end to end. Recording stops at
``backward()``, at the next forward and at ``optimizer.step()``; it never sees the model's own ops.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

from floatscope._instrument.frames import UserFrame, frame_from

__all__ = ["LossTape", "TapeEntry", "autocast_state", "restore_autocast"]

_MAX_ENTRIES = 512
_BACKWARD = (torch.Tensor.backward, torch.autograd.backward)
_DEVICE_TYPES = ("cpu", "cuda")
_NOT_COMPUTATION = {"__get__", "__set__", "__delete__", "__repr__", "__format__", "__str__", "__len__",
                    "__bool__", "__iter__", "__hash__", "item", "tolist", "numpy", "size", "dim", "numel"}
_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ipow__", "__setitem__", "__ior__",
                    "__iand__"}


def autocast_state() -> tuple[tuple[str, bool, torch.dtype], ...]:
    """Autocast enabled/dtype per device type, to re-enter it on replay."""
    state = []
    for device in _DEVICE_TYPES:
        try:
            state.append((device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)))
        except (RuntimeError, TypeError):  # device type unsupported by this build
            continue
    return tuple(state)


class restore_autocast:
    """Context manager that re-enters the autocast state captured by :func:`autocast_state`."""

    def __init__(self, state: tuple[tuple[str, bool, torch.dtype], ...]) -> None:
        self.contexts = [torch.autocast(device, dtype=dtype, enabled=enabled) for device, enabled, dtype in state
                         if enabled or torch.is_autocast_enabled(device)]

    def __enter__(self) -> None:
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc: object) -> None:
        for c in reversed(self.contexts):
            c.__exit__(None, None, None)


@dataclass
class TapeEntry:
    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out: Any
    frame: UserFrame
    autocast: tuple[tuple[str, bool, torch.dtype], ...]
    grad_enabled: bool
    inplace: bool = False


class LossTape(TorchFunctionMode):
    """Records top-level torch calls until ``backward()``; then passes everything through."""

    def __init__(self, on_backward: Callable[["LossTape", Any], None]) -> None:
        super().__init__()
        self.entries: list[TapeEntry] = []
        self.on_backward = on_backward
        self.stopped = False
        self.overflowed = False
        self.entered = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if self.stopped:
            return func(*args, **kwargs)
        if func in _BACKWARD:
            self.stopped = True
            tensors = args[0] if args else kwargs.get("tensors", kwargs.get("self"))
            self.on_backward(self, tensors)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in _NOT_COMPUTATION or "record_function" in name:
            return out  # attribute access, profiler marks: nothing to replay
        if len(self.entries) >= _MAX_ENTRIES:
            self.overflowed = True
        else:
            inplace = name.endswith("_") and not name.endswith("__") or name in _INPLACE_DUNDERS
            self.entries.append(TapeEntry(func, args, kwargs, out, frame_from(sys._getframe(1)), autocast_state(),
                                          torch.is_grad_enabled(), inplace))
        return out

    def start(self) -> None:
        self.__enter__()
        self.entered = True

    def stop(self) -> None:
        """Leave the mode stack if this tape is on top of it; otherwise just stop recording."""
        self.stopped = True
        if not self.entered:
            return
        stack = torch.overrides._get_current_function_mode_stack()
        if stack and stack[-1] is self:
            self.__exit__(None, None, None)
            self.entered = False
