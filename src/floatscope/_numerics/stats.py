"""Summaries of tensors that keep NaN and Inf visible."""

from __future__ import annotations

import math

import torch

from floatscope._results import OperandStats
from floatscope._numerics.formats import format_of

__all__ = ["operand_stats", "is_float", "all_finite"]


def is_float(value: object) -> bool:
    """True for a floating-point tensor (complex excluded)."""
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def all_finite(t: torch.Tensor) -> bool:
    """Host-side check that every element of ``t`` is finite (one device sync)."""
    if t.numel() == 0:
        return True
    return bool(torch.isfinite(t).all())


def operand_stats(t: torch.Tensor) -> OperandStats:
    """Summarise a floating tensor with one host sync.

    min/max/absmax are taken over the finite elements only, so one Inf does not hide the range of
    the rest; NaN, Inf and zero counts are reported separately. ``headroom_bits`` is
    ``log2(dtype max / finite absmax)`` and ``below_normal`` counts non-zero finite values under the
    dtype's smallest normal (subnormal, and flushed to zero on hardware that flushes). With no finite
    element, min/max/absmax are NaN.

    Example:
        >>> operand_stats(torch.tensor([0.0, 1.0, float("inf")])).inf
        1
    """
    t = t.detach()
    fmt = format_of(t.dtype)
    n = t.numel()
    if n == 0:
        return OperandStats(str(t.dtype).removeprefix("torch."), list(t.shape), math.nan, math.nan,
                            math.nan, 0, 0, 0, 0, math.inf, fmt.max, fmt.smallest_normal)
    x = t.to(torch.float64) if t.dtype != torch.float64 else t
    finite = torch.isfinite(x)
    nan = torch.isnan(x)
    abs_x = x.abs()
    big = torch.tensor(math.inf, dtype=torch.float64, device=x.device)
    fin_min = torch.where(finite, x, big).min()
    fin_max = torch.where(finite, x, -big).max()
    fin_absmax = torch.where(finite, abs_x, torch.zeros_like(abs_x)).max()
    below = (finite & (abs_x > 0) & (abs_x < fmt.smallest_normal)).sum()
    packed = torch.stack([
        fin_min, fin_max, fin_absmax,
        nan.sum().to(torch.float64), (~finite & ~nan).sum().to(torch.float64),
        (x == 0).sum().to(torch.float64), below.to(torch.float64), finite.sum().to(torch.float64),
    ]).tolist()
    lo, hi, absmax, n_nan, n_inf, n_zero, n_below, n_finite = packed
    if n_finite == 0:
        lo = hi = absmax = math.nan
    headroom = math.inf if absmax == 0 else (math.nan if math.isnan(absmax) else math.log2(fmt.max / absmax))
    return OperandStats(
        dtype=str(t.dtype).removeprefix("torch."),
        shape=list(t.shape),
        min=lo,
        max=hi,
        absmax=absmax,
        nan=int(n_nan),
        inf=int(n_inf),
        zeros=int(n_zero),
        below_normal=int(n_below),
        headroom_bits=headroom,
        dtype_max=fmt.max,
        dtype_smallest_normal=fmt.smallest_normal,
    )
