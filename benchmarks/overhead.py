"""Overhead of watching, measured side by side in one run: watched step time / plain step time.

For each model a plain copy and a watched copy train interleaved, one step each in turn, so the
machine's noise hits both alike. The watch is entered once for the whole run (at least 100 steps)
with its defaults: a run store, per-step fingerprints and health sampling every 50 steps. The plain
copy's steps run with the watch's function mode taken off the stack, so they run as they would
without floatscope (the watch hooks only the watched copy's model and optimizer).

Models:

* ``gpt-10M``: a GPT-style decoder, 5 layers, d_model 384, vocab 2048, batch 8 x 128 (~10.5M parameters);
* ``gpt-small``: 4 layers, d_model 256, batch 8 x 64;
* ``mlp-48``: 48 blocks of Linear(64) + LayerNorm + GELU, batch 64, AdamW (a short step: the fixed cost shows);
* ``logreg-raw``: logistic regression written with raw tensors (``torch.sigmoid(x @ W + b)``), SGD.

Also printed: ``floatscope run`` mode (global hooks, every module and optimizer), one health-sampling
step against a plain step, the host reads per step, ``torch.autograd.detect_anomaly`` and transformers'
``DebugUnderflowOverflow`` on the 10M model, and the time a failing step's replay takes.

    python benchmarks/overhead.py [--steps 120] [--big-steps 100] [--models gpt-10M,gpt-small,mlp-48,logreg-raw]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

import floatscope
from floatscope._engines.watch import DEFAULT_HEALTH_EVERY


class GPT(torch.nn.Module):
    """A GPT-style decoder (pre-norm TransformerEncoder layers with a causal mask)."""

    def __init__(self, vocab: int = 2048, dim: int = 384, layers: int = 5, heads: int = 6, seq: int = 128) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Parameter(torch.zeros(seq, dim))
        layer = torch.nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.1, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab)
        self.register_buffer("causal", torch.nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.embed(ids) + self.pos[:t]  # (B, T, D)
        x = self.blocks(x, mask=self.causal[:t, :t], is_causal=True)
        return self.head(self.norm(x))  # (B, T, V)


Transformer = GPT  # with its defaults, the 10.5M-parameter model the precision and compare benchmarks use


def median_forward(model: torch.nn.Module, inputs: tuple[Any, ...], repeats: int = 5) -> float:
    """Median seconds of one no-grad forward pass (after a warm-up pass)."""
    with torch.no_grad():
        model(*inputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(*inputs)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class Setup:
    """A model, its optimizer, a step function and batches; ``make(seed)`` builds a fresh one."""

    name: str
    describe: str
    make: Callable[[], tuple[Any, Any]]
    step: Callable[[Any, Any, Any], None]
    batches: list[Any]


def _gpt_setup(name: str, describe: str, *, dim: int, layers: int, heads: int, seq: int, batch: int) -> Setup:
    def make() -> tuple[Any, Any]:
        torch.manual_seed(0)
        model = GPT(dim=dim, layers=layers, heads=heads, seq=seq)
        return model, torch.optim.AdamW(model.parameters(), lr=3e-4)

    def step(model: Any, opt: Any, ids: torch.Tensor) -> None:
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    g = torch.Generator().manual_seed(1)
    return Setup(name, describe, make, step, [torch.randint(0, 2048, (batch, seq + 1), generator=g) for _ in range(8)])


def _mlp_setup() -> Setup:
    def make() -> tuple[Any, Any]:
        torch.manual_seed(0)
        blocks = [torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.GELU())
                  for _ in range(48)]
        model = torch.nn.Sequential(*blocks, torch.nn.Linear(64, 10))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(model: Any, opt: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(64, 64, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(8)]
    return Setup("mlp-48", "48 x (Linear(64)+LayerNorm+GELU), batch 64, AdamW", make, step, batches)


def _logreg_setup() -> Setup:
    def make() -> tuple[Any, Any]:
        torch.manual_seed(0)
        w = torch.zeros(20, 1, requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        return (w, b), torch.optim.SGD([w, b], lr=0.1)

    def step(params: Any, opt: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        w, b = params
        x, y = batch
        p = torch.sigmoid(x @ w + b)
        loss = -(y * torch.log(p + 1e-7) + (1 - y) * torch.log(1 - p + 1e-7)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(8):
        x = torch.randn(128, 20, generator=g)
        batches.append((x, (x[:, :1] > 0).float()))
    return Setup("logreg-raw", "raw tensors: sigmoid(x @ W + b), SGD, batch 128", make, step, batches)


def _setups() -> dict[str, Setup]:
    return {
        "gpt-10M": _gpt_setup("gpt-10M", "GPT 5 layers d384, batch 8x128, AdamW (10.5M params)", dim=384, layers=5,
                              heads=6, seq=128, batch=8),
        "gpt-small": _gpt_setup("gpt-small", "GPT 4 layers d256, batch 8x64, AdamW", dim=256, layers=4, heads=4,
                                seq=64, batch=8),
        "mlp-48": _mlp_setup(),
        "logreg-raw": _logreg_setup(),
    }


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextlib.contextmanager
def _unwatched() -> Any:
    """Run the plain copy as if no watch were active: floatscope's function mode off the stack."""
    stack = torch.overrides._get_current_function_mode_stack()
    mode = stack[-1] if stack and type(stack[-1]).__module__.startswith("floatscope") else None
    if mode is None:
        yield
        return
    torch.overrides._pop_mode()
    try:
        yield
    finally:
        torch.overrides._push_mode(mode)


