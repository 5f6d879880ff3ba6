"""Summaries of tensors that keep NaN and Inf visible."""

from __future__ import annotations

import math

import torch

from floatscope._results import OperandStats
from floatscope._numerics.formats import format_of

__all__ = ["operand_stats", "is_float", "all_finite", "l2_norms", "Scratch"]

# On the CPU, torch._foreach_norm pays about 1.5 us per tensor; stacking tensors of one size and
# reducing the rows is cheaper up to about 16K elements (measured, one thread).
_STACK_NUMEL = 8192
_STACK_TOTAL = 2**20  # elements per stacked copy (memory bound)


class Scratch:
    """Reusable host buffers for stacking tensors on the CPU.

    A fresh allocation of a few megabytes comes from the operating system and page-faults on first
    touch, which costs more than the stacking itself (about 0.7 ms for 2.4 MB here). A watch keeps one
    buffer per dtype, as large as its largest stack (at most ``_STACK_TOTAL`` elements), and
    stacks into it. A stack returned by :meth:`stack` is valid until the next call.
    """

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    def stack(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """``torch.stack(tensors)`` (same shape and dtype), into a reused buffer on the CPU."""
        first = tensors[0]
        n = first.numel() * len(tensors)
        if first.device.type != "cpu" or n > _STACK_TOTAL or n == 0:
            return torch.stack(tensors)
        buffer = self._buffers.get(first.dtype)
        if buffer is None or buffer.numel() < n:
            buffer = self._buffers[first.dtype] = torch.empty(n, dtype=first.dtype)
        with torch.no_grad():
            return torch.stack(tensors, out=buffer[:n].view(len(tensors), *first.shape))


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


def l2_norms(tensors: list[torch.Tensor], dtype: torch.dtype | None = None,
             scratch: Scratch | None = None) -> tuple[list[int] | None, torch.Tensor]:
    """Per-tensor L2 norms of same-device, same-dtype tensors, as one vector (NaN and Inf propagate).

    Returns ``(order, norms)``: ``norms[k]`` is the norm of ``tensors[order[k]]`` (``order`` is None
    when the norms come in the order of ``tensors``). ``dtype`` is the accumulation and result dtype,
    as ``torch._foreach_norm``'s. On a GPU this is one ``torch._foreach_norm`` (a fused kernel); on
    the CPU, small tensors of one shape are stacked and reduced row by row, a few kernels instead of
    one per tensor (stacked into ``scratch``'s buffers when given).

    Example:
        >>> l2_norms([torch.tensor([3.0, 4.0]), torch.tensor([1.0])])[1].tolist()
        [5.0, 1.0]
    """
    if not tensors:
        return None, torch.empty(0, dtype=dtype or torch.float32)
    if tensors[0].device.type != "cpu" or len(tensors) < 4:
        return None, torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype))
    by_shape: dict[torch.Size, list[int]] = {}
    for i, t in enumerate(tensors):
        by_shape.setdefault(t.shape, []).append(i)
    if len(by_shape) * 2 > len(tensors):  # little to stack
        return None, torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype))
    order: list[int] = []
    parts: list[torch.Tensor] = []
    large: list[int] = []
    for shape, index in by_shape.items():
        n = shape.numel()
        if n == 0 or n > _STACK_NUMEL or len(index) == 1:
            large += index
            continue
        per = max(1, _STACK_TOTAL // n)
        for start in range(0, len(index), per):
            chunk = index[start:start + per]
            group = [tensors[i] for i in chunk]
            rows = (scratch.stack(group) if scratch is not None else torch.stack(group)).reshape(len(chunk), -1)
            parts.append(torch.linalg.vector_norm(rows, dim=1, dtype=dtype))
            order += chunk
    if large:
        parts.append(torch.stack(torch._foreach_norm([tensors[i] for i in large], 2, dtype=dtype)))
        order += large
    return order, torch.cat(parts) if len(parts) > 1 else parts[0]
