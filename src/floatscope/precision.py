"""Precision analysis: what float16, bfloat16 and float32 cost a model, against float64.

Example:
    >>> import torch, floatscope.precision
    >>> result = floatscope.precision.analyze(torch.nn.Linear(8, 8), (torch.randn(4, 8),), dtype="bfloat16")
    >>> result.ranking
    []
"""

from floatscope._engines.precision import (
    DEFAULT_TOLERANCE,
    Accumulation,
    Float32Policy,
    ModuleError,
    OpError,
    PrecisionResult,
    Recommendation,
    analyze,
    keep_in_fp32,
)

__all__ = ["DEFAULT_TOLERANCE", "Accumulation", "Float32Policy", "ModuleError", "OpError", "PrecisionResult", "Recommendation",
           "analyze", "keep_in_fp32"]
