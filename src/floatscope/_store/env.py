"""What the run store records about the environment a run ran in."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import torch

__all__ = ["environment"]


def environment() -> dict[str, Any]:
    """Library versions, device, default dtype, thread counts and determinism flags."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "default_dtype": str(torch.get_default_dtype()).removeprefix("torch."),
        "num_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "torch_initial_seed": torch.initial_seed(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
    numpy = sys.modules.get("numpy")
    env["numpy"] = getattr(numpy, "__version__", None)
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        env["allow_tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    else:
        env["device"] = "cpu"
    return env
