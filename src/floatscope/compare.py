"""Deployment agreement: PyTorch against ONNX Runtime, module by module (``onnxruntime`` needs
``floatscope[onnx]``), and where non-determinism enters (``determinism``).

Example:
    >>> import torch, floatscope.compare
    >>> result = floatscope.compare.onnxruntime(torch.nn.Linear(4, 2), (torch.randn(3, 4),))  # doctest: +SKIP
"""

from floatscope._engines.compare import CompareResult, ModuleAgreement, compare_onnxruntime as onnxruntime
from floatscope._engines.determinism import DeterminismResult, SettingResult, check_determinism as determinism

__all__ = ["CompareResult", "DeterminismResult", "ModuleAgreement", "SettingResult", "determinism", "onnxruntime"]
