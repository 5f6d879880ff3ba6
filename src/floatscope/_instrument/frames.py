"""Find the user's frame: the innermost one outside torch, floatscope and the interpreter."""

from __future__ import annotations

import linecache
import os
import sys
from dataclasses import dataclass
from types import CodeType, FrameType

import torch

import floatscope

__all__ = ["UserFrame", "user_frame", "frame_from"]

_SKIP_DIRS = tuple(
    os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (torch, floatscope) if m.__file__
)
# Bundled examples are user code for the purpose of blame.
_EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(floatscope.__file__)), "examples") + os.sep


@dataclass(frozen=True)
class UserFrame:
    file: str
    line: int
    function: str

    @property
    def code(self) -> str:
        return linecache.getline(self.file, self.line).strip()


_UNKNOWN = UserFrame("<unknown>", 0, "<unknown>")


def _is_internal(filename: str) -> bool:
    if filename.startswith("<"):
        return True
    path = os.path.abspath(filename)
    if path.startswith(_EXAMPLES_DIR):
        return False
    return path.startswith(_SKIP_DIRS) or "/runpy.py" in path or "/contextlib.py" in path


_ENGINE_FILES = (os.sep + os.path.join("torch", "autograd", "graph.py"),
                 os.sep + os.path.join("torch", "autograd", "__init__.py"))


def frame_from(frame: FrameType | None, *, engine_boundary: bool = False,
               boundary: "set[CodeType] | None" = None, fallback: UserFrame | None = None) -> UserFrame:
    """Walk outward from ``frame`` to the first frame that is user code.

    With ``engine_boundary``, stop (returning an unknown frame) at the autograd engine's entry:
    a backward op found before it runs in user code (a custom ``autograd.Function.backward``);
    one found after it was merely called from the line that started backward.
    """
    while frame is not None:
        code = frame.f_code
        if engine_boundary and code.co_filename.endswith(_ENGINE_FILES):
            return _UNKNOWN
        if boundary and code in boundary:
            # Reached the code that is replaying the user's call: blame where the user made that call.
            return fallback or _UNKNOWN
        if not _is_internal(code.co_filename):
            return UserFrame(os.path.abspath(code.co_filename), frame.f_lineno, code.co_name)
        frame = frame.f_back
    return _UNKNOWN


def user_frame() -> UserFrame:
    """The innermost frame of the caller's stack outside torch and floatscope."""
    return frame_from(sys._getframe(1))
