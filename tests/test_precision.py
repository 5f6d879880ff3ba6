"""Precision analysis: injected defects are ranked first and fixed by the recommended policy."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import floatscope.precision as precision
from floatscope import FORMATS, UsageError
from floatscope._numerics.errors import (bits_correct, max_ulp_error, relative_error, round_to_format,
                                         subnormal_fraction, summarize, ulp)


# ----------------------------------------------------------------------------------- metric oracles
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_ulp_matches_nextafter_for_every_dtype(dtype):
    fmt = FORMATS[str(dtype).removeprefix("torch.")]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(200, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-3, 4, (200,), generator=g)).to(dtype)
    x = torch.cat([x, torch.tensor([fmt.smallest_normal, fmt.smallest_subnormal * 3], dtype=torch.float64).to(dtype)])
    x = x[x != 0]
    up = torch.nextafter(x.abs(), torch.tensor(math.inf, dtype=dtype))
    exact = up.to(torch.float64) - x.abs().to(torch.float64)
    assert torch.equal(ulp(x, fmt), exact)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_error_metrics_against_float64_oracles(dtype):
    fmt = FORMATS[str(dtype).removeprefix("torch.")]
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(64, generator=g, dtype=torch.float64)
    low = ref.to(dtype)
    exact = math.sqrt(math.fsum(float(a - b) ** 2 for a, b in zip(low.double(), ref, strict=False))) / math.sqrt(
        math.fsum(float(b) ** 2 for b in ref))
    assert relative_error(low, ref) == pytest.approx(exact, rel=1e-12)
    assert max_ulp_error(low, ref, fmt) <= 0.5 + 1e-12  # round to nearest: at most half an ulp
    assert bits_correct(relative_error(low, ref), fmt) == pytest.approx(-math.log2(exact))
    assert bits_correct(0.0, fmt) == fmt.mantissa_bits + 1 and bits_correct(math.inf, fmt) == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_summarize_against_elementwise_oracles(dtype):
    """The one-pass summary agrees with per-element ULPs (nextafter), fsum norms and counts."""
    fmt = FORMATS[str(dtype).removeprefix("torch.")]
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(300, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-6, 5, (300,), generator=g)
    ref[:5] = 0.0
    ref[5:8] = fmt.smallest_normal * torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)  # subnormal in fmt
    ref[8] = 5e-324  # float64 subnormal
    low = (ref * (1 + 3e-3 * torch.randn(300, generator=g, dtype=torch.float64))).to(dtype)
    s = summarize(low, ref, fmt)
    ulps = []
    for r in ref.tolist():
        a = torch.tensor(abs(r), dtype=dtype)
        # The spacing of fmt at |r| (at the smallest subnormal for 0): nextafter from |r| rounded down in fmt.
        below = a if float(a) <= abs(r) else torch.nextafter(a, torch.tensor(0.0, dtype=dtype))
        ulps.append(float(torch.nextafter(below, torch.tensor(math.inf, dtype=dtype))) - float(below))
    exact_ulp = max(abs(float(y) - r) / u for y, r, u in zip(low.double(), ref.tolist(), ulps, strict=True))
    exact_rel = math.sqrt(math.fsum((float(y) - r) ** 2 for y, r in zip(low.double(), ref.tolist(), strict=True))) / \
        math.sqrt(math.fsum(r * r for r in ref.tolist()))
    assert s.max_ulp == pytest.approx(exact_ulp, rel=1e-12)
    assert s.relative_error == pytest.approx(exact_rel, rel=1e-12)
    assert s.absmax == float(ref.abs().max()) and s.nonfinite == 0
    assert s.subnormal_fraction == pytest.approx(
        sum(0 < abs(r) < fmt.smallest_normal for r in ref.tolist()) / 300)
    bad = low.clone()
    bad[10], bad[11] = math.nan, -math.inf
    assert summarize(bad, ref, fmt)[:3] == (math.inf, math.inf, 2)


def test_relative_error_zero_and_nonfinite_handling():
    zero = torch.zeros(3, dtype=torch.float64)
    assert relative_error(zero, zero) == 0.0
    assert relative_error(torch.tensor([0.0, 3.0, 4.0]), zero) == 5.0  # absolute when the reference is 0
    assert relative_error(torch.tensor([1.0, math.inf, 0.0]), torch.ones(3)) == math.inf


def test_subnormal_fraction_and_rounding():
    fmt = FORMATS["float16"]
    r = torch.tensor([0.0, 1e-6, 1e-5, 1e-3, 1.0], dtype=torch.float64)
    assert subnormal_fraction(r, fmt) == pytest.approx(2 / 5)
    assert round_to_format(65520.0, fmt) == math.inf  # halfway to the next binade rounds up: overflow
    assert round_to_format(65519.0, fmt) == 65504.0
    assert round_to_format(1e-8, fmt) == 0.0
    tf32 = FORMATS["tf32"]
    x = 1 + 2**-11 + 2**-13  # just above the tf32 halfway point
    assert Fraction(round_to_format(x, tf32)) == 1 + Fraction(1, 2**10)
    assert round_to_format(1 + 2**-11, tf32) == 1.0  # exact halfway rounds to even


# ----------------------------------------------------------------------------------- injected defects
class NaiveVariance(torch.nn.Module):
    def forward(self, x):
        return (x * x).mean(-1, keepdim=True) - x.mean(-1, keepdim=True) ** 2  # E[x^2] - E[x]^2


class CancellationModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 64)
        self.var = NaiveVariance()
        self.head = torch.nn.Linear(1, 4)
        with torch.no_grad():
            self.proj.weight.mul_(20.0)
            self.proj.bias.fill_(100.0)  # activations with a large mean

    def forward(self, x):
        return self.head(self.var(self.proj(x)))


class NaiveSoftmax(torch.nn.Module):
    def forward(self, x):
        e = torch.exp(x)  # no max subtraction
        return e / e.sum(-1, keepdim=True)


class ExpModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 32)
        self.attn = NaiveSoftmax()
        self.head = torch.nn.Linear(32, 2)
        with torch.no_grad():
            self.proj.weight.mul_(12.0)

    def forward(self, x):
        return self.head(self.attn(self.proj(x)))


class NaiveMeanPool(torch.nn.Module):
    def forward(self, x):
        return x.sum(dim=1) / x.shape[1]  # the sum exceeds 65504 before the division


class LongSumModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(4, 8)
        self.pool = NaiveMeanPool()
        self.head = torch.nn.Linear(8, 3)
        with torch.no_grad():
            self.embed.bias.fill_(20.0)

    def forward(self, x):
        return self.head(self.pool(self.embed(x)))


class Cell(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.w = torch.nn.Linear(dim, dim)
        self.u = torch.nn.Linear(dim, dim)

    def forward(self, x, h):
        return torch.tanh(self.w(h) + self.u(x))


class Recurrent(torch.nn.Module):
    def __init__(self, dim=16, steps=60):
        super().__init__()
        self.cell = Cell(dim)
        self.steps = steps
        with torch.no_grad():
            self.cell.w.weight.copy_(torch.linalg.qr(torch.randn(dim, dim))[0] * 2.0)  # expanding recurrence

    def forward(self, x):
        h = torch.zeros_like(x)
        outs = []
        for _ in range(self.steps):
            h = self.cell(x, h)
            outs.append(h)
        return torch.stack(outs, dim=1)  # (B, T, D)


def _assert_fixed(result, culprit):
    assert result.ranking[0] == culprit, result.ranking
    rec = result.recommendation
    assert rec.output_error_before > rec.tolerance
    assert culprit in rec.keep_fp32 and rec.tolerance_met and rec.output_error_after <= rec.tolerance
    assert culprit in result.flagged


def test_cancellation_in_a_handwritten_variance():
    torch.manual_seed(0)
    result = precision.analyze(CancellationModel(), (torch.randn(32, 16),), dtype="float16")
    _assert_fixed(result, "var")
    var = result.module("var")
    assert var.amplification is not None and var.amplification > 100  # it amplifies what it receives
    assert var.local_error > 10 * result.module("proj").local_error
    sub = next(o for o in result.ops if o.module == "var" and o.op == "aten.sub.Tensor")
    assert sub.amplification is not None and sub.amplification > 20  # the subtraction cancels


def test_fp16_overflow_in_an_exp():
    torch.manual_seed(0)
    result = precision.analyze(ExpModel(), (torch.randn(16, 8),), dtype="float16")
    assert result.output_nonfinite > 0 and math.isinf(result.output_error)
    _assert_fixed(result, "attn")
    assert result.module("attn").nonfinite > 0
    exp_ops = [o for o in result.ops if o.module == "attn" and o.op == "aten.exp.default"]
    assert exp_ops and exp_ops[0].nonfinite > 0 and exp_ops[0].headroom_bits < 0
    assert result.to_dict()["output_error"] is None  # non-finite error is null in JSON, never a crash


def test_fp16_overflow_in_a_long_sum():
    torch.manual_seed(0)
    result = precision.analyze(LongSumModel(), (torch.randn(2, 4096, 4),), dtype="float16")
    _assert_fixed(result, "pool")
    sums = [o for o in result.ops if o.module == "pool" and o.op == "aten.sum.dim_IntList"]
    assert sums and sums[0].nonfinite > 0


def test_error_compounding_in_a_long_recurrent_loop():
    torch.manual_seed(0)
    result = precision.analyze(Recurrent(), (torch.randn(4, 16),), dtype="bfloat16", mode="autocast",
                               tolerance=1e-2)
    acc = result.accumulation
    assert acc is not None and acc.module == "cell" and len(acc.error) == 60
    assert sum(acc.error[-10:]) > 5 * sum(acc.error[:10])  # the error compounds over time steps
    assert acc.growth_per_step > (1.0 if acc.model == "exponential" else 0.0)
    assert result.ranking[0] in {"cell", "cell.w"}  # the cell, or its recurrent weight
    rec = result.recommendation
    assert rec.tolerance_met and rec.keep_fp32 and all(k.startswith("cell") for k in rec.keep_fp32)


def test_growth_is_described_as_flat_when_the_fit_barely_changes_the_error():
    from floatscope._engines.precision import _fit

    flat = _fit("lstm", [1e-3 * (1 + 0.01 * ((-1) ** t)) for t in range(50)])
    assert flat.describe() == "flat"
    grows = _fit("lstm", [1e-4 * 1.1 ** t for t in range(50)])
    assert grows.model == "exponential" and grows.describe() == "x1.1 per step (exponential)"
    line = _fit("lstm", [1e-4 + 1e-5 * t for t in range(50)])
    assert line.model == "linear" and line.describe() == "+1e-05 per step (linear)"


def test_a_benign_model_flags_nothing():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.GELU(),
                                torch.nn.Linear(32, 4))
    result = precision.analyze(model, (torch.randn(8, 16),), dtype="float16")
    assert result.flagged == []
    assert result.output_error < precision.DEFAULT_TOLERANCE[torch.float16]
    assert result.recommendation.keep_fp32 == [] and result.recommendation.tolerance_met


def test_autocast_mode_aligns_through_inserted_casts():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    result = precision.analyze(model, (torch.randn(8, 16),), dtype="bfloat16", mode="autocast")
    assert result.mode == "autocast"
    linear_ops = [o for o in result.ops if o.module in {"0", "2"} and "addmm" in o.op]
    assert len(linear_ops) == 2 and all(0 < o.propagated_error < 0.05 for o in linear_ops)
    assert {m.name for m in result.modules} >= {"", "0", "1", "2"}


def test_keep_in_fp32_helper_applies_and_removes():
    torch.manual_seed(0)
    model = ExpModel()
    x = torch.randn(16, 8)
    policy = precision.keep_in_fp32(model, ["attn"])
    seen = []
    handle = model.attn.register_forward_hook(lambda m, a, o: seen.append(a[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert repr(policy) == "Float32Policy(['attn'], active)"
    policy.remove()
    handle.remove()
    assert seen == [torch.float32]
    assert not model.attn._forward_pre_hooks
    assert repr(policy) == "Float32Policy(['attn'], removed)"
    policy.remove()  # twice is fine
    # As a context manager: applied inside the block, removed after it, also when the block raises.
    with pytest.raises(RuntimeError, match="boom"):
        with precision.keep_in_fp32(model, ["attn"]) as inside:
            assert isinstance(inside, precision.Float32Policy) and model.attn._forward_pre_hooks
            raise RuntimeError("boom")
    assert not model.attn._forward_pre_hooks and not model.attn._forward_hooks
    with pytest.raises(UsageError, match="no module named 'nope'"):
        precision.keep_in_fp32(model, ["nope"])


def test_bad_arguments():
    with pytest.raises(UsageError, match="unknown dtype"):
        precision.analyze(torch.nn.Linear(2, 2), (torch.randn(1, 2),), dtype="float8")
    with pytest.raises(UsageError, match="mode"):
        precision.analyze(torch.nn.Linear(2, 2), (torch.randn(1, 2),), mode="fast")
    with pytest.raises(UsageError, match="no module named 'nope'"):
        precision.analyze(torch.nn.Linear(2, 2), (torch.randn(1, 2),), sequence_dim=0, sequence_modules=["nope"])


def test_the_analysis_leaves_the_model_untouched():
    model = CancellationModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    precision.analyze(model, (torch.randn(4, 16),), dtype="float16")
    assert all(torch.equal(before[k], v) and v.dtype == torch.float32 for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class LSTMRegressor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(4, 32, batch_first=True)
        self.head = torch.nn.Linear(32, 1)

    def forward(self, x):
        out, _ = self.lstm(x)  # (B, T, H)
        return self.head(out).squeeze(-1)  # (B, T)


def test_nn_lstm_and_sequence_dim_get_per_step_error_curves():
    torch.manual_seed(0)
    result = precision.analyze(LSTMRegressor(), (torch.randn(3, 40, 4),), dtype="bfloat16", sequence_dim=1,
                               sequence_modules=["head"], search=False)
    by_module = {a.module: a for a in result.accumulations}
    assert set(by_module) >= {"lstm", "", "head"} and len(by_module["head"].error) == 40
    assert len(by_module["lstm"].error) == 40 and len(by_module[""].error) == 40
    assert result.accumulation.module == "lstm"  # recurrent modules come first
    assert all(0 < e < 0.1 for e in by_module["lstm"].error)


# --------------------------------------------------------------------------- the policy's verdicts
class Fourier(torch.nn.Module):
    """NeRF-style positional encoding, sin and cos of 2^k * pi * x: it amplifies input rounding."""

    def __init__(self, bands: int = 7):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(bands) * math.pi)

    def forward(self, x):
        z = x.unsqueeze(-1) * self.freqs
        return torch.cat([torch.sin(z), torch.cos(z)], -1).flatten(-2)


class NeRFish(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = Fourier()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(42, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))

    def forward(self, x):
        return self.mlp(self.enc(x))


def test_when_the_inputs_rounding_is_the_floor_the_policy_says_so_and_measures_autocast():
    torch.manual_seed(0)
    x = torch.rand(256, 3) * 2 - 1
    model = NeRFish()
    result = precision.analyze(model, (x,), dtype="bfloat16", mode="cast", tolerance=0.02)
    rec = result.recommendation
    assert not rec.tolerance_met
    # Oracle: the float64 model on bfloat16-rounded inputs and weights (cast mode rounds both).
    import copy

    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        rounded = copy.deepcopy(model).bfloat16().double()(x.bfloat16().double())
    floor = relative_error(rounded, exact)
    assert rec.input_floor == pytest.approx(floor, rel=1e-6) and rec.input_floor > 0.02
    assert "The floor is the inputs and the weights" in rec.reason and "enc" in rec.reason
    # Every kept module earned its place: the set improves the error by at least 5%.
    assert rec.keep_fp32 == [] or rec.output_error_after <= 0.95 * rec.output_error_before
    assert rec.alternative["mode"] == "autocast" and rec.alternative["meets"]
    assert rec.alternative["output_error"] <= 0.02 and "mode='autocast'" in rec.reason
    assert result.to_dict()["recommendation"]["alternative"]["meets"] is True


def test_a_set_that_changes_nothing_is_never_recommended():
    # The chaotic seed LSTM in bfloat16: no float32 module can rescue it, so none is recommended.
    from floatscope.examples.lstm_accumulation import make

    model, inputs = make()
    rec = precision.analyze(model, inputs, dtype="bfloat16", mode="cast", tolerance=0.02).recommendation
    assert not rec.tolerance_met
    assert rec.keep_fp32 == [] or rec.output_error_after <= 0.95 * rec.output_error_before
    assert rec.reason.startswith("no set of float32 modules meets the tolerance 0.02")


class NearMax(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.norm, self.head = torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.norm(self.proj(x)))


def near_max(peak: float) -> tuple[NearMax, torch.Tensor]:
    """NearMax whose projection's largest output is ``peak`` on the returned input."""
    torch.manual_seed(0)
    model, x = NearMax(), torch.randn(64, 16)
    with torch.no_grad():
        scale = peak / model.proj(x).abs().max()
        model.proj.weight.mul_(scale)
        model.proj.bias.mul_(scale)
    return model, x


