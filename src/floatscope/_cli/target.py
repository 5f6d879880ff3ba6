"""``path/to/file.py:factory`` targets: load a model and its example inputs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch

from floatscope._errors import UsageError

__all__ = ["load_target"]


def load_target(target: str) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    """Import ``file.py`` and call ``factory()``; it must return ``(model, example_inputs)``."""
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
            spec.loader.exec_module(module)
            factory = getattr(module, factory_name, None)
            if not callable(factory):
                raise UsageError(f"'{path}' has no callable '{factory_name}'; define def {factory_name}(): "
                                 f"return model, (example_input, ...)")
            made = factory()
        except SystemExit as exc:
            raise UsageError(f"importing '{path}' or calling {factory_name}() exited (status {exc.code}); a target "
                             f"file must build its model without running a script: put the script's code under "
                             f"if __name__ == '__main__':") from None
    finally:
        sys.path.pop(0)
        sys.argv = argv
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
        raise UsageError(f"{factory_name}() must return (model, example_inputs) with a torch.nn.Module; "
                         f"it returned {type(made).__name__}")
    model, inputs = made
    if not isinstance(inputs, tuple):
        inputs = (inputs,)
    return model, inputs
