"""Reproducibility: seed every generator and make kernels deterministic, and remember that it was done."""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass

import torch

from floatscope._errors import UsageError

__all__ = ["SeedRecord", "seed_everything", "last_seeding"]


@dataclass(frozen=True)
class SeedRecord:
    """What :func:`seed_everything` set."""

    seed: int
    python: bool
    numpy: bool
    torch: bool
    cuda: bool
    deterministic: bool
    cudnn_deterministic: bool
    cudnn_benchmark: bool
    cublas_workspace_config: str | None


_LAST: list[SeedRecord] = []  # holds at most the latest record


def last_seeding() -> SeedRecord | None:
    """The most recent :func:`seed_everything` call in this process, if any."""
    return _LAST[-1] if _LAST else None


def seed_everything(seed: int, *, deterministic: bool = True) -> SeedRecord:
    """Seed Python, NumPy and torch (CPU and CUDA); with ``deterministic``, make kernels deterministic.

    Sets ``torch.use_deterministic_algorithms(True, warn_only=True)``, ``cudnn.deterministic``,
    turns ``cudnn.benchmark`` off and sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (needed for
    deterministic cuBLAS). Runs watched afterwards record the returned :class:`SeedRecord`.

    Example:
        >>> record = seed_everything(0)
        >>> record.torch and torch.initial_seed() == 0
        True
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UsageError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is None:
        try:
            import numpy  # noqa: F811
        except ImportError:
            numpy = None
    if numpy is not None:
        numpy.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    record = SeedRecord(seed, True, numpy is not None, True, cuda, deterministic,
                        bool(torch.backends.cudnn.deterministic), bool(torch.backends.cudnn.benchmark),
                        os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    _LAST[:] = [record]
    return record