def compare_watch(setup: Setup, steps: int, store_dir: str) -> dict[str, float]:
    """Plain and watched copies, interleaved step by step; the watch entered once for the run."""
    plain_model, plain_opt = setup.make()
    model, opt = setup.make()
    models = [m for m in (model if isinstance(model, tuple) else (model,)) if isinstance(m, torch.nn.Module)]
    plain, watched = [], []
    with floatscope.watch(models or None, opt, store=os.path.join(store_dir, f"{setup.name}.sqlite"),
                          run_name=setup.name) as watch:
        for i in range(3):  # warm-up (and the watch's step-0 health sample)
            with _unwatched():
                setup.step(plain_model, plain_opt, setup.batches[i])
            setup.step(model, opt, setup.batches[i])
        for r in range(steps):
            batch = setup.batches[r % len(setup.batches)]
            with _unwatched():
                plain.append(_timed(lambda: setup.step(plain_model, plain_opt, batch)))
            watched.append(_timed(lambda: setup.step(model, opt, batch)))
    transfers = watch._channel.transfers / (steps + 3)
    return {"plain": statistics.fmean(plain), "watch": statistics.fmean(watched),
            "plain_median": statistics.median(plain), "watch_median": statistics.median(watched),
            "transfers": transfers}


def compare_run_mode(setup: Setup, steps: int, block: int = 20) -> tuple[float, float]:
    """``floatscope run`` mode installs global hooks that see every module: plain and watched run in
    alternating blocks, the global watch entered once per block."""
    plain_model, plain_opt = setup.make()
    model, opt = setup.make()
    plain, watched = [], []
    for i in range(2):
        setup.step(plain_model, plain_opt, setup.batches[i])
        setup.step(model, opt, setup.batches[i])
    done = 0
    while done < steps:
        n = min(block, steps - done)
        for r in range(n):
            plain.append(_timed(lambda: setup.step(plain_model, plain_opt, setup.batches[(done + r) % 8])))
        with floatscope.watch(store=None):
            for r in range(n):
                watched.append(_timed(lambda: setup.step(model, opt, setup.batches[(done + r) % 8])))
        done += n
    return statistics.fmean(plain), statistics.fmean(watched)


def compare_health_step(setup: Setup, rounds: int) -> dict[str, float]:
    """One health-sampling step against a plain step (health every 2 steps), and the step after it
    (where the sample's weight norms are read): ratios of means and of medians."""
    plain_model, plain_opt = setup.make()
    model, opt = setup.make()
    plain, sampled, after = [], [], []
    with tempfile.TemporaryDirectory() as folder, \
            floatscope.watch(model if isinstance(model, torch.nn.Module) else None, opt,
                             store=os.path.join(folder, "h.sqlite"), health_every=2):
        for i in range(2):
            with _unwatched():
                setup.step(plain_model, plain_opt, setup.batches[i])
            setup.step(model, opt, setup.batches[i])
        for r in range(2 * rounds):
            batch = setup.batches[r % 8]
            with _unwatched():
                plain.append(_timed(lambda: setup.step(plain_model, plain_opt, batch)))
            (sampled if r % 2 == 0 else after).append(_timed(lambda: setup.step(model, opt, batch)))
    mean, median = statistics.fmean(plain), statistics.median(plain)
    return {"mean": statistics.fmean(sampled) / mean, "median": statistics.median(sampled) / median,
            "after": statistics.median(after) / median}


