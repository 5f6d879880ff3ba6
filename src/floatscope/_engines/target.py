"""``path/to/file.py:factory`` targets: load a model and its example inputs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch

from floatscope._errors import FloatscopeError, UsageError

__all__ = ["load_target", "load_callable_target"]


def load_target(target: str) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    """Import ``file.py`` and call ``factory()``; it must return ``(model, example_inputs)``."""
    made, path, factory_name = _run_factory(target, "return model, (example_input, ...)")
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
        raise UsageError(f"{factory_name}() must return (model, example_inputs) with a torch.nn.Module; "
                         f"it returned {type(made).__name__}")
    model, inputs = made
    if not isinstance(inputs, tuple):
        inputs = (inputs,)
    return model, inputs


def load_callable_target(target: str) -> tuple[Any, tuple[Any, ...]]:
    """Like :func:`load_target`, but ``factory()`` may return ``(callable, inputs)`` or ``(module, inputs)``.

    ``inputs`` is a tuple (or list) of positional arguments, or a single tensor.
    """
    made, path, factory_name = _run_factory(target, "return fn, (x, ...)")
    if not (isinstance(made, tuple) and len(made) == 2 and callable(made[0])):
        shown = type(made).__name__ if not isinstance(made, tuple) else f"a tuple of {len(made)}"
        raise UsageError(f"{factory_name}() in '{path}' must return (fn_or_module, inputs), e.g. "
                         f"return torch.tanh, (torch.randn(8, dtype=torch.float64, requires_grad=True),); it returned "
                         f"{shown}")
    fn, inputs = made
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    elif not isinstance(inputs, tuple):
        inputs = (inputs,)
    return fn, inputs


def _run_factory(target: str, returns: str) -> tuple[Any, Path, str]:
    """Import ``file.py`` and return what ``factory()`` returned, with the path and the factory's name."""
    path_text, sep, factory_name = target.rpartition(":")
    if not sep or not path_text or not factory_name:
        raise UsageError(f"target '{target}' must look like path/to/file.py:factory")
    path = Path(path_text)
    if not path.is_file():
        raise UsageError(f"target file '{path}' does not exist")
    name = f"floatscope_target_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import '{path}' as Python")
    module = importlib.util.module_from_spec(spec)
    # The target sees itself as the program (its own argparse must not read floatscope's arguments).
    argv, sys.argv = sys.argv, [str(path)]
    sys.path.insert(0, str(path.resolve().parent))
    try:
        try:
            try:
                spec.loader.exec_module(module)
            except SyntaxError as exc:
                raise UsageError(f"cannot import '{path}': SyntaxError: {exc.msg} (at {exc.filename}:{exc.lineno})"
                                 ) from None
            except (FloatscopeError, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001 - the user's module raised on import: one line, exit 2
                raise UsageError(f"importing '{path}' raised {_one_line(exc)}") from None
            factory = getattr(module, factory_name, None)
            if not callable(factory):
                raise UsageError(f"'{path}' has no callable '{factory_name}'; define def {factory_name}(): "
                                 f"{returns}")
            try:
                made = factory()
            except (FloatscopeError, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001 - the user's factory raised: one line, exit 2
                raise UsageError(f"calling {factory_name}() from '{path}' raised {_one_line(exc)}") from None
        except SystemExit as exc:
            raise UsageError(f"importing '{path}' or calling {factory_name}() exited (status {exc.code}); a target "
                             f"file must build its model without running a script: put the script's code under "
                             f"if __name__ == '__main__':") from None
    finally:
        sys.path.pop(0)
        sys.argv = argv
    return made, path, factory_name


def _one_line(exc: BaseException) -> str:
    """``Type: message (at file:line)``, the line being the innermost frame of the user's code (not
    torch's or floatscope's) in the traceback, else the innermost frame."""
    from floatscope._instrument.frames import is_internal

    user = last = None
    tb = exc.__traceback__
    while tb is not None:
        last = tb
        if not is_internal(tb.tb_frame.f_code.co_filename):
            user = tb
        tb = tb.tb_next
    at = user or last
    where = f" (at {at.tb_frame.f_code.co_filename}:{at.tb_lineno})" if at is not None else ""
    message = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {message}{where}"
