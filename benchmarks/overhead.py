"""Overhead of watching: median step time of a ~10M-parameter transformer, side by side.

Prints, from one run, the median step time and its ratio to plain training for:

* plain training;
* ``floatscope.watch`` in its default mode;
* ``torch.autograd.detect_anomaly``;
* transformers' ``DebugUnderflowOverflow`` (when transformers is installed);

then how long localisation (the replay of a failing step) takes, relative to one plain step.

Configurations run interleaved, one step each in turn, so machine noise hits them alike.

    python benchmarks/overhead.py [--rounds 16]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import warnings
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

import floatscope
from floatscope._engines.watch import DEFAULT_HEALTH_EVERY


class Transformer(torch.nn.Module):
    """A GPT-style decoder: 5 layers, d_model 384, vocab 2048 (~10.4M parameters)."""

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


def make(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Transformer()
    return model, torch.optim.AdamW(model.parameters(), lr=3e-4)


def median_forward(model: torch.nn.Module, inputs: tuple[Any, ...], repeats: int = 5) -> float:
    """Median seconds of one no-grad forward pass (after a warm-up pass)."""
    samples = []
    with torch.no_grad():
        model(*inputs)
        for _ in range(repeats):
            start = time.perf_counter()
            model(*inputs)
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=16, help="timed steps per configuration, interleaved")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    base_model, base_opt = make()
    n_params = sum(p.numel() for p in base_model.parameters())
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 2048, (args.batch, 129), generator=g) for _ in range(8)]

    store_dir = tempfile.mkdtemp()
    watch_default = None  # one long-lived watch per configuration, so step counts (and sampling) are real
    configs: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer, Callable[[], Any]]] = {}
    configs["plain"] = (base_model, base_opt, contextlib.nullcontext)
    m, o = make()
    watch_default = floatscope.watch(m, o, store=os.path.join(store_dir, "a.sqlite"))
    configs[f"watch (store, health every {DEFAULT_HEALTH_EVERY})"] = (m, o, contextlib.nullcontext)
    m2, o2 = make()
    watch_nostore = floatscope.watch(m2, o2, store=None)
    configs["watch (store=None)"] = (m2, o2, contextlib.nullcontext)
    m3, o3 = make()
    # What `floatscope run` installs: global module/optimizer hooks that see every model (entered per step,
    # so it watches only its own step of the interleaved round).
    configs["run mode (global hooks, store=None)"] = (m3, o3, lambda: floatscope.watch(store=None))
    m, o = make()
    configs["detect_anomaly"] = (m, o, lambda: torch.autograd.detect_anomaly(check_nan=True))
    try:
        from transformers.debug_utils import DebugUnderflowOverflow

        m, o = make()
        DebugUnderflowOverflow(m)  # registers forward hooks on every module, for good
        configs["DebugUnderflowOverflow"] = (m, o, contextlib.nullcontext)
    except ImportError:
        print("transformers not installed: DebugUnderflowOverflow skipped")

    times: dict[str, list[float]] = {name: [] for name in configs}
    with watch_default, watch_nostore, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # detect_anomaly warns on every entry
        for name, (model, opt, ctx) in configs.items():  # warm-up (and the watch's step-0 health sample)
            with ctx():
                train_step(model, opt, batches[0])
        for r in range(args.rounds):
            ids = batches[r % len(batches)]
            for name, (model, opt, ctx) in configs.items():
                with ctx():
                    start = time.perf_counter()
                    train_step(model, opt, ids)
                    times[name].append(time.perf_counter() - start)

    plain = statistics.median(times["plain"])
    print(f"model: {n_params / 1e6:.1f}M parameters, batch {args.batch} x 128 tokens, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'configuration':<34}{'median step':>14}{'ratio to plain':>16}")
    for name, samples in times.items():
        med = statistics.median(samples)
        print(f"{name:<34}{med * 1e3:>11.1f} ms{med / plain:>15.3f}x")

    # A health-sampling step costs more; amortised over DEFAULT_HEALTH_EVERY steps it must stay in budget.
    m, o = make()
    sample_times, normal_times = [], []
    with floatscope.watch(m, o, store=os.path.join(store_dir, "b.sqlite"), health_every=2):
        train_step(m, o, batches[0])
        train_step(m, o, batches[1])
        for r in range(6):
            start = time.perf_counter()
            train_step(m, o, batches[r % len(batches)])
            (sample_times if r % 2 == 0 else normal_times).append(time.perf_counter() - start)
    sample, normal = statistics.median(sample_times), statistics.median(normal_times)
    watched = statistics.median(times[f"watch (store, health every {DEFAULT_HEALTH_EVERY})"])
    amortised = (watched * (DEFAULT_HEALTH_EVERY - 1) + watched * sample / normal) / DEFAULT_HEALTH_EVERY
    print(f"health-sampling step: {sample / normal:.2f}x a watched step; amortised over every "
          f"{DEFAULT_HEALTH_EVERY} steps the watch costs {amortised / plain:.3f}x plain")

    # Localisation: a step whose loss turns non-finite, found by the watch and replayed op by op.
    model, opt = make()
    with floatscope.watch(model, opt, store=None, on_anomaly="record") as w:
        train_step(model, opt, batches[0])
        with torch.no_grad():
            model.head.weight.mul_(1e37)  # the logits overflow float32 in the next step
        train_step(model, opt, batches[1])
    incident = w.incident
    assert incident is not None and incident.replay_seconds is not None
    print(f"localisation: {incident.op} in module '{incident.module if incident.module is not None else '-'}' ({incident.phase}, step {incident.step}) "
          f"found by replay in {incident.replay_seconds:.2f} s = {incident.replay_seconds / plain:.1f}x one plain step")


if __name__ == "__main__":
    main()