def compare_tools(setup: Setup, rounds: int) -> dict[str, float]:
    """detect_anomaly and DebugUnderflowOverflow against plain, interleaved."""
    configs: dict[str, tuple[Any, Any, Callable[[], Any]]] = {}
    m, o = setup.make()
    configs["plain"] = (m, o, contextlib.nullcontext)
    m, o = setup.make()
    configs["detect_anomaly"] = (m, o, lambda: torch.autograd.detect_anomaly(check_nan=True))
    try:
        from transformers.debug_utils import DebugUnderflowOverflow

        m, o = setup.make()
        DebugUnderflowOverflow(m)  # registers forward hooks on every module, for good
        configs["DebugUnderflowOverflow"] = (m, o, contextlib.nullcontext)
    except ImportError:
        pass
    times: dict[str, list[float]] = {k: [] for k in configs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # detect_anomaly warns on every entry
        for name, (m, o, ctx) in configs.items():
            with ctx():
                setup.step(m, o, setup.batches[0])
        for r in range(rounds):
            for name, (m, o, ctx) in configs.items():
                with ctx():
                    times[name].append(_timed(lambda: setup.step(m, o, setup.batches[r % 8])))
    return {k: statistics.fmean(v) for k, v in times.items()}


def replay_cost(setup: Setup) -> tuple[str, float, float]:
    model, opt = setup.make()
    plain = statistics.fmean(_timed(lambda: setup.step(model, opt, setup.batches[i])) for i in range(3))
    with floatscope.watch(model, opt, store=None, on_anomaly="record") as w:
        setup.step(model, opt, setup.batches[0])
        with torch.no_grad():
            model.head.weight.mul_(1e37)  # the logits overflow float32 in the next step
        setup.step(model, opt, setup.batches[1])
    incident = w.incident
    assert incident is not None and incident.replay_seconds is not None
    module = f"module '{incident.module}'" if incident.module is not None else "the loss code"
    where = f"{incident.op} in {module} ({incident.phase}, step {incident.step})"
    return where, incident.replay_seconds, incident.replay_seconds / plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="watched steps per small model (interleaved)")
    parser.add_argument("--big-steps", type=int, default=100, help="watched steps for gpt-10M")
    parser.add_argument("--models", default="gpt-10M,gpt-small,mlp-48,logreg-raw")
    parser.add_argument("--no-tools", action="store_true", help="skip detect_anomaly / DebugUnderflowOverflow")
    args = parser.parse_args()
    setups = _setups()
    chosen = [setups[n] for n in args.models.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; watch defaults: store, fingerprints, "
          f"health every {DEFAULT_HEALTH_EVERY}; means over interleaved steps\n")
    header = f"{'model':<12}{'plain':>11}{'watch':>11}{'ratio':>8}{'median ratio':>14}{'reads/step':>12}  setup"
    print(header)
    results = {}
    with tempfile.TemporaryDirectory() as store_dir:
        for setup in chosen:
            steps = args.big_steps if setup.name == "gpt-10M" else args.steps
            r = compare_watch(setup, steps, store_dir)
            results[setup.name] = r
            unit, scale = ("us", 1e6) if r["plain"] < 1e-3 * 5 else ("ms", 1e3)
            print(f"{setup.name:<12}{r['plain'] * scale:>8.2f} {unit}{r['watch'] * scale:>8.2f} {unit}"
                  f"{r['watch'] / r['plain']:>7.3f}x{r['watch_median'] / r['plain_median']:>13.3f}x"
                  f"{r['transfers']:>12.2f}  {setup.describe}")
    raw = results.get("logreg-raw")
    if raw:
        print(f"\nlogreg-raw: the watch adds {(raw['watch'] - raw['plain']) * 1e6:.0f} us per step "
              f"({raw['plain'] * 1e6:.0f} us plain)")
    print("\nfloatscope run mode (global hooks on every module and optimizer), alternating blocks:")
    for setup in chosen:
        if setup.name == "gpt-10M":
            continue
        plain, watched = compare_run_mode(setup, max(40, args.steps // 2))
        print(f"  {setup.name:<12} {watched / plain:.3f}x")
    print("\none health-sampling step / one plain step (ratio of means, of medians; the step after it, medians):")
    for setup in chosen:
        rounds = 6 if setup.name == "gpt-10M" else 40
        h = compare_health_step(setup, rounds)
        print(f"  {setup.name:<12} {h['mean']:.2f}x  {h['median']:.2f}x  after: {h['after']:.2f}x")
    if not args.no_tools and "gpt-10M" in args.models:
        tools = compare_tools(setups["gpt-10M"], 12)
        print("\nother tools on gpt-10M (interleaved):")
        for name, t in tools.items():
            if name != "plain":
                print(f"  {name:<24} {t / tools['plain']:.3f}x")
    if "gpt-10M" in args.models:
        where, seconds, ratio = replay_cost(setups["gpt-10M"])
        print(f"\nlocalisation on gpt-10M: {where} found by replay in {seconds:.2f} s = {ratio:.1f}x one plain step")


if __name__ == "__main__":
    main()
