"""``HookSet``: every hook, mode and patch an instrument installs, undone in one place.

Each instrument collects what it installs in a ``HookSet`` and closes it on exit (also when the
user's code raises), so the no-leak guarantee lives here, not in each instrument.

A copy of a watched module carries nothing of the watch. ``copy.deepcopy(model)`` (an EMA copy,
``torch.optim.swa_utils.AveragedModel``) and ``torch.save(model)`` copy the module's ``__dict__``,
which holds its hook dicts and instance attributes: the copy would carry hooks bound to the watch
(whose store connection cannot be pickled), and a ``zero_grad`` patch that clears the original's
gradients. A module that a ``HookSet`` hooked or patched gets an instance ``__reduce_ex__`` (both
``copy`` and ``pickle`` look it up on the instance) that reduces it as its class does, minus the
hooks and attributes the watch installed; it is removed with them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["HookSet"]

_REDUCE = "__reduce_ex__"
_MISSING = object()


class _Concealed:
    """A module's instance ``__reduce_ex__``: its class's reduction, without floatscope's hooks and patches.

    Keeps, per ``HookSet`` that installed something on the module, the hook ids and attribute names
    to leave out of the module's state; the attribute is removed when the last of them closes.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.ids: set[int] = set()
        self.names: dict[str, Any] = {_REDUCE: _MISSING}  # name -> the value a copy gets (_MISSING: none)
        self.owners = 0

    def __call__(self, protocol: int) -> Any:
        rv = type(self.module).__reduce_ex__(self.module, protocol)
        if not isinstance(rv, tuple) or len(rv) < 3:
            return rv
        state = rv[2]
        if isinstance(state, dict):
            state = self._clean(state)
        elif isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = (self._clean(state[0]), state[1])  # (__dict__, slots)
        return (*rv[:2], state, *rv[3:])

    def _clean(self, state: dict[str, Any]) -> dict[str, Any]:
        names, ids = self.names, self.ids
        clean = {k: v for k, v in state.items() if k not in names}
        clean.update((k, v) for k, v in names.items() if v is not _MISSING and k in state)
        for key, value in clean.items():
            if "hooks" in key and isinstance(value, dict) and any(i in value for i in ids):
                copy = value.copy()  # OrderedDict stays OrderedDict
                for i in ids:
                    copy.pop(i, None)
                clean[key] = copy
        return clean

    @classmethod
    def on(cls, module: torch.nn.Module) -> "_Concealed":
        current = vars(module).get(_REDUCE)
        if isinstance(current, cls):
            return current
        concealed = cls(module)
        if current is not None:
            # The script's own instance __reduce_ex__: nothing to conceal from it; leave it in charge.
            concealed.owners = -1
        else:
            module.__dict__[_REDUCE] = concealed
        return concealed


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
        self._concealed: dict[int, tuple[_Concealed, set[int], set[str]]] = {}  # id(module) -> what this set hid

    def add(self, handle: Any, *, on: torch.nn.Module | None = None) -> Any:
        """Keep a ``RemovableHandle`` (anything with ``.remove()``); returns it.

        ``on``: the module the hook was registered on; copies and pickles of it leave the hook out.
        """
        if on is not None:
            self._conceal(on, hook=handle.id)
        self._undo.append(handle.remove)
        return handle

    def _conceal(self, module: torch.nn.Module, *, hook: int | None = None, name: str | None = None,
                 original: Any = _MISSING) -> None:
        entry = self._concealed.get(id(module))
        if entry is None:
            concealed = _Concealed.on(module)
            if concealed.owners < 0:
                return
            concealed.owners += 1
            entry = self._concealed[id(module)] = (concealed, set(), set())
            self._undo.append(lambda: self._reveal(module))
        concealed, ids, names = entry
        if hook is not None and hook not in concealed.ids:
            ids.add(hook)
            concealed.ids.add(hook)
        if name is not None and name not in concealed.names:
            names.add(name)
            concealed.names[name] = original

    def _reveal(self, module: torch.nn.Module) -> None:
        concealed, ids, names = self._concealed.pop(id(module))
        concealed.ids -= ids
        for name in names:
            del concealed.names[name]
        concealed.owners -= 1
        if concealed.owners == 0 and vars(module).get(_REDUCE) is concealed:
            del module.__dict__[_REDUCE]

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
        if isinstance(target, torch.nn.Module):
            self._conceal(target, name=name, original=original if had_own else _MISSING)
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
