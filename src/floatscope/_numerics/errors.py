"""Error metrics between a low-precision result and a float64 reference. Pure functions.

Every metric is computed in float64 and handles zeros and non-finite values explicitly:

* ``relative_error(y, r) = ||y - r||_2 / ||r||_2``; when ``||r||_2 == 0`` it is ``||y - r||_2``
  (absolute), so two all-zero tensors give 0. Any non-finite element of ``y`` gives ``inf``.
* ``ulp(x, fmt) = 2**(max(floor(log2 |x|), emin) - p)`` with ``p`` the stored mantissa bits and
  ``emin = log2(smallest normal)``; for ``x == 0`` it is the smallest subnormal.
* ``max_ulp_error(y, r, fmt) = max_i |y_i - r_i| / ulp(r_i, fmt)``.
* ``bits_correct(e) = max(0, -log2 e)``; ``e == 0`` gives ``p + 1`` (exact in the format), ``e == inf``
  gives 0. A norm-wise error can exceed ``p + 1`` bits because rounding errors partly cancel.
* ``subnormal_fraction(r, fmt)``: the fraction of elements with ``0 < |r_i| < smallest normal``.
* ``round_to_format(x, fmt)``: ``x`` rounded to nearest-even in ``fmt``, overflow to ``inf``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from floatscope._numerics.formats import FORMATS, FloatFormat  # noqa: F401  (FORMATS: doctest)

__all__ = ["relative_error", "ulp", "max_ulp_error", "compare", "summarize", "ErrorSummary", "bits_correct",
           "subnormal_fraction", "round_to_format"]


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def relative_error(y: torch.Tensor, r: torch.Tensor) -> float:
    """Norm-wise relative error of ``y`` against the reference ``r`` (see module docstring).

    Example:
        >>> relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
        0.0
    """
    y64, r64 = _f64(y), _f64(r)
    if y64.shape != r64.shape:
        raise ValueError(f"shapes differ: {tuple(y64.shape)} vs reference {tuple(r64.shape)}")
    # A non-finite y makes the difference's norm non-finite: test the one number, not every element.
    diff = float(torch.linalg.vector_norm(y64 - r64))
    if not math.isfinite(diff) and not bool(torch.isfinite(y64).all()):
        return math.inf
    ref = float(torch.linalg.vector_norm(r64))
    return diff / ref if ref > 0 else diff


def ulp(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Unit in the last place of each element of ``x`` in ``fmt`` (float64 result)."""
    a = _f64(x).abs()
    _, exponent = torch.frexp(a)  # a = m * 2**exponent with 0.5 <= m < 1: floor(log2 a) = exponent - 1
    emin = int(round(math.log2(fmt.smallest_normal)))
    spacing = torch.ldexp(torch.ones_like(a), (exponent - 1).clamp_min(emin) - fmt.mantissa_bits)
    return torch.where(a > 0, spacing, torch.full_like(a, fmt.smallest_subnormal))


def max_ulp_error(y: torch.Tensor, r: torch.Tensor, fmt: FloatFormat) -> float:
    """Largest elementwise error in units of ``fmt``'s last place at the reference value."""
    return compare(y, r, fmt)[1]


def compare(y: torch.Tensor, r: torch.Tensor, fmt: FloatFormat) -> tuple[float, float, int]:
    """``(relative_error, max_ulp_error, non-finite count of y)`` in one pass over the data."""
    s = summarize(y, r, fmt)
    return s.relative_error, s.max_ulp, s.nonfinite


class ErrorSummary(NamedTuple):
    """What :func:`summarize` measures of a result against its reference."""

    relative_error: float
    max_ulp: float
    nonfinite: int
    absmax: float  # of the reference
    subnormal_fraction: float  # of the reference, in fmt


_EXPONENT = 0x7FF0000000000000  # float64's exponent field


