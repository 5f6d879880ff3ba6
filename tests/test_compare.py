"""PyTorch against ONNX Runtime module by module, fp16 deployment, the overfit quiz, determinism."""

from __future__ import annotations

import json
import random
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxconverter_common")

import floatscope.compare as compare  # noqa: E402
from floatscope._cli.main import main as cli_main  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "src" / "floatscope" / "examples"


class TransformerBlock(torch.nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(dim, 4, batch_first=True)
        self.norm1 = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.GELU(), torch.nn.Linear(64, dim))
        self.norm2 = torch.nn.LayerNorm(dim)
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, x):
        x = self.norm1(x + self.drop(self.attn(x, x, x, need_weights=False)[0]))
        return self.norm2(x + self.mlp(x))


@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer"])
def test_healthy_fp32_models_agree_module_by_module(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        model, x = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)), torch.randn(8, 16)
    elif kind == "cnn":
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                    torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 5))
        x = torch.randn(4, 3, 16, 16)
    else:
        model, x = TransformerBlock(), torch.randn(2, 6, 32)
    result = compare.onnxruntime(model, (x,))
    assert result.first_divergent is None
    assert all(m.passed for m in result.modules)
    assert result.matched_leaf_fraction >= 0.9
    assert result.output.max_abs < 1e-4 and result.output.top1_flip_rate == 0.0
    assert result.required_tolerance["atol"] < 1e-4


class Overflowing(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(8, 16)
        self.big = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 3)
        with torch.no_grad():
            self.big.weight.mul_(2e5)  # activations near 1e5: beyond fp16 max 65504

    def forward(self, x):
        return self.head(self.norm(self.big(torch.relu(self.embed(x)))))


def test_fp16_deployment_names_the_layer_that_leaves_fp16_range():
    torch.manual_seed(0)
    model, x = Overflowing(), torch.randn(8, 8)
    fp32 = compare.onnxruntime(model, (x,), dtype="float32")
    assert fp32.first_divergent is None  # fine in fp32
    fp16 = compare.onnxruntime(model, (x,), dtype="float16")
    assert fp16.first_divergent == "big"
    big = next(m for m in fp16.modules if m.name == "big")
    assert not big.passed and big.nonfinite > 0
    assert all(m.passed for m in fp16.modules if m.name == "embed")


def test_overfit_versus_normal_fp16_robustness():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import deployment_fragility
    finally:
        sys.path.pop(0)
    r = deployment_fragility.measure(perturb=8)
    overfit, normal = r["overfit"], r["normal"]
    # What we found: fp16 deployment moves the overfit model's logits more and its test-set margins are
    # smaller, so it flips at least as often; but flips are rare for both (well under 1%).
    assert overfit["max_logit_change"] > normal["max_logit_change"]
    assert overfit["median_margin"] < normal["median_margin"]
    assert overfit["top1_flip_rate"] >= normal["top1_flip_rate"]
    assert overfit["top1_flip_rate"] < 0.01


class ScatterSum(torch.nn.Module):
    """Sums rows into buckets in an order no seed controls: made non-deterministic on purpose."""

    def forward(self, x):
        rows = x.shape[0]
        order = random.SystemRandom().sample(range(rows), rows)
        index = torch.tensor([order.index(i) % 2 for i in range(rows)])
        src = x * torch.tensor([1e7, 1.0, -1e7, 3.0]).repeat(x.shape[1] // 4)
        return torch.zeros(2, x.shape[1]).index_add_(0, index, src)


class RacyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 16)
        self.scatter = ScatterSum()

    def forward(self, x):
        return self.scatter(self.proj(x))


def test_determinism_catches_the_nondeterministic_op():
    torch.manual_seed(0)
    result = compare.determinism(RacyModel(), (torch.randn(64, 8),))
    repeat = result.settings[0]
    assert repeat.setting == "repeat" and not repeat.identical
    assert repeat.first_op == "aten.index_add_.default" and repeat.module == "scatter"
    assert repeat.on_nondeterministic_list and repeat.fixed_by_seed_everything is False
    assert repeat.max_ulp > 0


def test_determinism_of_a_plain_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    result = compare.determinism(model, (torch.randn(256, 64),), backward=True)
    assert result.settings[0].identical  # the same run twice is bitwise identical on CPU
    for setting in result.settings[1:]:
        assert setting.identical or (setting.max_ulp is not None and setting.max_ulp < 1e4)


def test_compare_cli_json_contract_and_report(tmp_path):
    target = tmp_path / "m.py"
    target.write_text(textwrap.dedent("""
        import torch
        def make():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)), (torch.randn(4, 8),)
    """))
    code = cli_main(["compare", f"{target}:make", "--dtype", "float16", "--json", str(tmp_path / "c.json"),
                     "--report", str(tmp_path / "c.html")])
    assert code == 0
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["runtime"] == "onnxruntime" and data["dtype"] == "float16" and data["opt_level"] == "basic"
    assert data["matched_modules"] == data["total_modules"] == 3
    assert set(data["modules"][0]) >= {"name", "max_abs", "max_rel", "max_ulp", "passed"}
    assert set(data["required_tolerance"]) == {"atol", "rtol"}
    assert set(data["output"]) >= {"max_abs", "max_rel", "top1_flip_rate"}
    assert (tmp_path / "c.html").read_text().count("Plotly.newPlot") == 1


def test_missing_onnx_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code = cli_main(["compare", "whatever.py:make"])
    assert code == 2
    assert "pip install 'floatscope[onnx]'" in capsys.readouterr().err