def test_a_module_near_the_float16_max_is_kept_for_headroom_with_the_reason():
    model, x = near_max(57000.0)
    result = precision.analyze(model, (x,), dtype="float16", mode="cast", tolerance=0.01)
    rec = result.recommendation
    assert result.flagged == ["proj"] and result.output_error < 0.01
    assert rec.keep_fp32 == ["proj"] and rec.kept_for_headroom == ["proj"] and rec.tolerance_met
    headroom = result.module("proj").headroom_bits
    assert headroom == pytest.approx(math.log2(65504 / 57000), abs=0.01)
    assert f"within {headroom:.2g} bits of float16's max" in rec.reason and "for headroom" in rec.reason
    assert "nothing needs float32" not in rec.snippet


def test_the_cast_mode_snippet_runs_and_reproduces_the_error_it_promises():
    import copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 128),
                                torch.nn.GELU(), torch.nn.Linear(128, 10))
    inputs = (torch.randn(64, 32),)
    rec = precision.analyze(model, inputs, dtype="float16", mode="cast", tolerance=3e-4).recommendation
    assert rec.keep_fp32 and not rec.tolerance_met
    # The floor counts the weights too: float32 modules in cast mode run on copies of rounded weights.
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(inputs[0].double())
        floored = copy.deepcopy(model).half().double()(inputs[0].half().double())
    assert rec.input_floor == pytest.approx(relative_error(floored, exact), rel=1e-6)
    assert "the inputs and the weights" in rec.reason or "inputs and weights" in rec.reason
    scope = {"model": copy.deepcopy(model), "inputs": inputs, "torch": torch}
    exec(rec.snippet, scope)  # what a user pastes
    assert relative_error(scope["output"].double(), exact) == pytest.approx(rec.output_error_after, rel=1e-9)
    assert all(p.dtype == torch.float16 for p in scope["model"].parameters())  # remove() restored the dtypes


