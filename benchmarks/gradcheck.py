"""floatscope.gradcheck against torch.autograd.gradcheck (fast and slow modes) on injected backward bugs.

Run: python benchmarks/gradcheck.py [--repeats 3] [--slow-limit 4096]

Each case is a float64 function whose backward has a known bug (or none). For each method it prints
whether the bug was detected, the median wall time over --repeats runs (slow mode: one run), and
the ratio to torch's fast mode. torch raises GradcheckError when it detects; when fast mode detects,
torch itself reruns the slow mode to print the Jacobians, and that is part of its time. Slow mode
computes the whole numeric and analytic Jacobians (two forward calls per input element, one
backward per output element); it runs on every case with at most --slow-limit input elements and
is skipped (with a note) above it. One intra-op thread, a warm-up call per method before timing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch

import floatscope
from torch.autograd.gradcheck import GradcheckError


def _sin_with(bug: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    class Sin(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            ctx.save_for_backward(x)
            return torch.sin(x)

        @staticmethod
        def backward(ctx, g):  # noqa: ANN001, ANN205
            (x,) = ctx.saved_tensors
            return bug(g * torch.cos(x), x)

    return Sin.apply


def _column(factor: float, elements: tuple[int, ...] = (1234,)) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def bug(gx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        gx = gx.clone()
        gx[list(elements)] = gx[list(elements)] * factor
        return gx

    return bug


class _LinearWrongBiasSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x, w)
        return x @ w.T + b

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        x, w = ctx.saved_tensors
        return g @ w, g.T @ x, -g.sum(0)


class _Net(torch.nn.Module):
    def __init__(self, wrong: bool) -> None:
        super().__init__()
        self.first = torch.nn.Linear(32, 64)
        self.second = torch.nn.Linear(64, 8)
        self.wrong = wrong

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        if self.wrong:
            return _LinearWrongBiasSign.apply(h, self.second.weight, self.second.bias)
        return self.second(h)


def _module_case(wrong: bool) -> tuple[Any, tuple[torch.Tensor, ...], Callable[..., torch.Tensor], tuple]:
    """The module for floatscope, and the same thing as a function of its parameters for torch."""
    torch.manual_seed(0)
    net = _Net(wrong).double()
    x = torch.randn(16, 32, dtype=torch.float64)
    names = [n for n, _ in net.named_parameters()]

    def of_params(*params: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(net, dict(zip(names, params, strict=True)), (x,))

    params = tuple(p.detach().clone().requires_grad_() for p in net.parameters())
    return net, (x,), of_params, params


def _x(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64).requires_grad_()


def cases() -> list[tuple[str, bool, Any, tuple, Callable[..., Any], tuple]]:
    """(name, has_bug, floatscope fn, floatscope inputs, torch fn, torch inputs)."""
    out = []
    for name, bug, n, has_bug in [
        ("one wrong column of 4,096 (x3)", _column(3.0), 4096, True),
        ("one wrong column of 4,096 (x1.001)", _column(1.001), 4096, True),
        ("five wrong columns of 4,096 (x3)", _column(3.0, (17, 1234, 2222, 3001, 4000)), 4096, True),
        ("scaled gradient (x2), 4,096", lambda gx, x: 2 * gx, 4096, True),
        ("wrong only for negative inputs, 4,096", lambda gx, x: torch.where(x < 0, -gx, gx), 4096, True),
        ("correct custom Function, 4,096", lambda gx, x: gx, 4096, False),
    ]:
        fn = _sin_with(bug)
        x = _x(n)
        out.append((name, has_bug, fn, (x,), fn, (x,)))
    for wrong in (True, False):
        net, inputs, of_params, params = _module_case(wrong)
        name = ("module: wrong sign of one parameter (2,632 params)" if wrong
                else "module: correct (2,632 params)")
        out.append((name, wrong, net, inputs, of_params, params))
    return out


def _time(run: Callable[[], bool], repeats: int) -> tuple[bool, float]:
    times, detected = [], False
    for _ in range(repeats):
        start = time.perf_counter()
        detected = run()
        times.append(time.perf_counter() - start)
    return detected, statistics.median(times)


def _torch_run(fn: Callable[..., Any], inputs: tuple, fast: bool) -> Callable[[], bool]:
    def run() -> bool:
        try:
            torch.autograd.gradcheck(fn, inputs, fast_mode=fast)
        except GradcheckError:
            return True
        return False

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slow-limit", type=int, default=4096,
                        help="run torch's slow mode only when the inputs have at most this many elements")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warm = _x(8)
    floatscope.gradcheck(torch.sin, warm)
    torch.autograd.gradcheck(torch.sin, (warm,), fast_mode=True)
    torch.autograd.gradcheck(torch.sin, (warm,), fast_mode=False)

    header = (f"{'case':52s} {'bug':>4s} | {'floatscope':>18s} {'evals':>6s} | {'torch fast':>16s} | "
              f"{'torch slow':>16s} | {'fs/fast':>7s} {'slow/fast':>9s}")
    print(header)
    print("-" * len(header))
    for name, has_bug, fs_fn, fs_inputs, t_fn, t_inputs in cases():
        result: list[Any] = []

        def run_fs() -> bool:
            result[:] = [floatscope.gradcheck(fs_fn, *fs_inputs)]
            return not result[0].passed

        fs_detected, fs_s = _time(run_fs, args.repeats)
        fast_detected, fast_s = _time(_torch_run(t_fn, t_inputs, True), args.repeats)
        size = sum(t.numel() for t in t_inputs)
        if size <= args.slow_limit:
            slow_detected, slow_s = _time(_torch_run(t_fn, t_inputs, False), 1)
            slow = f"{_yes(slow_detected):>3s} {slow_s:10.3f} s"
            slow_ratio = f"{_ratio(slow_s / fast_s):>9s}"
        else:
            slow, slow_ratio = f"{'skipped':>16s}", f"{'-':>9s}"
        print(f"{name:52s} {_yes(has_bug):>4s} | {_yes(fs_detected):>3s} {fs_s:12.4f} s {result[0].evaluations:6d} | "
              f"{_yes(fast_detected):>3s} {fast_s:10.4f} s | {slow} | {_ratio(fs_s / fast_s):>7s} {slow_ratio}")
    print(f"\n'yes' under floatscope/torch: the check failed (detected a bug). Times: median of {args.repeats} runs "
          f"(slow mode: 1), one thread. floatscope's 'evals' counts forward calls.")


def _ratio(r: float) -> str:
    return f"{r:.0f}x" if r >= 100 else (f"{r:.1f}x" if r >= 1 else f"{r:.3f}x")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


if __name__ == "__main__":
    main()
