"""What a float format's rounding explains: error budgets for comparing a deployment with a reference.

Pure functions on tensors, computed in float64. ``y`` is the deployed result, ``r`` the float64
reference, ``e`` an emulation of the same computation in the deployment format (every op correctly
rounded to it); the emulation's error ``err(e, r)`` is what the format's rounding explains.

* ``unit_roundoff(fmt) = 2**-(p + 1)`` with ``p`` the stored mantissa bits: the largest relative
  error of one rounding to nearest (float16: 4.9e-4, float32: 6.0e-8).
* ``scaled_ulp_error(y, r, fmt) = max_i |y_i - r_i| / ulp(max_j |r_j|, fmt)``: the largest
  elementwise error in units of ``fmt``'s last place at the tensor's largest magnitude, so that
  elements near zero cannot decide. ``max |r| == 0`` measures in ULPs of the smallest subnormal.
  An empty tensor gives 0; a non-finite ``y`` gives ``inf``.
* ``explained_error(emulated, floor, slack) = slack * max(emulated, floor)``: the budget. The floor
  keeps a budget above zero where the emulation happens to be exact; ``emulated = inf`` (the
  emulation itself overflowed) falls back to the floor, because that says nothing about rounding.
* ``required_slack(error, emulated, floor) = error / max(emulated, floor)``: the slack that would
  have passed (``inf`` for a non-finite error).
"""

from __future__ import annotations

import math

import torch

from floatscope._numerics.errors import relative_error, ulp
from floatscope._numerics.formats import FloatFormat

__all__ = [
    "explained_error",
    "normwise_error",
    "required_slack",
    "round_tensor",
    "scaled_ulp_error",
    "unit_roundoff",
]


def unit_roundoff(fmt: FloatFormat) -> float:
    """``2**-(mantissa_bits + 1)``: the relative error bound of one rounding to nearest in ``fmt``.

    Example:
        >>> from floatscope._numerics.formats import format_of
        >>> unit_roundoff(format_of(torch.float16))
        0.00048828125
    """
    return 2.0 ** -(fmt.mantissa_bits + 1)


def normwise_error(y: torch.Tensor, r: torch.Tensor) -> float:
    """``||y - r||_2 / ||r||_2`` (absolute where ``||r||_2 == 0``; ``inf`` for a non-finite ``y``).

    Example:
        >>> normwise_error(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 2.0**-30]))  # near-zero elements cannot decide
        9.313225746154785e-10
    """
    if y.numel() == 0:
        return 0.0
    return relative_error(y, r)


def scaled_ulp_error(y: torch.Tensor, r: torch.Tensor, fmt: FloatFormat) -> float:
    """Largest elementwise error in ULPs of ``fmt`` at ``max |r|`` (see the module docstring).

    Example:
        >>> from floatscope._numerics.formats import format_of
        >>> scaled_ulp_error(torch.tensor([1.0, 2**-10]), torch.tensor([1.0, 0.0]), format_of(torch.float16))
        1.0
    """
    y64, r64 = y.detach().to(torch.float64), r.detach().to(torch.float64)
    if y64.shape != r64.shape:
        raise ValueError(f"shapes differ: {tuple(y64.shape)} vs reference {tuple(r64.shape)}")
    if y64.numel() == 0:
        return 0.0
    if not bool(torch.isfinite(y64).all()):
        return math.inf
    scale = r64.abs().max()
    return float((y64 - r64).abs().max() / ulp(scale, fmt))


def explained_error(emulated: float, floor: float, *, slack: float) -> float:
    """``slack * max(emulated, floor)``; a non-finite ``emulated`` counts as ``floor``.

    Example:
        >>> explained_error(1e-4, 4.9e-4, slack=8.0)
        0.00392
    """
    base = emulated if math.isfinite(emulated) else floor
    return slack * max(base, floor)


def required_slack(error: float, emulated: float, floor: float) -> float:
    """The slack that would just have explained ``error``: ``error / max(emulated, floor)``.

    Example:
        >>> required_slack(2e-3, 1e-3, 1e-4)
        2.0
    """
    if not math.isfinite(error):
        return math.inf
    base = emulated if math.isfinite(emulated) else floor
    return error / max(base, floor)


def round_tensor(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to nearest-even in ``dtype`` and returned in ``t``'s dtype (overflow gives inf).

    Only floating tensors wider than ``dtype`` change; others come back as they are.

    Example:
        >>> round_tensor(torch.tensor([1.0 + 2**-12], dtype=torch.float64), torch.float16).item()
        1.0
    """
    if not t.is_floating_point() or torch.finfo(t.dtype).bits <= torch.finfo(dtype).bits:
        return t
    return t.to(dtype).to(t.dtype)
