"""PyTorch against ONNX Runtime module by module, fp16 deployment, the overfit quiz, determinism."""

from __future__ import annotations

import json
import math
import random
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxconverter_common")

import floatscope.compare as compare  # noqa: E402
from floatscope._cli.main import main as cli_main  # noqa: E402
from floatscope._numerics import budget  # noqa: E402
from floatscope._numerics.formats import format_of  # noqa: E402

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
    assert not big.passed and big.nonfinite > 0 and big.verdict == "nonfinite"
    assert all(m.passed for m in fp16.modules if m.name == "embed")
    assert fp16.first_nonfinite.module == "big" and fp16.first_nonfinite.op == "Gemm"
    assert fp16.first_nonfinite.headroom_bits < 0


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
    assert set(data["modules"][0]) >= {"name", "max_abs", "max_rel", "max_ulp", "passed", "rel_error",
                                       "explained_rel_error", "ulp_error", "explained_ulp_error", "absmax",
                                       "headroom_bits", "verdict"}
    assert {m["verdict"] for m in data["modules"]} <= {"agrees", "explained"}
    assert set(data["required_tolerance"]) == {"atol", "rtol"}
    assert set(data["output"]) >= {"max_abs", "max_rel", "top1_flip_rate", "rel_error", "explained_rel_error",
                                   "nonfinite", "top1_agreement", "flipped", "predictions"}
    assert data["output"]["top1_agreement"] == 1.0 and data["output"]["flipped"] == 0
    assert data["budget"] == {"reference": "float64", "emulation": "rounded", "slack": 8.0,
                              "floor_rel": 2.0**-11, "floor_ulp": 1.0}
    assert data["first_divergent"] is None and data["first_nonfinite"] is None
    assert 0 < data["required_slack"] < 8
    assert data["unexposed_output"]["flipped"] == 0
    assert data["fusion_effect_rel"] is not None and data["exposure_effect_rel"] is not None
    page = (tmp_path / "c.html").read_text()
    assert page.count("Plotly.newPlot") == 1
    text = re.sub(r"<script.*?</script>", "", page, flags=re.DOTALL)  # what the reader sees, not plotly.js
    assert "{'" not in text and "': " not in text  # no Python dict printed raw
    for words in ("top-1 agreement", "flipped predictions", "normwise output error", "fusion effect",
                  "exposure effect", "No module disagrees beyond what float16 rounding explains"):
        assert words in text
    figure = json.loads(re.search(r'Plotly.newPlot\(\s*"agreement",\s*(\[.*?\]),\s*(\{.*?\}),\s*\{"displaylogo"',
                                  page, flags=re.DOTALL).group(2))
    # abs and rel errors on their own titled axes
    assert figure["yaxis"]["title"]["text"] == "‖y − r‖ / ‖r‖ (relative)"
    assert figure["yaxis2"]["title"]["text"] == "max |y − r| (absolute)"
    assert figure["xaxis2"]["title"]["text"] == "module (execution order)"
    assert figure["yaxis"]["type"] == figure["yaxis2"]["type"] == "log"


def test_missing_onnx_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code = cli_main(["compare", "whatever.py:make"])
    assert code == 2
    assert "pip install 'floatscope[onnx]'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ what the format explains
def test_budget_metrics_against_exact_values():
    fp16 = format_of(torch.float16)
    assert budget.unit_roundoff(fp16) == 2.0**-11
    # Near-zero elements cannot decide: an error of 1 ULP at the tensor's largest value (1.0 -> 2**-10).
    y = torch.tensor([1.0, 2.0**-10, 0.0])
    r = torch.tensor([1.0, 0.0, 1e-9])
    assert budget.scaled_ulp_error(y, r, fp16) == 1.0
    assert budget.normwise_error(y, r) == pytest.approx(math.hypot(2.0**-10, 1e-9), rel=1e-12)
    assert budget.scaled_ulp_error(torch.tensor([math.inf]), torch.tensor([1.0]), fp16) == math.inf
    assert budget.explained_error(1e-4, 2.0**-11, slack=8.0) == 8 * 2.0**-11  # the floor wins
    assert budget.explained_error(math.inf, 2.0**-11, slack=8.0) == 8 * 2.0**-11  # an overflowing emulation explains nothing
    assert budget.explained_error(1e-3, 2.0**-11, slack=4.0) == 4e-3
    assert budget.required_slack(2e-3, 1e-3, 2.0**-11) == 2.0
    x = torch.tensor([1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1e5], dtype=torch.float64)
    assert budget.round_tensor(x, torch.float16).tolist() == [1.0, 1.0 + 2.0**-9, math.inf]  # ties to even, overflow
    assert budget.round_tensor(x, torch.float64) is x