def test_a_module_that_already_overflows_is_said_to_overflow_not_to_come_near():
    model, x = near_max(1.0e5)
    rec = precision.analyze(model, (x,), dtype="float16", mode="autocast", tolerance=0.01).recommendation
    assert rec.kept_for_headroom == ["proj"]
    assert "overflows on this very input" in rec.reason and "within -" not in rec.reason
    assert "not accuracy" not in rec.reason


class PeakedSoftmax(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.sm = torch.nn.Linear(16, 8), NaiveSoftmax()

    def forward(self, x):
        z = self.fc(x)
        return self.sm(z / z.amax() * 10.5)  # exp(10.5) = 36316: 0.85 bits below float16's max


def test_an_op_near_the_max_inside_a_module_flags_it_and_keeps_it_for_headroom():
    torch.manual_seed(0)
    result = precision.analyze(PeakedSoftmax(), (torch.randn(4, 16),), dtype="float16", mode="cast")
    assert result.module("sm").headroom_bits > 1  # its output (probabilities) is far from the max...
    worst = min((o for o in result.ops if o.module == "sm"), key=lambda o: o.headroom_bits)
    assert worst.headroom_bits < 1  # ...but an op inside it is not
    rec = result.recommendation
    assert "sm" in result.flagged and rec.kept_for_headroom == ["sm"]
    assert f"sm's {worst.op} comes within {worst.headroom_bits:.2g} bits" in rec.reason
    assert "nothing needs float32" not in rec.snippet
