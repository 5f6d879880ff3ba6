"""``HookSet``: every hook, mode and patch an instrument installs, undone in one place.

Each instrument collects what it installs in a ``HookSet`` and closes it on exit (also when the
user's code raises), so the no-leak guarantee lives here, not in each instrument.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["HookSet"]


class HookSet:
    """Removable handles, entered context managers and undo callbacks, closed in reverse order.

    Example:
        >>> import torch
        >>> with HookSet() as hooks:
        ...     hooks.add(torch.nn.Linear(2, 2).register_forward_hook(lambda *a: None))
        >>> len(hooks)
        0
    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], Any]] = []

    def add(self, handle: Any) -> Any:
        """Keep a ``RemovableHandle`` (anything with ``.remove()``); returns it."""
        self._undo.append(handle.remove)
        return handle

    def enter(self, context: Any) -> Any:
        """Enter a context manager now and exit it on close; returns what ``__enter__`` returned."""
        value = context.__enter__()
        self._undo.append(lambda: context.__exit__(None, None, None))
        return value

    def on_close(self, undo: Callable[[], Any]) -> None:
        """Run ``undo`` on close (after everything added later)."""
        self._undo.append(undo)

    def patch(self, target: Any, name: str, value: Any) -> None:
        """Set ``target.name = value``; on close, restore the attribute (or delete it if it was inherited)."""
        had_own = isinstance(target, type) or name in vars(target)
        original = getattr(target, name)
        setattr(target, name, value)
        if had_own:
            self._undo.append(lambda: setattr(target, name, original))
        else:
            self._undo.append(lambda: delattr(target, name))

    def close(self) -> None:
        """Undo everything, newest first; every undo runs even if one raises (the first error is re-raised)."""
        error: BaseException | None = None
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except BaseException as exc:  # noqa: BLE001 - keep undoing, re-raise the first
                error = error or exc
        if error is not None:
            raise error

    def __len__(self) -> int:
        return len(self._undo)

    def __enter__(self) -> "HookSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