class Gain(torch.nn.Module):
    def __init__(self, gain):
        super().__init__()
        self.gain = gain

    def forward(self, x):
        return x * self.gain


class GainBeforeNorm(torch.nn.Module):
    """A gain stage that multiplies features by 4000 before a LayerNorm: fine in fp32, beyond fp16's range."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
        self.gain = Gain(4000.0)
        self.norm = torch.nn.LayerNorm(64)
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.norm(self.gain(self.features(x))))


def _gain_model():
    torch.manual_seed(0)
    return GainBeforeNorm(), torch.randn(256, 16) * 20


def test_fp16_overflow_is_the_first_finding_not_rounding():
    model, x = _gain_model()
    result = compare.onnxruntime(model, (x,), dtype="float16")
    by = {m.name: m for m in result.modules}
    # The Linear layers fail the fixed fp16 tolerance, but fp16 rounding explains them.
    assert not by["features.2"].passed and by["features.2"].verdict == "explained"
    assert all(by[n].verdict in ("agrees", "explained") for n in ("features.0", "features.1", "features"))
    assert by["features.2"].rel_error < 1e-3 < by["features.2"].max_rel
    # The overflow comes first, named at its op, with the value that did not fit.
    assert result.first_divergent == "gain" and by["gain"].verdict == "nonfinite"
    origin = result.first_nonfinite
    assert (origin.module, origin.type, origin.node, origin.op) == ("gain", "Gain", "/gain/Mul", "Mul")
    with torch.no_grad():
        exact = float((model.double().features(x.double()) * 4000.0).abs().max())  # float64 oracle
    model.float()
    assert origin.absmax == pytest.approx(exact, rel=1e-5) and origin.absmax > 65504
    assert origin.headroom_bits == pytest.approx(math.log2(65504 / exact), abs=1e-4) and origin.headroom_bits < 0
    assert origin.inf > 0 and origin.nan == 0
    assert by["gain"].headroom_bits == pytest.approx(origin.headroom_bits, abs=1e-4)
    findings = result.findings()
    assert findings[0].startswith("non-finite first: module 'gain' (Gain), ONNX node /gain/Mul (Mul)")
    assert "headroom -0.53 bits" in findings[0]
    # The damage to predictions is reported with the output, non-finite rows counted as flipped.
    assert result.output.nonfinite > 0 and result.output.flipped > 0
    assert result.output.predictions == result.output.samples == 256
    assert result.output.top1_agreement == pytest.approx(1 - result.output.flipped / 256)
    assert result.output.rel_error == math.inf and result.unexposed_output is not None
    # fp32 deployment of the same model: nothing to report.
    fp32 = compare.onnxruntime(model, (x,), dtype="float32")
    assert fp32.first_divergent is None and fp32.first_nonfinite is None
    assert {m.verdict for m in fp32.modules} == {"agrees"} and fp32.budget.emulation == "pytorch"


class ConvAttention(torch.nn.Module):
    def __init__(self, channels=32):
        super().__init__()
        self.conv = torch.nn.Conv1d(8, channels, 3, padding=1)
        self.act = torch.nn.GELU()
        self.attn = torch.nn.TransformerEncoderLayer(channels, 4, 64, dropout=0.1, batch_first=True)
        self.head = torch.nn.Linear(channels, 10)

    def forward(self, x):  # (B, 8, T)
        h = self.act(self.conv(x)).transpose(1, 2)  # (B, T, C)
        return self.head(self.attn(h).mean(1))  # (B, 10)


def test_healthy_conv_attention_block_in_fp16_is_explained_by_rounding():
    torch.manual_seed(0)
    result = compare.onnxruntime(ConvAttention(), (torch.randn(64, 8, 12),), dtype="float16")
    assert result.first_divergent is None and result.first_nonfinite is None and result.findings() == []
    assert {m.verdict for m in result.modules} == {"agrees", "explained"}
    assert any(not m.passed for m in result.modules)  # the fixed tolerance fails somewhere: rounding explains it
    assert max(m.max_rel for m in result.modules) > 1  # elementwise relative errors near zeros do not decide
    assert all(m.rel_error < 2e-3 for m in result.modules)  # normwise: about fp16's unit roundoff 4.9e-4
    assert result.output.top1_flip_rate == 0.0 and result.output.flipped == 0 and result.output.top1_agreement == 1.0
    assert result.output.rel_error < 1e-3 < result.output.explained_rel_error
    assert 0.5 < result.required_slack < result.budget.slack


class _GeluExportedApproximately(torch.autograd.Function):
    """A custom op whose export differs from eager: exact GELU in PyTorch, x * sigmoid(1.702 x) in ONNX."""

    @staticmethod
    def forward(ctx, x):
        return torch.nn.functional.gelu(x)

    @staticmethod
    def symbolic(g, x):
        k = g.op("Constant", value_t=torch.tensor(1.702))
        return g.op("Mul", x, g.op("Sigmoid", g.op("Mul", x, k)))


class FastGELU(torch.nn.Module):
    def forward(self, x):
        return _GeluExportedApproximately.apply(x)


class ExportBug(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(16, 64)
        self.norm = torch.nn.LayerNorm(64)
        self.act = FastGELU()
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.act(self.norm(self.embed(x))))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_deployment_bug_that_rounding_does_not_explain_is_first_divergent(dtype):
    torch.manual_seed(0)
    model, x = ExportBug(), torch.randn(128, 16) * 8
    result = compare.onnxruntime(model, (x,), dtype=dtype)
    by = {m.name: m for m in result.modules}
    assert result.first_divergent == "act" and by["act"].verdict == "divergent"
    assert by["embed"].verdict in ("agrees", "explained") and by["norm"].verdict in ("agrees", "explained")
    if dtype == "float16":
        assert not by["embed"].passed  # a fixed tolerance would have blamed the first Linear
    with torch.no_grad():  # float64 oracle of what the exported approximation changes
        h = model.double().norm(model.embed(x.double()))
        exact = torch.nn.functional.gelu(h)
        oracle = float((h * torch.sigmoid(1.702 * h) - exact).norm() / exact.norm())
    model.float()
    assert by["act"].rel_error == pytest.approx(oracle, rel=0.05)
    assert by["act"].rel_error > 2 * by["act"].explained_rel_error
    assert result.findings()[0].startswith("first divergent module: act (FastGELU): normwise error")
    assert result.output.rel_error > result.output.explained_rel_error


def test_compare_leaves_the_model_and_torch_as_they_were():
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    model, x = _gain_model()
    model.train()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    compare.onnxruntime(model, (x,), dtype="float16")
    assert model.training and _get_current_dispatch_mode() is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    after = model.state_dict()
    assert all(after[n].dtype == t.dtype and torch.equal(after[n], t) for n, t in before.items())


class Float32Only(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.register_buffer("mix", torch.eye(8))

    def forward(self, x):
        return self.proj(x) @ self.mix.to(torch.float32)  # fails in float64: float32 is written into the model


def _no_trace_left(model):
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is None and all(
        not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_model_that_cannot_run_in_float64_falls_back_to_a_float32_reference():
    torch.manual_seed(0)
    model = Float32Only()
    with pytest.warns(UserWarning, match="did not run in float64"):
        result = compare.onnxruntime(model, (torch.randn(4, 8),), dtype="float16")
    assert result.budget.reference == "float32" and result.budget.emulation == "rounded"
    assert result.first_divergent is None and _no_trace_left(model)


def test_an_emulation_that_fails_falls_back_to_one_rounding(monkeypatch):
    from floatscope._engines import compare as engine

    def refuse(self, func, types, args=(), kwargs=None):
        raise RuntimeError("this op refuses the rounding mode")

    monkeypatch.setattr(engine._RoundEveryOp, "__torch_dispatch__", refuse)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    with pytest.warns(UserWarning, match="float16 emulation of the model failed"):
        result = compare.onnxruntime(model, (torch.randn(16, 8),), dtype="float16")
    assert result.budget.emulation == "none" and _no_trace_left(model)
    assert all(m.explained_rel_error == 8 * 2.0**-11 for m in result.modules)  # the floor, times the slack
    assert result.first_divergent is None


def test_compare_cli_text_and_json_for_the_overflow(tmp_path, capsys):
    target = tmp_path / "gain.py"
    target.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        from test_compare import _gain_model
        def make():
            model, x = _gain_model()
            return model, (x,)
    """))
    code = cli_main(["compare", f"{target}:make", "--dtype", "float16", "--json", str(tmp_path / "g.json")])
    assert code == 0
    out = capsys.readouterr().out
    assert "FIRST NON-FINITE" in out and "float16 rounding" in out
    assert "non-finite first: module 'gain' (Gain), ONNX node /gain/Mul (Mul)" in out
    assert "top-1 agreement" in out and "fusion effect" in out and "exposure effect" in out
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["first_divergent"] == "gain"
    origin = data["first_nonfinite"]
    assert origin["module"] == "gain" and origin["op"] == "Mul" and origin["headroom_bits"] < 0
    assert origin["absmax_source"] == "onnx-float32" and origin["format_max"] == 65504.0
    assert data["output"]["rel_error"] is None  # inf in strict JSON
    assert cli_main(["compare", f"{target}:make", "--slack", "0.5"]) == 2


