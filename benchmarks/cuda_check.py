"""The CUDA paths of the watch, checked in one short run on a machine with a GPU.

1. No blocking host sync per step: a plain loop that itself never syncs trains under the watch
   with ``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising call
   (``.item()``, ``.tolist()`` of a device tensor, a non-pinned copy to the host). The watch reads
   its numbers through pinned memory, one step late.
2. The transfers are read: the run's store has a row per step with the loss and gradient norm.
3. fp16 autocast with a GradScaler on the GPU: a healthy run stays clean (skipped steps are
   counted, not reported) and an overflow in a layer is found and named.
4. The overhead there: watched / plain step time, interleaved.

    python benchmarks/cuda_check.py

Prints one line per check and exits non-zero if one fails. Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import floatscope


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 1024),
                               torch.nn.GELU(), torch.nn.Linear(1024, 10)).cuda()


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator(device="cuda").manual_seed(1)
    return [(torch.randn(512, 256, device="cuda", generator=g), torch.randint(0, 10, (512,), device="cuda",
                                                                             generator=g)) for _ in range(n)]


def check_no_sync(folder: Path) -> str:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    batches = _batches(8)
    store = folder / "sync.sqlite"
    with floatscope.watch(model, opt, store=store) as w:
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(60):
                x, y = batches[i % 8]
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    runs = floatscope.RunStore(store)
    steps = runs.steps(w.run_id)
    runs.close()
    assert w.result.status == "clean", w.result
    assert len(steps) == 60 and all(s.loss is not None and s.grad_norm for s in steps), steps[-3:]
    return f"no sync: 60 steps under sync_debug_mode('error'), {w._channel.transfers} transfers, 60 rows stored"


def check_fp16_autocast() -> str:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**30)  # too high at first: steps are skipped
    with floatscope.watch(model, opt, scaler=scaler, store=None) as w:
        for x, y in _batches(40):
            with torch.autocast("cuda", dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    assert w.result.status == "clean" and w.result.skipped_steps > 0, w.result
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cuda")
    with floatscope.watch(model, opt, scaler=scaler, store=None, on_anomaly="record") as w2:
        for i, (x, y) in enumerate(_batches(6)):
            if i == 3:
                with torch.no_grad():
                    model[2].weight.mul_(1e4)  # fp16 activations of layer 2 overflow
            with torch.autocast("cuda", dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    incident = w2.incident
    assert incident is not None and incident.step == 3 and incident.phase == "forward", incident
    assert incident.category == "overflow" and incident.output is not None and incident.output.dtype == "float16"
    return (f"fp16 autocast: healthy run clean with {w.result.skipped_steps} skipped steps; overflow found: "
            f"{incident.op} in module '{incident.module}' at step {incident.step} (exact={incident.exact})")


def check_overhead() -> str:
    plain_model, watched_model = _model(), _model()
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-3, fused=True)
    opt = torch.optim.AdamW(watched_model.parameters(), lr=1e-3, fused=True)
    batches = _batches(8)

    def step(model: torch.nn.Module, o: torch.optim.Optimizer, i: int) -> float:
        x, y = batches[i % 8]
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        o.zero_grad(set_to_none=True)
        loss.backward()
        o.step()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    plain, watched = [], []
    with floatscope.watch(watched_model, opt, store=None):
        for i in range(5):
            step(watched_model, opt, i)
        stack = torch.overrides._get_current_function_mode_stack()
        mode = stack[-1]
        for i in range(100):
            torch.overrides._pop_mode()
            try:
                plain.append(step(plain_model, plain_opt, i))
            finally:
                torch.overrides._push_mode(mode)
            watched.append(step(watched_model, opt, i))
    ratio = statistics.fmean(watched) / statistics.fmean(plain)
    return f"overhead: {statistics.fmean(plain) * 1e3:.2f} ms plain, watched {ratio:.3f}x (synchronised steps)"


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here")
        return 0
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    failed = 0
    with tempfile.TemporaryDirectory() as folder:
        for check in (lambda: check_no_sync(Path(folder)), check_fp16_autocast, check_overhead):
            try:
                print("ok  ", check())
            except Exception as exc:  # noqa: BLE001 - report every check
                failed += 1
                print("FAIL", f"{type(exc).__name__}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
