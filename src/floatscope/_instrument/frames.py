"""Find the user's frame: the innermost one outside torch, floatscope and the interpreter.

Everything here that reads interpreter frames or torch's own frames lives in this module, so the
coupling to CPython and to ``torch.nn.Module._call_impl`` is in one place (tests pin it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import torch

from floatscope._events import UNKNOWN_FRAME, UserFrame

__all__ = ["UserFrame", "UNKNOWN_FRAME", "user_frame", "user_frame_object", "frame_from", "call_kwargs", "is_internal",
           "user_stacklevel", "name_in_frame"]

_PACKAGE_DIR = str(Path(__file__).resolve().parents[1]) + os.sep
_SKIP_DIRS = (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep, _PACKAGE_DIR)
# Bundled examples are user code for the purpose of blame.
_EXAMPLES_DIR = os.path.join(_PACKAGE_DIR, "examples") + os.sep
_ENGINE_FILES = (os.sep + os.path.join("torch", "autograd", "graph.py"),
                 os.sep + os.path.join("torch", "autograd", "__init__.py"))
_INTERNAL: dict[str, bool] = {}
_ABSPATH: dict[str, str] = {}


def is_internal(filename: str) -> bool:
    """True for torch's and floatscope's files, the interpreter's runpy/contextlib, and ``<string>``."""
    known = _INTERNAL.get(filename)
    if known is not None:
        return known
    if filename.startswith("<"):
        result = True
    else:
        path = os.path.abspath(filename)
        result = (not path.startswith(_EXAMPLES_DIR)) and (
            path.startswith(_SKIP_DIRS) or path.endswith((os.sep + "runpy.py", os.sep + "contextlib.py")))
    _INTERNAL[filename] = result
    return result


def frame_from(frame: FrameType | None, *, engine_boundary: bool = False,
               boundary: "set[CodeType] | frozenset[CodeType] | None" = None,
               fallback: UserFrame | None = None) -> UserFrame:
    """Walk outward from ``frame`` to the first frame that is user code.

    With ``engine_boundary``, stop (returning an unknown frame) at the autograd engine's entry:
    a backward op found before it runs in user code (a custom ``autograd.Function.backward``);
    one found after it was merely called from the line that started backward. Reaching a code
    object in ``boundary`` (floatscope's replay driver) returns ``fallback``: the user's line that
    made the call being replayed.
    """
    while frame is not None:
        code = frame.f_code
        filename = code.co_filename
        if engine_boundary and filename.endswith(_ENGINE_FILES):
            return UNKNOWN_FRAME
        if boundary and code in boundary:
            return fallback or UNKNOWN_FRAME
        if not is_internal(filename):
            path = _ABSPATH.get(filename)
            if path is None:
                path = _ABSPATH.setdefault(filename, os.path.abspath(filename))
            return UserFrame(path, frame.f_lineno, code.co_name)
        frame = frame.f_back
    return UNKNOWN_FRAME


def user_frame_object(frame: FrameType | None) -> FrameType | None:
    """The first interpreter frame outward from ``frame`` that is user code (for reading its names)."""
    while frame is not None and is_internal(frame.f_code.co_filename):
        frame = frame.f_back
    return frame


def user_frame(depth: int = 1) -> UserFrame:
    """The innermost frame of the caller's stack outside torch and floatscope."""
    return frame_from(sys._getframe(depth))


def call_kwargs(module: torch.nn.Module, frame: FrameType | None) -> dict[str, Any]:
    """Keyword arguments of the module call in progress (global forward hooks do not receive them).

    ``Module._call_impl(self, *args, **kwargs)`` is at most a few frames above the hook.
    """
    for _ in range(4):
        if frame is None:
            break
        if frame.f_code.co_name == "_call_impl":
            local = frame.f_locals
            if local.get("self") is module and isinstance(local.get("kwargs"), dict):
                return dict(local["kwargs"])
        frame = frame.f_back
    return {}


def user_stacklevel() -> int:
    """``stacklevel`` that points ``warnings.warn`` at the first frame outside torch and floatscope."""
    frame = sys._getframe(1)
    level = 1
    target = frame_from(frame)
    while frame is not None:
        if frame.f_code.co_filename == target.file and frame.f_lineno == target.line:
            return level
        frame = frame.f_back
        level += 1
    return 2


def name_in_frame(obj: object, frame: FrameType | None) -> str | None:
    """The name a user frame gives ``obj`` (a local, a global, or an attribute of ``self``)."""
    if frame is None:
        return None
    for scope in (frame.f_locals, frame.f_globals):
        for key, value in scope.items():
            if value is obj and not key.startswith("_"):
                return key
    owner = frame.f_locals.get("self")
    if owner is not None:
        for key, value in vars(owner).items() if hasattr(owner, "__dict__") else ():
            if value is obj:
                return f"self.{key}"
    return None
