"""floatscope precision / formats on the command line, the HTML report, and the bundled LSTM example."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import render_in_browser

CLI = [sys.executable, "-m", "floatscope"]
EXAMPLE = Path(__file__).resolve().parent.parent / "src" / "floatscope" / "examples" / "lstm_accumulation.py"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture
def target(tmp_path: Path) -> Path:
    path = tmp_path / "model.py"
    path.write_text(textwrap.dedent("""
        import torch

        class NaiveSoftmax(torch.nn.Module):
            def forward(self, x):
                e = torch.exp(x)
                return e / e.sum(-1, keepdim=True)

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = torch.nn.Linear(8, 32)
                self.attn = NaiveSoftmax()
                self.head = torch.nn.Linear(32, 2)
                with torch.no_grad():
                    self.proj.weight.mul_(12.0)

            def forward(self, x):
                return self.head(self.attn(self.proj(x)))

        def make():
            torch.manual_seed(0)
            return Model(), (torch.randn(16, 8),)

        def broken():
            return 42
    """))
    return path


def test_precision_cli_writes_the_json_contract(tmp_path, target):
    proc = cli("precision", f"{target}:make", "--json", "p.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["dtype"] == "float16" and data["mode"] == "cast"
    assert data["output_error"] is None  # overflowed: null, with the count
    assert data["output_nonfinite"] > 0
    assert set(data["modules"][0]) >= {"name", "propagated_error", "local_error", "amplification", "bits_correct",
                                       "max_ulp", "headroom_bits", "subnormal_fraction", "nonfinite"}
    assert data["ranking"][0] == "attn"
    rec = data["recommendation"]
    assert rec["keep_fp32"] == ["attn"] and rec["output_error_after"] <= rec["tolerance"] == 0.01
    assert "accumulation" in data
    assert "attn" in proc.stdout and "keep_in_fp32" in proc.stdout


def test_precision_cli_rejects_bad_targets(tmp_path, target):
    for bad, message in [("model.py", "path/to/file.py:factory"), ("nope.py:make", "does not exist"),
                         (f"{target}:missing", "no callable 'missing'"), (f"{target}:broken", "must return")]:
        proc = cli("precision", bad, cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_target_with_its_own_argparse_sees_its_own_argv(tmp_path):
    # A training script whose argparse runs at import time (parse_args() at module level).
    (tmp_path / "train.py").write_text(textwrap.dedent("""
        import argparse, sys
        import torch
        parser = argparse.ArgumentParser()
        parser.add_argument("--epochs", type=int, default=3)
        args = parser.parse_args()
        ARGV = list(sys.argv)

        def make():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(2, 4),)
    """))
    proc = cli("precision", "train.py:make", "--tolerance", "0.05", "--json", "p.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" not in proc.stderr
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(4)\ndef make():\n    pass\n")
    proc = cli("precision", "exits.py:make", cwd=tmp_path)
    assert proc.returncode == 2 and "exited (status 4)" in proc.stderr and "Traceback" not in proc.stderr


def test_formats_cli(tmp_path):
    proc = cli("formats", cwd=tmp_path)
    assert proc.returncode == 0
    for name in ("float64", "float32", "tf32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2"):
        assert name in proc.stdout
    assert "65504" in proc.stdout.replace(",", "") or "6.55e+04" in proc.stdout
    proc = cli("formats", "--value", "1e5", cwd=tmp_path)
    line = next(l for l in proc.stdout.splitlines() if "│ float16 " in l)
    assert "overflows" in line
    line = next(l for l in proc.stdout.splitlines() if "bfloat16" in l)
    assert "99840.0" in line
    assert cli("formats", "--value", "abc", cwd=tmp_path).returncode == 2
    # Negative values are values, not options; -inf in a format without infinities saturates at -max.
    proc = cli("formats", "--value", "-1e-8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "flushes to 0" in next(l for l in proc.stdout.splitlines() if "│ float16 " in l)
    proc = cli("formats", "--value", "-inf", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = next(l for l in proc.stdout.splitlines() if "float8_e4m3fn" in l)
    assert "-448.0" in line and "saturates at -448" in line


def test_report_is_self_contained_and_renders_in_a_browser(tmp_path, target):
    proc = cli("precision", f"{target}:make", "--report", "report.html", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "report.html").read_text()
    assert not re.search(r"<script[^>]+src=[\"']https?:", page)  # no CDN
    plots = page.count("Plotly.newPlot")
    assert plots == 3  # error per module, local vs amplification, headroom; no recurrence in this model
    points = render_in_browser(tmp_path / "report.html")
    assert all(n > 0 for n in points), points
    # The flagged module is marked, the tolerance and the 1-bit headroom threshold are drawn, axes are titled
    # (plotly's JSON escapes <, > and / as \\u003c, \\u003e and \\u002f).
    assert '"\\u003cb\\u003eattn\\u003c\\u002fb\\u003e \\u2691"' in page
    assert "tolerance 0.01" in page and "1 bit: flagged" in page
    titles = set(re.findall(r'"title":\{"text":"([^"]*)"', page))
    assert {"relative error (log scale)", "module", "bits to the format's max", "local error (log scale)",
            "amplification (error out \\u002f error in)"} <= titles, titles


def test_bundled_lstm_example_measures_the_accumulation_curve():
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import lstm_accumulation
    finally:
        sys.path.pop(0)
    compounding = lstm_accumulation.curves(scale=3.0, steps=60)
    for dtype in ("float32", "bfloat16", "float16"):
        errors = compounding[dtype]
        assert len(errors) == 60 and errors[-1] > 3 * errors[0]  # rounding error compounds over time steps
    assert compounding["bfloat16"][-1] > compounding["float16"][-1] > compounding["float32"][-1]
    contracting = lstm_accumulation.curves(scale=0.01, steps=60)
    assert contracting["bfloat16"][-1] < 2 * contracting["bfloat16"][0]  # small weights forget their errors
