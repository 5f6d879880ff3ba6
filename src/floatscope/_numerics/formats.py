"""Float formats: the facts every analysis needs about fp64 ... fp8.

Pure functions. Every torch floating dtype is handled explicitly; an unknown dtype raises
instead of returning a silent default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["FloatFormat", "FORMATS", "format_of", "headroom_bits", "dtype_name"]


@dataclass(frozen=True)
class FloatFormat:
    """An IEEE-style binary floating-point format.

    Attributes:
        name: Short name, e.g. ``"float16"``.
        exponent_bits: Width of the exponent field.
        mantissa_bits: Stored fraction bits (the implicit leading bit not counted).
        max: Largest finite value.
        smallest_normal: Smallest positive normal value (``torch.finfo(dtype).tiny``).
        smallest_subnormal: Smallest positive subnormal value.
        eps: Gap between 1.0 and the next larger value, ``2**-mantissa_bits``.
        dtype: The torch dtype that stores this format, or None (tf32 has no storage dtype).

    Example:
        >>> format_of(torch.float16).max
        65504.0
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    max: float
    smallest_normal: float
    smallest_subnormal: float
    eps: float
    dtype: torch.dtype | None

    @property
    def bits(self) -> int:
        """Total width: sign + exponent + stored mantissa."""
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def decimal_digits(self) -> float:
        """Decimal digits of precision, ``(mantissa_bits + 1) * log10(2)``."""
        return (self.mantissa_bits + 1) * math.log10(2.0)

    @property
    def log_range(self) -> float:
        """``exp(-x)`` rounds to exactly 0 for ``x`` beyond this: ``-ln(smallest_subnormal / 2)``.

        It is the largest logit gap a softmax survives without a probability becoming 0.
        """
        return -math.log(self.smallest_subnormal / 2)

    @property
    def exp_overflow(self) -> float:
        """``exp(x)`` overflows to Inf for ``x`` beyond this: ``ln(max)``."""
        return math.log(self.max)


def _from_finfo(name: str, dtype: torch.dtype, exponent_bits: int, mantissa_bits: int) -> FloatFormat:
    info = torch.finfo(dtype)
    return FloatFormat(
        name=name,
        exponent_bits=exponent_bits,
        mantissa_bits=mantissa_bits,
        max=float(info.max),
        smallest_normal=float(info.tiny),
        smallest_subnormal=float(info.smallest_normal) * 2.0**-mantissa_bits,
        eps=float(info.eps),
        dtype=dtype,
    )


def _build_formats() -> dict[str, FloatFormat]:
    formats = {
        "float64": _from_finfo("float64", torch.float64, 11, 52),
        "float32": _from_finfo("float32", torch.float32, 8, 23),
        # TF32 keeps fp32's range with a 10-bit mantissa; no torch dtype stores it.
        "tf32": FloatFormat("tf32", 8, 10, (2 - 2.0**-10) * 2.0**127, 2.0**-126, 2.0**-136, 2.0**-10, None),
        "bfloat16": _from_finfo("bfloat16", torch.bfloat16, 8, 7),
        "float16": _from_finfo("float16", torch.float16, 5, 10),
    }
    # fp8 dtypes exist only in newer torch builds; include what this build has.
    if hasattr(torch, "float8_e4m3fn"):
        formats["float8_e4m3fn"] = _from_finfo("float8_e4m3fn", torch.float8_e4m3fn, 4, 3)
    if hasattr(torch, "float8_e5m2"):
        formats["float8_e5m2"] = _from_finfo("float8_e5m2", torch.float8_e5m2, 5, 2)
    return formats


FORMATS: dict[str, FloatFormat] = _build_formats()
_BY_DTYPE = {f.dtype: f for f in FORMATS.values() if f.dtype is not None}


def format_of(dtype: torch.dtype | str) -> FloatFormat:
    """Return the :class:`FloatFormat` of a torch floating dtype (or its name, ``"float16"``).

    Raises:
        UsageError: ``dtype`` is not a floating-point format floatscope knows (a ``ValueError``).

    Example:
        >>> format_of(torch.bfloat16).mantissa_bits
        7
    """
    found = FORMATS.get(dtype.removeprefix("torch.")) if isinstance(dtype, str) else _BY_DTYPE.get(dtype)
    if found is None:
        from floatscope._errors import UsageError

        raise UsageError(
            f"{dtype} is not a floating-point format floatscope knows; "
            f"expected one of {', '.join(str(d) for d in _BY_DTYPE)}"
        )
    return found


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def headroom_bits(absmax: float, dtype: torch.dtype) -> float:
    """Bits of range left above ``absmax`` before ``dtype`` overflows.

    ``log2(max / absmax)``: 0 means the value sits at the format's limit, negative means it
    already overflowed. ``absmax == 0`` gives ``inf`` (nothing can overflow); a non-finite
    ``absmax`` gives ``-inf``.

    Example:
        >>> headroom_bits(32752.0, torch.float16)
        1.0
    """
    if math.isnan(absmax) or math.isinf(absmax):
        return -math.inf
    if absmax == 0.0:
        return math.inf
    return math.log2(format_of(dtype).max / absmax)
