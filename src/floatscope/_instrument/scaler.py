"""The GradScaler probe: GradScaler has no hooks, so its methods are wrapped narrowly while watched.

``scale`` keeps the unscaled loss and the scaler; ``unscale_``, ``step`` and ``update`` run their
internals unrecorded (they read ``found_inf`` themselves); a ``step`` that did not call the
optimizer's ``step`` was skipped for inf/NaN gradients, which the capture counts as an iteration;
after ``update`` the watch is told, so it can follow the scale. Every wrapper is undone on exit.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from floatscope._instrument.capture import StepCapture
from floatscope._instrument.hooks import HookSet

__all__ = ["ScalerProbe"]


class ScalerProbe:
    """Wrap one GradScaler instance, or the GradScaler class (every scaler) when ``scaler`` is None.

    Args:
        capture: The step capture (told of skipped steps; quiet inside GradScaler internals).
        on_update: Called with the scaler after each ``update()``.
    """

    def __init__(self, capture: StepCapture, scaler: Any, *, all_scalers: bool,
                 on_update: Callable[[Any], None]) -> None:
        self.capture = capture
        self.scaler = scaler
        self.all_scalers = all_scalers
        self.on_update = on_update
        self.last_scaler: Any = None
        self.unscaled: dict[int, torch.Tensor] = {}  # id(scaled loss) -> the loss before scaling
        self.skipped = 0
        self.consecutive = 0

    def install(self, hooks: HookSet) -> None:
        from torch.amp.grad_scaler import GradScaler

        targets: list[Any] = [self.scaler] if self.scaler is not None else ([GradScaler] if self.all_scalers else [])
        for target in targets:
            bound = not isinstance(target, type)
            for name, make in (("step", self._step), ("update", self._update), ("scale", self._scale),
                               ("unscale_", self._unscale)):
                hooks.patch(target, name, make(getattr(target, name), bound=bound))

    def _owner(self, original: Any, bound: bool, args: tuple[Any, ...]) -> Any:
        return original.__self__ if bound else args[0]

    def _scale(self, original: Callable[..., Any], *, bound: bool) -> Callable[..., Any]:
        def scale(*args: Any, **kwargs: Any) -> Any:
            self.last_scaler = self._owner(original, bound, args)
            outputs = args[0] if bound else (args[1] if len(args) > 1 else kwargs.get("outputs"))
            scaled = original(*args, **kwargs)
            if isinstance(outputs, torch.Tensor) and isinstance(scaled, torch.Tensor):
                if len(self.unscaled) > 64:
                    self.unscaled.clear()
                self.unscaled[id(scaled)] = outputs
            return scaled

        return scale

    def _unscale(self, original: Callable[..., Any], *, bound: bool) -> Callable[..., Any]:
        def unscale_(*args: Any, **kwargs: Any) -> Any:
            self.capture.quiet += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.capture.quiet -= 1

        return unscale_

    def _step(self, original: Callable[..., Any], *, bound: bool) -> Callable[..., Any]:
        def step(*args: Any, **kwargs: Any) -> Any:
            scaler = self._owner(original, bound, args)
            optimizer = args[0] if bound else args[1]
            self.last_scaler = scaler
            before = self.capture.step_calls
            self.capture.quiet += 1
            try:
                ret = original(*args, **kwargs)
            finally:
                self.capture.quiet -= 1
            if self.capture.suspended or not scaler.is_enabled():
                return ret
            if self.capture.step_calls == before and isinstance(optimizer, torch.optim.Optimizer):
                self.skipped += 1
                self.consecutive += 1
                self.capture.skipped_step(optimizer)
            else:
                self.consecutive = 0
            return ret

        return step

    def _update(self, original: Callable[..., Any], *, bound: bool) -> Callable[..., Any]:
        def update(*args: Any, **kwargs: Any) -> Any:
            self.capture.quiet += 1
            try:
                ret = original(*args, **kwargs)
            finally:
                self.capture.quiet -= 1
            if not self.capture.suspended:
                with self.capture.own():
                    self.on_update(self._owner(original, bound, args))
            return ret

        return update
