"""The module tracker: which module (dotted path, call index) is running, for every instrument.

One tracker serves the tracer, the precision analysis, the determinism check and the ONNX
comparison (the health sampler tracks nothing: it keeps the layers' outputs of one pass). With a
model it hooks that model's modules (and sees keyword arguments); without one it uses PyTorch's
global forward hooks and names each new top-level module it meets as a root.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from floatscope._instrument.hooks import HookSet

__all__ = ["ModuleTracker", "module_paths", "float_leaves"]

Key = tuple[str, int]


def module_paths(*roots: torch.nn.Module) -> dict[int, str]:
    """``{id(module): dotted path}`` over ``roots`` (the first root wins for shared modules)."""
    paths: dict[int, str] = {}
    for root in roots:
        for name, sub in root.named_modules(remove_duplicate=False):
            paths.setdefault(id(sub), name)
    return paths


def float_leaves(tree: Any) -> list[torch.Tensor]:
    """The floating-point tensors among the leaves of a pytree (args, kwargs, outputs)."""
    import torch.utils._pytree as pytree

    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor) and t.is_floating_point()]


class ModuleTracker:
    """Context manager that keeps the stack of running modules as ``(path, call index)`` keys.

    Args:
        model: Hook only this model's modules (keyword arguments are passed to ``on_enter``);
            None hooks every module through the global forward hooks.
        on_enter: ``on_enter(key, module, args, kwargs)`` before each module's forward.
        on_exit: ``on_exit(key, module, args, output)`` after it (also when it raises; output None).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> seen = []
        >>> with ModuleTracker(model, on_exit=lambda key, *_: seen.append(key)):
        ...     _ = model(torch.zeros(1, 2))
        >>> seen
        [('0', 0), ('', 0)]
    """

    def __init__(self, model: torch.nn.Module | None = None, *,
                 on_enter: Callable[[Key, torch.nn.Module, Any, dict[str, Any]], Any] | None = None,
                 on_exit: Callable[[Key, torch.nn.Module, Any, Any], Any] | None = None) -> None:
        self.model = model
        self.paths: dict[int, str] = module_paths(model) if model is not None else {}
        self.roots: list[torch.nn.Module] = [model] if model is not None else []
        self.counts: dict[str, int] = {}
        self.stack: list[Key] = []
        self.outer: torch.nn.Module | None = None  # the outermost running module
        self.on_enter, self.on_exit = on_enter, on_exit
        self._hooks = HookSet()

    def add_root(self, module: torch.nn.Module) -> None:
        """Name ``module``'s submodules by their dotted paths from it (first names win)."""
        if any(r is module for r in self.roots):
            return
        self.roots.append(module)
        for name, sub in module.named_modules(remove_duplicate=False):
            self.paths.setdefault(id(sub), name)

    def current(self) -> Key:
        """The innermost running module's key, or ``("", -1)`` outside every module."""
        return self.stack[-1] if self.stack else ("", -1)

    def current_path(self) -> str | None:
        return self.stack[-1][0] if self.stack else None

    def __enter__(self) -> "ModuleTracker":
        if self.model is not None:
            for module in self.model.modules():
                self._hooks.add(module.register_forward_pre_hook(self._pre_kw, with_kwargs=True))
                self._hooks.add(module.register_forward_hook(self._post, always_call=True))
        else:
            self._hooks.add(register_module_forward_pre_hook(self._pre))
            self._hooks.add(register_module_forward_hook(self._post, always_call=True))
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.close()
        self.stack.clear()

    def _pre(self, module: torch.nn.Module, args: Any) -> Any:
        return self._enter(module, args, {})

    def _pre_kw(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
        return self._enter(module, args, kwargs)

    def _enter(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
        if not self.stack:
            self.outer = module
            if self.model is None and id(module) not in self.paths:
                self.add_root(module)
        path = self.paths.get(id(module), type(module).__name__)
        index = self.counts.get(path, 0)
        self.counts[path] = index + 1
        key = (path, index)
        self.stack.append(key)
        if self.on_enter is not None:
            return self.on_enter(key, module, args, kwargs)
        return None

    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        key = self.stack.pop() if self.stack else ("", -1)
        if not self.stack:
            self.outer = None
        if self.on_exit is not None:
            return self.on_exit(key, module, args, output)
        return None
