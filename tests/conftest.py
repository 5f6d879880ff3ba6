"""Shared helpers: where a marked line is, and what global PyTorch state must be left untouched."""

from __future__ import annotations

import inspect
import signal
from pathlib import Path
from typing import Any

import pytest
import torch


def line_of(marker: str, path: str | Path | None = None) -> tuple[str, int]:
    """(absolute file, line number) of the line containing ``marker`` in ``path`` (default: caller)."""
    if path is None:
        path = inspect.stack()[1].filename
    path = Path(path).resolve()
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if marker in text:
            return str(path), number
    raise AssertionError(f"marker {marker!r} not in {path}")


def torch_global_state() -> dict[str, Any]:
    """Everything an instrument could leave behind: hooks, modes, flags, patched methods."""
    from torch.amp.grad_scaler import GradScaler
    from torch.nn.modules import module as nn_module
    from torch.optim import optimizer as optim_module

    return {
        "forward_pre": dict(nn_module._global_forward_pre_hooks),
        "forward": dict(nn_module._global_forward_hooks),
        "backward": dict(nn_module._global_backward_hooks),
        "backward_pre": dict(nn_module._global_backward_pre_hooks),
        "opt_pre": dict(optim_module._global_optimizer_pre_hooks),
        "opt_post": dict(optim_module._global_optimizer_post_hooks),
        "function_modes": len(torch.overrides._get_current_function_mode_stack()),
        "dispatch_modes": torch._C._len_torch_dispatch_stack(),
        "anomaly": torch.is_anomaly_enabled(),
        "grad_enabled": torch.is_grad_enabled(),
        "scaler_step": GradScaler.step,
        "scaler_update": GradScaler.update,
        "scaler_scale": GradScaler.scale,
        "autocast_cpu": torch.is_autocast_enabled("cpu"),
        "module_forwards": {c: c.__dict__.get("forward") for c in vars(torch.nn).values()
                            if isinstance(c, type) and issubclass(c, torch.nn.Module)},
        # a handler left behind (or SIGINT left ignored) changes every process the suite starts later
        "signals": {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)},
    }


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "runs.sqlite"


@pytest.fixture(autouse=True)
def _no_leaks() -> Any:
    """Every test must leave PyTorch's global state exactly as it found it."""
    before = torch_global_state()
    yield
    assert torch_global_state() == before


def render_in_browser(page: Path) -> list[int]:
    """Load a report in headless Chromium; return the number of data points each plot rendered.

    Fails on any console error or page error; skips when Chromium or Playwright is missing.
    """
    import re
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    sync_api = pytest.importorskip("playwright.sync_api")
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    html = page.read_text()
    assert not re.search(r"<script[^>]+src=[\"']https?:", html), "the page must not load scripts from a CDN"
    expected = html.count("Plotly.newPlot")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=browser, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"])
        try:
            tab = b.new_page()
            errors: list[str] = []
            tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.goto(page.as_uri())
            tab.wait_for_function(f"document.querySelectorAll('.js-plotly-plot').length === {expected}")
            counts = tab.evaluate("""() => [...document.querySelectorAll('.js-plotly-plot')].map(d => d.data.reduce(
                (n, t) => n + ((t.z || t.y || []).flat().filter(v => v !== null && v !== undefined).length), 0))""")
        finally:
            b.close()
    assert errors == [], errors
    return counts