def summarize(y: torch.Tensor, r: torch.Tensor, fmt: FloatFormat) -> ErrorSummary:
    """Norm-wise and ULP error of ``y`` against ``r``, the reference's largest magnitude and its
    subnormal fraction in ``fmt``, with as few passes over the data as possible.

    The ULP of each reference element is read from its float64 bits: masking all but the exponent
    field gives ``2**e`` exactly, ``e = floor(log2 |r|)`` (0 for zero and float64 subnormals), so
    ``ulp(r) = max(2**e, 2**emin) * 2**-p``, which is also the smallest subnormal for ``r == 0``.

    Example:
        >>> s = summarize(torch.tensor([1.0, 2.0], dtype=torch.float16), torch.tensor([1.0, 2.0]), FORMATS["float16"])
        >>> (s.relative_error, s.max_ulp, s.absmax)
        (0.0, 0.0, 2.0)
    """
    y64, r64 = _f64(y).reshape(-1), _f64(r).reshape(-1)
    if y64.shape != r64.shape:
        raise ValueError(f"shapes differ: {tuple(y.shape)} vs reference {tuple(r.shape)}")
    n = r64.numel()
    if n == 0:
        return ErrorSummary(0.0, 0.0, 0, 0.0, 0.0)
    lo, hi = torch.aminmax(r64)
    absmax = max(-float(lo), float(hi))
    power = (r64.view(torch.int64) & _EXPONENT).view(torch.float64)  # 2**floor(log2 |r|), 0 for 0
    below = int(torch.count_nonzero(power < fmt.smallest_normal))  # zeros and subnormals in fmt
    subnormal = below - int(torch.count_nonzero(r64 == 0)) if below else 0
    diff = y64 - r64
    diff_norm = float(torch.linalg.vector_norm(diff))
    if not math.isfinite(diff_norm):
        nonfinite = int(n - torch.count_nonzero(torch.isfinite(y64)))
        if nonfinite:
            return ErrorSummary(math.inf, math.inf, nonfinite, absmax, subnormal / n)
    ref_norm = float(torch.linalg.vector_norm(r64))
    rel = diff_norm / ref_norm if ref_norm > 0 else diff_norm
    max_ulp = float(diff.abs_().div_(power.clamp_min_(fmt.smallest_normal)).max()) * 2.0 ** fmt.mantissa_bits
    return ErrorSummary(rel, max_ulp, 0, absmax, subnormal / n)


def bits_correct(error: float, fmt: FloatFormat) -> float:
    """``max(0, -log2(error))``; an exact result counts as ``mantissa_bits + 1`` bits."""
    if error == 0.0:
        return fmt.mantissa_bits + 1.0
    if not math.isfinite(error):
        return 0.0
    return max(0.0, -math.log2(error))


def subnormal_fraction(r: torch.Tensor, fmt: FloatFormat) -> float:
    """Fraction of elements of ``r`` that are non-zero but below ``fmt``'s smallest normal."""
    a = _f64(r).abs()
    if a.numel() == 0:
        return 0.0
    return float(((a > 0) & (a < fmt.smallest_normal)).sum()) / a.numel()


def round_to_format(x: float, fmt: FloatFormat) -> float:
    """``x`` as stored in ``fmt`` (round to nearest even; overflow gives inf; tf32 emulated)."""
    if fmt.dtype is not None:
        return float(torch.tensor(x, dtype=torch.float64).to(fmt.dtype).to(torch.float64))
    # tf32: float32 range, 10 stored mantissa bits.
    if not math.isfinite(x) or x == 0.0:
        return x
    m, e = math.frexp(x)  # x = m * 2**e, 0.5 <= |m| < 1
    scale = 2.0 ** (fmt.mantissa_bits + 1)
    rounded = round(m * scale) / scale  # Python rounds half to even
    value = math.ldexp(rounded, e)
    if abs(value) > fmt.max:
        return math.copysign(math.inf, x)
    if abs(value) < fmt.smallest_subnormal / 2:
        return math.copysign(0.0, x)
    return value
