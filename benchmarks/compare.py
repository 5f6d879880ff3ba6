"""Cost of ``floatscope compare`` (PyTorch vs ONNX Runtime) as a ratio to one PyTorch forward pass.

    python benchmarks/compare.py [--dtype float16]      (needs pip install 'floatscope[onnx]')
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import Transformer, median_forward  # noqa: E402

import floatscope.compare  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = Transformer().eval()
    ids = torch.randint(0, 2048, (4, 128))
    forward = median_forward(model, (ids,))
    start = time.perf_counter()
    result = floatscope.compare.onnxruntime(model, (ids,), dtype=args.dtype)
    total = time.perf_counter() - start
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, batch 4 x 128 tokens, "
          f"ONNX Runtime {args.dtype}")
    print(f"one PyTorch forward: {forward * 1e3:.1f} ms")
    for phase, seconds in result.seconds.items():
        print(f"{phase:<18}{seconds:>8.2f} s{seconds / forward:>10.1f} forwards")
    print(f"{'compare (all)':<18}{total:>8.2f} s{total / forward:>10.1f} forwards")
    print(f"{result.matched_modules}/{result.total_modules} modules matched; first divergent: "
          f"{result.first_divergent}; output max abs {result.output.max_abs:.3g}")


if __name__ == "__main__":
    main()
