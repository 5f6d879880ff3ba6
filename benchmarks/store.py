"""The run store's write cost per step at the default settings, and what many writers cost each other.

1. One watched run with the defaults (a store, fingerprints every step, health every 50 steps):
   the time spent inside the store's methods per step (buffering rows and the periodic commit),
   the commits per second, and the watched step time with the store against the same watch with
   ``store=None``, interleaved in blocks so the machine's noise hits both alike.
2. N ``floatscope run`` processes writing one store at once: each one's run time against the same
   script run alone, and whether every row arrived.

    python benchmarks/store.py [--steps 300] [--writers 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import torch

import floatscope
import floatscope.runs as fr
from floatscope._store.sqlite import RunStore

_TIMED = ("new_run", "add_step", "set_step_scale", "add_event", "finish_run", "add_health", "add_fingerprint",
          "update_config", "update_env", "update_progress", "commit", "close")
_PER_RUN = {"new_run", "finish_run", "close"}


class _Meter:
    """Time spent inside RunStore's write methods (outermost calls only) and the commits that wrote."""

    def __init__(self) -> None:
        self.seconds = 0.0      # rows and periodic commits: the per-step cost
        self.run_seconds = 0.0  # opening a run and finishing it: once per run
        self.commits = 0
        self._depth = 0
        self._originals: dict[str, Callable[..., Any]] = {}

    def __enter__(self) -> "_Meter":
        for name in _TIMED:
            original = getattr(RunStore, name)
            self._originals[name] = original

            def timed(store: RunStore, *args: Any, _original: Callable[..., Any] = original, _name: str = name,
                      **kwargs: Any) -> Any:
                self._depth += 1
                start = time.perf_counter()
                try:
                    return _original(store, *args, **kwargs)
                finally:
                    self._depth -= 1
                    if self._depth == 0:
                        spent = time.perf_counter() - start
                        if _name in _PER_RUN:
                            self.run_seconds += spent
                        else:
                            self.seconds += spent

            setattr(RunStore, name, timed)
        transaction = RunStore._transaction
        self._originals["_transaction"] = transaction

        def counted(store: RunStore, *args: Any, **kwargs: Any) -> Any:
            self.commits += 1
            return transaction(store, *args, **kwargs)

        RunStore._transaction = counted  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._originals.items():
            setattr(RunStore, name, original)


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer, Callable[[], torch.Tensor]]:
    torch.manual_seed(0)
    blocks = []
    for _ in range(12):
        blocks += [torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.GELU()]
    model = torch.nn.Sequential(*blocks, torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt, lambda: torch.randn(64, 64)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Callable[[], torch.Tensor], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(batch()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def one_run(steps: int, folder: Path) -> None:
    model, opt, batch = _model()
    _train(model, opt, batch, 20)  # warm up
    with_store, without = [], []
    store_seconds = run_seconds = 0.0
    commits = 0
    blocks = 6
    for block in range(blocks):
        for use_store in ((True, False) if block % 2 == 0 else (False, True)):
            if use_store:
                with _Meter() as meter:
                    with floatscope.watch(model, opt, store=folder / "bench.sqlite", run_name="bench"):
                        with_store.append(_train(model, opt, batch, steps // blocks))
                store_seconds += meter.seconds
                run_seconds += meter.run_seconds
                commits += meter.commits
            else:
                with floatscope.watch(model, opt, store=None):
                    without.append(_train(model, opt, batch, steps // blocks))
    per_step = store_seconds / (steps // blocks * blocks)
    a, b = statistics.median(with_store), statistics.median(without)
    runs = fr.list_runs(folder / "bench.sqlite")
    print(f"one run, {steps} steps of a 12-block MLP (AdamW), defaults (fingerprints every step, health every 50):")
    print(f"  time inside the store per step     {per_step * 1e6:8.0f} us   ({commits} commits in "
          f"{blocks} runs of {steps // blocks} steps)")
    print(f"  opening and finishing a run        {run_seconds / blocks * 1e3:8.1f} ms   (once per run)")
    print(f"  watched step with store / without  {a * 1e3:.2f} ms / {b * 1e3:.2f} ms = {a / b:.3f}x")
    print(f"  rows written: {sum(len(fr.steps(r.id, store=folder / 'bench.sqlite')) for r in runs)} steps in "
          f"{len(runs)} runs")


SCRIPT = """
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for step in range({steps}):
    loss = model(torch.randn(32, 32)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
"""


def many_writers(writers: int, steps: int, folder: Path) -> None:
    script = folder / "train.py"
    script.write_text(textwrap.dedent(SCRIPT.format(steps=steps)))
    cmd = [sys.executable, "-m", "floatscope", "run", "--store", str(folder / "many.sqlite"), str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=600)
    alone = time.perf_counter() - start
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
             for _ in range(writers)]
    errors = [p.communicate(timeout=600)[1].decode() for p in procs]
    together = time.perf_counter() - start
    runs = fr.list_runs(folder / "many.sqlite")
    complete = sum(1 for r in runs if r.status == "clean" and len(fr.steps(r.id, store=folder / "many.sqlite")) == steps)
    locked = sum("locked" in e for e in errors)
    cores = os.cpu_count() or 1
    print(f"{writers} floatscope run processes writing one store at once ({steps} steps each, {cores} cores):")
    print(f"  one alone {alone:.1f} s; {writers} together {together:.1f} s "
          f"({together / alone:.2f}x one, {writers / cores:.1f} processes per core)")
    print(f"  complete runs {complete - 1}/{writers} (plus the one alone), 'locked' errors: {locked}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--writers", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    with tempfile.TemporaryDirectory() as tmp:
        one_run(args.steps, Path(tmp))
        many_writers(args.writers, 200, Path(tmp))


if __name__ == "__main__":
    main()
