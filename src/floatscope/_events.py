"""What op-level tracing observes: origin events and the forward calls that made autograd nodes.

These are plain records shared by the tracer (which creates them) and the diagnosis (which reads
them), so that neither has to import the other.
"""

from __future__ import annotations

import linecache
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from floatscope._results import OperandStats

__all__ = ["UserFrame", "UNKNOWN_FRAME", "ForwardTag", "OriginEvent", "op_base", "op_stem", "node_base"]


@dataclass(frozen=True)
class UserFrame:
    """A source location in the user's code."""

    file: str
    line: int
    function: str

    @property
    def code(self) -> str:
        return linecache.getline(self.file, self.line).strip()

    @property
    def known(self) -> bool:
        return self.line > 0


UNKNOWN_FRAME = UserFrame("<unknown>", 0, "<unknown>")


def op_base(op_name: str) -> str:
    """``"aten.sqrt.default"`` -> ``"sqrt"``; ``"aten.mul_.Tensor"`` -> ``"mul_"``."""
    parts = op_name.split(".")
    return parts[1] if len(parts) >= 2 else op_name


def op_stem(op_name: str) -> str:
    """The base name without the in-place suffix: ``"aten.mul_.Tensor"`` -> ``"mul"``."""
    base = op_base(op_name)
    return base.rstrip("_") if base.strip("_") else base


def node_base(node_name: str) -> str:
    """``"NativeLayerNormBackward0"`` -> ``"native_layer_norm"``."""
    name = node_name.split("::")[-1]
    name = re.sub(r"Backward\d*$", "", name)
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def node_matches(node: str, aten_base: str) -> bool:
    """True when an autograd node's base name and an aten op's base name are the same op."""
    a = aten_base.strip("_")
    return bool(node) and (a == node or a.startswith(node) or node.startswith(a))


@dataclass
class ForwardTag:
    """The top-level torch call that created some autograd nodes (or ran some aten ops)."""

    function: str
    frame: UserFrame
    module: str | None
    aten_ops: list[str] = field(default_factory=list)
    model: str | None = None

    def forward_op_for(self, node_name: str) -> str:
        base = node_base(node_name)
        for op in self.aten_ops:
            if node_matches(base, op_base(op)):
                return op
        return self.aten_ops[-1] if self.aten_ops else self.function


@dataclass
class OriginEvent:
    """One op that produced NaN or Inf from inputs without it.

    ``external_inputs`` holds, for each operand that already held non-finite values nobody traced
    (a constant, a mask, a model input), the storage key of that operand; ``zero_operands`` says
    which operands held exact zeros, and ``producer_zero_inputs`` whether the op that produced each
    operand itself read an exact zero (so a later zero is an exact product, not an underflow).
    """

    index: int
    op: str                        # aten overload that ran; for backward, the aten op of the gradient
    phase: Literal["forward", "backward", "optimizer"]
    kind: Literal["nan", "inf"]
    module: str | None
    frame: UserFrame
    backward_node: str | None
    forward_tag: ForwardTag | None
    operands: list[OperandStats]
    output: OperandStats
    parent: int | None             # event whose non-finite values this op consumed
    external_inf_inputs: bool      # inputs held non-finite values nobody traced (masks, constants, data)
    scalars: list[float]
    producers: list[str | None]    # the op that produced each operand, when traced
    function: str | None
    input_keys: list[tuple[Any, ...]] = field(default_factory=list)
    output_key: tuple[Any, ...] | None = None
    external_inputs: list[tuple[Any, ...]] = field(default_factory=list)
    producer_zero_inputs: list[bool] = field(default_factory=list)
    model: str | None = None       # the root model the op ran in, as the watch labels it
    detail: str | None = None      # what the op's non-float arguments say (e.g. nll_loss targets all ignored)
    custom_backward: bool = False  # run by a custom autograd.Function's backward (the user's own code)

    @property
    def forward_op(self) -> str:
        """For a backward event, the forward aten op whose gradient this is."""
        if self.backward_node and self.forward_tag is not None:
            return self.forward_tag.forward_op_for(self.backward_node)
        return self.op