# --------------------------------------------------------------------------- overflow inside the emulation
class HandNorm(torch.nn.Module):
    def forward(self, h):
        return 8 * h / torch.sqrt((h * h).sum(-1, keepdim=True))  # h * h overflows float16 for |h| > 256


class ClampWhenExported(torch.nn.Module):
    def forward(self, x):
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return torch.clamp(x, -1, 1)  # the graph takes another branch than eager: a real deployment bug
        return torch.tanh(x)


class NormThenBug(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 10)
        self.norm, self.act = HandNorm(), ClampWhenExported()

    def forward(self, x):
        h = self.fc2(torch.relu(self.fc1(x))) * 3000.0
        return self.head(self.act(self.norm(h)))


def test_an_overflow_in_the_emulation_is_a_finding_and_does_not_excuse_a_later_bug():
    torch.manual_seed(0)
    model, x = NormThenBug().eval(), torch.randn(32, 64)
    result = compare.onnxruntime(model, (x,), dtype="float16")
    emu = result.emulation_overflow
    assert emu is not None and emu.module == "norm" and emu.op.startswith("aten.mul")
    with torch.no_grad():
        h = model.fc2(torch.relu(model.fc1(x.double().float()))).double() * 3000.0
    assert emu.absmax == pytest.approx(float((h * h).max()), rel=2e-3) and emu.headroom_bits < 0
    # The emulation's h / sqrt(inf) = 0 must not become a budget of 8: the clamp-for-tanh bug is still named.
    by = {m.name: m for m in result.modules}
    assert result.first_divergent == "act" and by["act"].verdict == "divergent"
    assert by["act"].explained_rel_error == pytest.approx(8 * 2.0 ** -11)
    assert any(f.startswith("float16 overflow in a correct computation: in module 'norm'") for f in result.findings())
    assert result.to_dict()["emulation_overflow"]["module"] == "norm"


class NaiveLogSumExp(torch.nn.Module):
    def forward(self, x):
        return torch.log(torch.exp(x).sum(-1, keepdim=True))


class Energy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.energy, self.head = torch.nn.Linear(16, 32), NaiveLogSumExp(), torch.nn.Linear(1, 3)

    def forward(self, x):
        return self.head(self.energy(self.fc(x) * 4))


def test_an_overflow_inside_a_module_that_the_runtime_hides_is_still_reported():
    torch.manual_seed(0)
    result = compare.onnxruntime(Energy().eval(), (torch.randn(64, 16) * 3,), dtype="float16")
    emu = result.emulation_overflow
    assert emu is not None and (emu.module, emu.op) == ("energy", "aten.exp.default") and emu.absmax > 65504
    assert "overflow in a correct computation: in module 'energy'" in " ".join(result.findings())
