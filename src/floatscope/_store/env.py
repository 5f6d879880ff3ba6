"""What a run ran on: library versions, device, precision defaults, threads, determinism flags."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["Environment", "capture_env", "environment"]


@dataclass(frozen=True)
class Environment:
    """Library versions, device, precision defaults, threads and determinism flags.

    Example:
        >>> capture_env().torch == torch.__version__
        True
    """

    python: str
    torch: str
    numpy: str | None
    platform: str
    device: str
    cuda: str | None
    default_dtype: str
    num_threads: int
    num_interop_threads: int
    deterministic_algorithms: bool
    cudnn_deterministic: bool
    cudnn_benchmark: bool
    allow_tf32_matmul: bool
    allow_tf32_cudnn: bool
    float32_matmul_precision: str
    torch_initial_seed: int
    cublas_workspace_config: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def capture_env() -> Environment:
    """The environment as the run store records it, as a frozen :class:`Environment`."""
    numpy = sys.modules.get("numpy")
    cuda = torch.cuda.is_available()
    return Environment(
        python=platform.python_version(),
        torch=torch.__version__,
        numpy=getattr(numpy, "__version__", None),
        platform=platform.platform(),
        device=torch.cuda.get_device_name(0) if cuda else "cpu",
        cuda=torch.version.cuda if cuda else None,
        default_dtype=str(torch.get_default_dtype()).removeprefix("torch."),
        num_threads=torch.get_num_threads(),
        num_interop_threads=torch.get_num_interop_threads(),
        deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
        cudnn_deterministic=bool(torch.backends.cudnn.deterministic),
        cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
        allow_tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32),
        allow_tf32_cudnn=bool(torch.backends.cudnn.allow_tf32),
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        torch_initial_seed=torch.initial_seed(),
        cublas_workspace_config=os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )


def environment() -> dict[str, Any]:
    """:func:`capture_env` as a plain dict (what the store writes)."""
    return capture_env().to_dict()
