"""Cost of ``floatscope.precision.analyze`` on a ~10M-parameter transformer, as forward passes.

Prints the time of each phase of the analysis (float64 reference, low-precision run, per-module
local errors, ranking runs, policy search) as a ratio to one plain float32 forward pass. The
analysis runs ``--repeat`` times, each right after a measurement of the plain forward, and the
median of each ratio is printed (a noisy machine moves single runs by 2x).

    python benchmarks/precision.py [--dtype float16] [--mode cast] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import Transformer, median_forward  # noqa: E402

import floatscope.precision  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--mode", default="cast", choices=["cast", "autocast"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = Transformer().eval()
    ids = torch.randint(0, 2048, (args.batch, 128))
    n_params = sum(p.numel() for p in model.parameters())

    start = time.perf_counter()
    floatscope.precision.analyze(torch.nn.Linear(4, 4), (torch.randn(2, 4),), dtype=args.dtype, search=False)
    print(f"first call in a process (one-time torch imports): {time.perf_counter() - start:.2f} s")
    ratios: dict[str, list[float]] = {}
    forwards = []
    for _ in range(args.repeat):
        forward = median_forward(model, (ids,))
        forwards.append(forward)
        start = time.perf_counter()
        result = floatscope.precision.analyze(model, (ids,), dtype=args.dtype, mode=args.mode)
        total = time.perf_counter() - start
        for phase, seconds in (*result.seconds.items(), ("wall (all)", total)):
            ratios.setdefault(phase, []).append(seconds / forward)
    print(f"model: {n_params / 1e6:.1f}M parameters, batch {args.batch} x 128 tokens, {args.dtype} ({args.mode}), "
          f"{torch.get_num_threads()} threads")
    print(f"one plain float32 forward: {statistics.median(forwards) * 1e3:.1f} ms (median)")
    print(f"{'phase':<16}{'forward passes (median of ' + str(args.repeat) + ')':>34}{'range':>16}")
    for phase, values in ratios.items():
        print(f"{phase:<16}{statistics.median(values):>34.1f}{min(values):>9.1f}-{max(values):<6.1f}")
    rec = result.recommendation
    print(f"output error {result.output_error:.3g}; {len(result.modules)} modules, {len(result.ops)} ops aligned; "
          f"flagged: {result.flagged or 'none'}")
    if rec is not None:
        print(f"policy search: {rec.evaluations} verification runs, keep {rec.keep_fp32 or 'nothing'} in float32, "
              f"error after {rec.output_error_after:.3g} (tolerance {rec.tolerance:.3g})")


if __name__ == "__main__":
    main()
