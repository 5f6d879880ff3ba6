"""Float formats and tensor statistics against exact arithmetic."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from floatscope import FORMATS, format_of
from floatscope._numerics.formats import headroom_bits
from floatscope._numerics.stats import operand_stats


@pytest.mark.parametrize("name, exp_bits, man_bits", [
    ("float64", 11, 52), ("float32", 8, 23), ("tf32", 8, 10), ("bfloat16", 8, 7), ("float16", 5, 10),
])
def test_format_constants_match_exact_ieee_values(name, exp_bits, man_bits):
    fmt = FORMATS[name]
    bias = 2 ** (exp_bits - 1) - 1
    assert Fraction(fmt.max) == (2 - Fraction(1, 2**man_bits)) * Fraction(2) ** bias
    assert Fraction(fmt.smallest_normal) == Fraction(2) ** (1 - bias)
    assert Fraction(fmt.smallest_subnormal) == Fraction(2) ** (1 - bias - man_bits)
    assert Fraction(fmt.eps) == Fraction(1, 2**man_bits)
    assert fmt.bits == 1 + exp_bits + man_bits


def test_fp8_formats_when_torch_has_them():
    if "float8_e4m3fn" in FORMATS:
        assert FORMATS["float8_e4m3fn"].max == 448.0
        assert FORMATS["float8_e4m3fn"].smallest_subnormal == 2.0**-9
    if "float8_e5m2" in FORMATS:
        assert FORMATS["float8_e5m2"].max == 57344.0


def test_format_of_rejects_non_float_dtypes():
    with pytest.raises(ValueError, match="not a floating-point format"):
        format_of(torch.int32)


def test_headroom_bits():
    assert headroom_bits(65504.0 / 8, torch.float16) == pytest.approx(3.0)
    assert headroom_bits(0.0, torch.float16) == math.inf
    assert headroom_bits(math.inf, torch.float32) == -math.inf


def test_operand_stats_keep_nan_and_inf_visible():
    t = torch.tensor([0.0, -2.0, 3.0, float("nan"), float("inf"), 1e-6], dtype=torch.float16)
    s = operand_stats(t)
    assert (s.nan, s.inf, s.zeros) == (1, 1, 1)
    assert (s.min, s.max, s.absmax) == (-2.0, 3.0, 3.0)
    assert s.below_normal == 1  # 1e-6 is subnormal in float16
    assert s.headroom_bits == pytest.approx(math.log2(65504.0 / 3.0))
    assert s.dtype == "float16" and s.shape == [6]


def test_operand_stats_of_all_nonfinite_tensor():
    s = operand_stats(torch.full((3,), float("nan")))
    assert s.nan == 3 and math.isnan(s.absmax)
    assert "no finite element" in s.describe()
