"""Training health findings, calibrated on healthy runs; run diffs; reproducibility helpers; reports."""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import floatscope
import floatscope.runs as fr
from floatscope.runs import KINDS
from conftest import render_in_browser

CLI = [sys.executable, "-m", "floatscope"]


def _findings(store_path, run_id):
    return fr.findings(run_id, store=store_path)


# ----------------------------------------------------------------------------------- healthy set
class LSTMClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(8, 32, batch_first=True)
        self.head = torch.nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def _healthy(kind):
    if kind == "mlp":
        return (torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 5)), lambda: torch.randn(64, 20))
    if kind == "cnn":
        return (torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                    torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 5)),
                lambda: torch.randn(32, 3, 16, 16))
    if kind == "transformer":
        layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
        return (torch.nn.Sequential(torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                                    torch.nn.Flatten(), torch.nn.Linear(32 * 8, 5)), lambda: torch.randn(16, 8, 32))
    return LSTMClassifier(), lambda: torch.randn(16, 12, 8)


def _bf16_lstm_runs() -> bool:
    """oneDNN's bfloat16 LSTM needs CPU support (AVX-512 BF16 or AMX); elsewhere autocast raises."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.LSTM(2, 2)(torch.randn(1, 1, 2))
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer", "lstm"])
def test_healthy_trainings_raise_no_finding(tmp_path, kind, autocast):
    torch.manual_seed(0)
    model, data = _healthy(kind)
    teacher = torch.nn.Linear(int(data()[0].numel()), 5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # Without CPU support for oneDNN's bfloat16 LSTM, the LSTM runs on ATen's kernels under autocast.
    native = kind == "lstm" and autocast and not _bf16_lstm_runs()
    with (torch.backends.mkldnn.flags(enabled=False) if native else contextlib.nullcontext(),
          floatscope.watch(model, opt, store=str(tmp_path / "s.sqlite"), health_every=10) as w):
        for _ in range(120):
            x = data()
            with torch.no_grad():
                y = teacher(x.reshape(x.shape[0], -1)).argmax(-1)  # a learnable task
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = model(x)
            loss = F.cross_entropy(out.float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert w.result.status == "clean"
    assert _findings(tmp_path / "s.sqlite", w.run_id) == []


# ----------------------------------------------------------------------------------- the seeds' scenarios
def test_deep_sigmoid_mlp_has_vanishing_gradients_in_early_layers(tmp_path):
    torch.manual_seed(0)
    layers = []
    for _ in range(10):
        layers += [torch.nn.Linear(32, 32), torch.nn.Sigmoid()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(32, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with floatscope.watch(model, opt, store=str(tmp_path / "s.sqlite"), health_every=5) as w:
        for _ in range(30):
            loss = F.cross_entropy(model(torch.randn(64, 32)), torch.randint(0, 2, (64,)))
            opt.zero_grad()
            loss.backward()
            opt.step()
    found = {f.kind: f for f in _findings(tmp_path / "s.sqlite", w.run_id)}
    vanishing = found["vanishing-gradient"]
    assert vanishing.layers[0] == "0.weight" and "2.weight" in vanishing.layers
    assert "18.weight" not in vanishing.layers and "20.weight" not in vanishing.layers  # the late layers learn
    assert vanishing.evidence["first_to_last_grad_rms_ratio"] < 1e-3
    assert 0 < vanishing.evidence["factor_per_layer"] < 0.5
    assert any("ReLU" in s for s in vanishing.suggestions)


class Forecaster(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(4, 32, batch_first=True)
        self.head = torch.nn.Linear(32, 1)

    def forward(self, x):
        return self.head(self.lstm(x)[0]).squeeze(-1)


def test_lstm_with_a_large_learning_rate_has_exploding_gradients_and_a_clip_value(tmp_path):
    torch.manual_seed(0)
    model = Forecaster()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with floatscope.watch(model, opt, store=str(tmp_path / "s.sqlite"), health_every=5, on_anomaly="record") as w:
        for _ in range(40):
            x = torch.randn(8, 30, 4)
            loss = F.mse_loss(model(x), torch.sin(x.sum(-1).cumsum(1) / 5))
            opt.zero_grad()
            loss.backward()
            opt.step()
    found = {f.kind: f for f in _findings(tmp_path / "s.sqlite", w.run_id)}
    exploding = found["exploding-gradient"]
    clip = exploding.evidence["recommended_max_norm"]
    assert 0 < clip < 10 * exploding.evidence["early_median_grad_norm"]
    assert exploding.evidence["peak_grad_norm"] > 1000 * clip
    assert f"max_norm={clip:.3g}" in exploding.suggestions[0]
    assert "lstm.weight_hh_l0" in exploding.layers
    assert "recurrent layers (LSTM)" in exploding.explanation


def test_an_mlp_whose_gradients_explode_to_nan_is_told_so_without_recurrent_text(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    with floatscope.watch(model, opt, store=str(tmp_path / "s.sqlite"), health_every=5, on_anomaly="record") as w:
        for i in range(30):
            x = torch.randn(16, 8) * (1.0 if i < 12 else 30.0)
            loss = F.mse_loss(model(x), x.sum(1, keepdim=True) ** 2)
            opt.zero_grad()
            loss.backward()
            opt.step()
    found = {f.kind: f for f in _findings(tmp_path / "s.sqlite", w.run_id)}
    exploding = found["exploding-gradient"]
    assert "recurrent" not in exploding.explanation.lower()
    norms = [s.grad_norm for s in fr.steps(w.run_id, store=tmp_path / "s.sqlite") if s.grad_norm is not None]
    assert math.isnan(norms[-1])
    assert "then NaN" in exploding.explanation and "inf" not in exploding.explanation.lower().replace("inf/nan", "")


def test_fp16_autocast_layer_near_65504_is_an_overflow_risk(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    with torch.no_grad():
        model[0].weight.mul_(15000.0)  # activations around 30000: one bit below fp16's max
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with floatscope.watch(model, opt, store=str(tmp_path / "s.sqlite"), health_every=5) as w:
        for _ in range(10):
            with torch.autocast("cpu", dtype=torch.float16):
                out = model(torch.randn(32, 16))
            loss = out.float().pow(2).mean() * 1e-12
            opt.zero_grad()
            loss.backward()
            opt.step()
    risks = [f for f in _findings(tmp_path / "s.sqlite", w.run_id) if f.kind == "overflow-risk"]
    assert risks and risks[0].layers == ["0"]
    assert risks[0].evidence["dtype"] == "float16" and risks[0].evidence["headroom_bits"] < 2.0


def test_collapsing_gradscaler_is_flagged(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    with floatscope.watch(model, opt, scaler=scaler, store=str(tmp_path / "s.sqlite"), on_anomaly="record") as w:
        for _ in range(25):
            with torch.autocast("cpu", dtype=torch.float16):
                z = model(torch.randn(6, 4))
            loss = torch.sqrt((z.float() - z.float().detach()) ** 2).sum()
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    collapse = [f for f in _findings(tmp_path / "s.sqlite", w.run_id) if f.kind == "loss-scale-collapse"]
    assert collapse and collapse[0].severity == "error"
    assert collapse[0].evidence["min_scale"] < 1.0 and "sqrt" in collapse[0].evidence["origin"]


def test_fp16_gradient_underflow_recommends_a_scale(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with floatscope.watch(model, opt, store=str(tmp_path / "s.sqlite"), health_every=2) as w:
        for _ in range(6):
            with torch.autocast("cpu", dtype=torch.float16):
                out = model(torch.randn(16, 32))
            loss = out.float().mean() * 1e-7  # tiny gradients, no loss scaling
            opt.zero_grad()
            loss.backward()
            opt.step()
    found = [f for f in _findings(tmp_path / "s.sqlite", w.run_id) if f.kind == "gradient-underflow"]
    assert found
    evidence = found[0].evidence
    assert evidence["flush_fraction_at_current_scale"] > 0.05 and evidence["recommended_scale"] > 1.0
    assert f"init_scale={evidence['recommended_scale']:g}" in found[0].suggestions[0]


def test_loss_spike_and_dead_relu(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with floatscope.watch(model, opt, store=str(tmp_path / "s.sqlite"), health_every=5) as w:
        for i in range(60):
            if i == 30:
                with torch.no_grad():
                    model[0].bias.fill_(-50.0)  # every unit dies
            x = torch.randn(32, 8) * (20.0 if i == 25 else 1.0)
            loss = F.mse_loss(model(x), torch.zeros(32, 1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    found = {f.kind: f for f in _findings(tmp_path / "s.sqlite", w.run_id)}
    assert found["loss-spike"].steps[0] == 25
    assert found["dead-relu"].layers == ["1"] and found["dead-relu"].evidence["median_dead_fraction"] == 1.0


def test_health_json_contract_from_the_cli(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import torch
        layers = []
        for _ in range(10):
            layers += [torch.nn.Linear(16, 16), torch.nn.Sigmoid()]
        model = torch.nn.Sequential(*layers, torch.nn.Linear(16, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(0)
        for _ in range(12):
            loss = torch.nn.functional.cross_entropy(model(torch.randn(32, 16)), torch.randint(0, 2, (32,)))
            opt.zero_grad()
            loss.backward()
            opt.step()
    """))
    run = subprocess.run([*CLI, "run", "--health-every", "4", "--json", "r.json", "train.py"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    run_id = json.loads((tmp_path / "r.json").read_text())["run_id"]
    proc = subprocess.run([*CLI, "health", run_id, "--json", "h.json"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "vanishing-gradient" in proc.stdout
    data = json.loads((tmp_path / "h.json").read_text())
    assert data["run_id"] == run_id
    finding = data["findings"][0]
    assert set(finding) >= {"kind", "severity", "layers", "steps", "evidence", "explanation", "suggestions"}
    assert finding["kind"] in KINDS and finding["severity"] in {"info", "warning", "error"}


# ----------------------------------------------------------------------------------- diff
DIFF_SCRIPT = """
import sys
import torch
import torch.nn.functional as F
import floatscope

variant = sys.argv[1]
floatscope.seed_everything(0)
model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 2))
if variant == "init":
    for m in model:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            torch.nn.init.zeros_(m.bias)
opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.01 if variant == "weight-decay" else 0.0)
g = torch.Generator().manual_seed(1)
for step in range(8 if variant == "shorter" else 15):
    x = torch.randn(16, 10, generator=g)
    if variant == "input-scaling":
        x = x * 255.0
    y = torch.randint(0, 2, (16,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "dtype"):
        out = model(x)
    loss = F.cross_entropy(out.float(), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
"""


@pytest.fixture(scope="module")
def diff_runs_store(tmp_path_factory):
    from floatscope._cli.run import run_script

    folder = tmp_path_factory.mktemp("diff")
    script = folder / "train.py"
    script.write_text(DIFF_SCRIPT)
    store = folder / "runs.sqlite"
    ids = {}
    for variant in ("base", "base-again", "init", "weight-decay", "input-scaling", "dtype", "shorter"):
        code, result = run_script(script, ["base" if variant == "base-again" else variant], store=str(store),
                                  health_every=5)
        assert code == 0
        ids[variant] = result.run_id
    return store, ids


@pytest.mark.parametrize("variant, cause, key, step, tensor", [
    ("init", "initialisation", "init.0.weight.std", 0, "0.weight (initial value)"),
    ("weight-decay", "optimizer", "optimizers.0.param_groups.0.weight_decay", 0,
     "0.weight (after the optimizer update)"),
    ("input-scaling", "input data", "data.batch0.0.std", 0, "activation of module '0'"),
    ("dtype", "precision", "precision.autocast.0.dtype", 0, "activation of module '0'"),
])
def test_diff_names_the_difference_and_the_first_divergent_step(diff_runs_store, variant, cause, key, step, tensor):
    path, ids = diff_runs_store
    result = fr.diff(ids["base"], ids[variant], store=path, exact=True)
    assert result.causes == [cause], result.causes
    assert key in {d.key for d in result.config_differences}
    assert (result.first_divergent_step, result.first_divergent_tensor) == (step, tensor)
    assert cause in result.explanation


def test_same_seed_and_deterministic_settings_diff_as_identical(diff_runs_store, tmp_path):
    path, ids = diff_runs_store
    proc = subprocess.run([*CLI, "diff", "--exact", "--store", str(path), ids["base"], ids["base-again"], "--json",
                           "d.json", "--report", "d.html"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["config_differences"] == [] and data["first_divergent_step"] is None
    assert data["first_divergent_tensor"] is None and len(data["divergence"]) == 15
    assert all(p["loss_a"] == p["loss_b"] for p in data["divergence"])
    assert "identical" in proc.stdout


def test_runs_of_different_lengths_are_compared_over_their_common_steps_not_called_identical(diff_runs_store):
    path, ids = diff_runs_store
    result = fr.diff(ids["base"], ids["shorter"], store=path, exact=True)
    assert result.first_divergent_step is None and not result.identical
    assert (result.steps_a, result.steps_b, result.compared_steps) == (15, 8, 8)
    assert not result.explanation.startswith("the runs are identical") and "A completed 15 step(s)" in result.explanation
    assert result.to_dict()["compared_steps"] == 8


def test_diff_across_stores(diff_runs_store, tmp_path):
    path, ids = diff_runs_store
    proc = subprocess.run([*CLI, "diff", f"{path}:{ids['base']}", f"{path}:{ids['weight-decay']}", "--json", "d.json"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["config_differences"][0]["a"] == 0.0 and data["config_differences"][0]["b"] == 0.01


# ----------------------------------------------------------------------------------- reproducibility helpers
def test_seed_everything_and_capture_env():
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    import os

    env_before = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        record = floatscope.seed_everything(123)
        a = torch.randn(3)
        floatscope.seed_everything(123)
        assert torch.equal(a, torch.randn(3))
        assert record.seed == 123 and record.deterministic and record.cublas_workspace_config == ":4096:8"
        env = floatscope.capture_env()
        assert env.deterministic_algorithms and env.torch_initial_seed == 123
        with pytest.raises(floatscope.UsageError):
            floatscope.seed_everything(-1)
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]
        if env_before is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = env_before


def test_env_command(tmp_path):
    proc = subprocess.run([*CLI, "env", "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    data = json.loads(proc.stdout)
    assert data["torch"] == torch.__version__ and "deterministic_algorithms" in data


# ----------------------------------------------------------------------------------- the report in a browser
def test_run_and_diff_reports_render_in_a_browser(diff_runs_store, tmp_path):
    path, ids = diff_runs_store
    proc = subprocess.run([*CLI, "report", ids["input-scaling"], "--store", str(path), "-o", "run.html"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    counts = render_in_browser(tmp_path / "run.html")
    assert len(counts) == 3 and all(n > 0 for n in counts)  # loss, gradient heatmap, headroom
    proc = subprocess.run([*CLI, "diff", "--store", str(path), ids["base"], ids["weight-decay"], "--report",
                           "diff.html"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "diff.html").read_text()
    assert "first divergence" in page
    counts = render_in_browser(tmp_path / "diff.html")
    assert len(counts) == 2 and all(n > 0 for n in counts)


@pytest.mark.parametrize("act, words", [(torch.nn.Tanh, ("(tanh)", "round to -1 or 1")),
                                        (torch.nn.Sigmoid, ("(sigmoid)", "round to 0 or 1"))])
def test_saturation_is_explained_for_the_activation_in_the_model(tmp_path, act, words):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), act(), torch.nn.Linear(32, 1))
    with torch.no_grad():
        model[0].weight.mul_(40.0)  # pre-activations far beyond +-5
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with floatscope.watch(model, opt, store=str(tmp_path / "s.sqlite"), health_every=5) as w:
        for _ in range(30):
            loss = F.mse_loss(model(torch.randn(32, 8)), torch.randn(32, 1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    [found] = [f for f in _findings(tmp_path / "s.sqlite", w.run_id) if f.kind == "saturation"]
    assert found.layers == ["1"] and found.evidence["median_fraction_beyond_5"] > 0.5
    assert all(word in found.explanation for word in words)
    assert ("BCEWithLogitsLoss" in " ".join(found.suggestions)) == (act is torch.nn.Sigmoid)


# ----------------------------------------------------------------------------------- sample values
def test_health_samples_match_a_float64_oracle(tmp_path):
    """Every sampled number against float64: layer absmax, rms, headroom, saturation and dead fraction;
    the gradient, weight and update norms, with weights of a shared shape (stacked) and of their own.
    The batch size changes at the last step, so the layers' outputs change shape between samples."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight.mul_(8.0)  # some sigmoid inputs beyond +-5
        model[2].bias.fill_(-0.3)  # some dead ReLU units
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outputs: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}

    def keep(module, args, output):
        name = next(n for n, m in model.named_modules() if m is module)
        outputs[name], inputs[name] = output.detach().double(), args[0].detach().double()

    handles = [m.register_forward_hook(keep) for n, m in model.named_modules() if n]
    expected_acts, expected_params = {}, {}
    try:
        with floatscope.watch(model, opt, store=str(tmp_path / "s.sqlite"), health_every=1) as w:
            for step in range(3):
                batch = 32 if step < 2 else 20
                x, y = torch.randn(batch, 8), torch.randint(0, 3, (batch,))
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
                grads = {n: p.grad.double().norm().item() for n, p in model.named_parameters()}
                opt.step()
                for name, out in outputs.items():
                    expected_acts[step, name] = (out.abs().max().item(), out.pow(2).mean().sqrt().item(),
                                                 (inputs[name].abs() > 5).double().mean().item(),
                                                 (out == 0).all(dim=0).double().mean().item())
                for n, p in model.named_parameters():
                    expected_params[step, n] = (grads[n], p.detach().double().norm().item(),
                                                (p.detach().double() - before[n]).norm().item())
    finally:
        for h in handles:
            h.remove()
    assert w.result.status == "clean"
    assert all("forward" not in vars(m) for m in model.modules())  # the sampled layers are as they were
    acts = fr.activations(w.run_id, store=str(tmp_path / "s.sqlite"))
    assert {(a.step, a.layer) for a in acts} == set(expected_acts)
    for a in acts:
        absmax, rms, saturated, dead = expected_acts[a.step, a.layer]
        assert a.absmax == pytest.approx(absmax, rel=1e-6) and a.rms == pytest.approx(rms, rel=1e-5)
        assert a.nan == 0 and a.inf == 0 and a.zero_frac is None and a.below_normal_frac is None  # float32
        assert a.headroom_bits == pytest.approx(math.log2(torch.finfo(torch.float32).max / absmax), abs=1e-4)
        if a.type in ("Sigmoid", "Tanh"):
            assert a.saturation == pytest.approx(saturated, abs=1e-7)
        else:
            assert a.saturation is None
        assert a.dead_frac == (pytest.approx(dead, abs=1e-7) if a.type == "ReLU" else None)
    assert any(a.saturation and a.saturation > 0.05 for a in acts) and any(a.dead_frac for a in acts)
    params = fr.params(w.run_id, store=str(tmp_path / "s.sqlite"))
    assert {(p.step, p.name) for p in params} == set(expected_params)
    for p in params:
        grad, weight, update = expected_params[p.step, p.name]
        assert p.grad_norm == pytest.approx(grad, rel=1e-5)
        assert p.weight_norm == pytest.approx(weight, rel=1e-5)
        if p.name.endswith("weight"):  # update norms are measured for weight matrices
            assert p.update_norm == pytest.approx(update, rel=1e-5) and update > 0
            assert p.update_ratio == pytest.approx(update / weight, rel=1e-5)
        else:
            assert p.update_norm is None


def test_sampled_layers_keep_their_own_forward_and_lose_the_wrapper_when_forward_raises(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    patched = model[0].forward  # a library that sets forward on the instance (as accelerate's hooks do)
    model[0].forward = lambda x: patched(x) * 2.0
    own = model[0].forward
    linear_forward, relu_forward = vars(torch.nn.Linear)["forward"], vars(torch.nn.ReLU)["forward"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    class Fails(Exception):
        pass

    with pytest.raises(Fails):
        with floatscope.watch(model, opt, store=str(tmp_path / "s.sqlite"), health_every=1):
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
            model[2].register_forward_hook(lambda *a: (_ for _ in ()).throw(Fails()))  # the next pass raises
            model(torch.randn(3, 4))
    assert vars(model[0])["forward"] is own
    assert "forward" not in vars(model[1]) and "forward" not in vars(model[2])
    assert vars(torch.nn.Linear)["forward"] is linear_forward and vars(torch.nn.ReLU)["forward"] is relu_forward
    acts = fr.activations("last", store=str(tmp_path / "s.sqlite"))
    first = {a.layer: a for a in acts if a.step == 0}
    assert set(first) == {"0", "1", "2"}
    x = torch.randn(3, 4)
    assert torch.equal(model[0](x), patched(x) * 2.0)


class _Scaled(torch.nn.Linear):
    """A subclass whose forward calls the parent's: one sample per call, under its own name."""

    def forward(self, x):
        return super().forward(x) * 3.0


class _Student(torch.nn.Module):
    """Calls a teacher (another model, of the same layer classes, not watched) inside its forward."""

    def __init__(self, teacher):
        super().__init__()
        self.fc, self.scaled, self.act = torch.nn.Linear(4, 4), _Scaled(4, 4), torch.nn.Tanh()
        self.teacher = [teacher]  # not a submodule

    def forward(self, x):
        with torch.no_grad():
            hint = self.teacher[0](x)
        return self.act(self.scaled(self.fc(x))) + hint


def test_layer_classes_are_wrapped_for_the_pass_and_only_the_sampled_instances_are_recorded(tmp_path):
    """A sampling pass wraps each layer class's forward once (not every instance): another model's
    layers of the same classes run through the wrapper unrecorded, a subclass calling its parent's
    forward is one sample, a Sequential is measured under its last child, and every class forward is
    back as it was after the pass."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    model = torch.nn.Sequential(_Student(teacher), torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Tanh()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    classes = (torch.nn.Linear, torch.nn.Tanh, torch.nn.Sequential, _Scaled, _Student)
    forwards = {c: vars(c)["forward"] for c in classes}
    seen_during = {}

    def spy(module, args, output):
        seen_during["linear"] = vars(torch.nn.Linear)["forward"]
        seen_during["signature"] = str(__import__("inspect").signature(model[0].fc.forward))

    model[1][1].register_forward_hook(spy)
    x = torch.randn(16, 4)
    with torch.no_grad():
        fc = model[0].fc(x)
        scaled = model[0].scaled(fc)
        student = torch.tanh(scaled) + teacher(x)
        expected = {"0.fc": fc, "0.scaled": scaled, "0": student, "1.1": model(x)}
    seen_during.clear()
    with floatscope.watch(model, opt, store=str(tmp_path / "s.sqlite"), health_every=1) as w:
        out = model(x)
        out.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert w.result.status == "clean"
    assert {c: vars(c)["forward"] for c in classes} == forwards
    assert seen_during["linear"] is not forwards[torch.nn.Linear]  # wrapped for the pass
    assert seen_during["signature"] == "(input: torch.Tensor) -> torch.Tensor"
    records = fr.activations(w.run_id, store=str(tmp_path / "s.sqlite"))
    # once each (not _Scaled's parent call), no teacher layer, and the Sequential "1" under "1.1"
    assert [a.layer for a in records] == ["0.fc", "0.scaled", "0.act", "0", "1.0", "1.1"]
    acts = {a.layer: a for a in records}
    for name, t in expected.items():
        assert acts[name].absmax == pytest.approx(t.abs().max().item(), rel=1e-6), name
        assert acts[name].rms == pytest.approx(t.pow(2).mean().sqrt().item(), rel=1e-5), name
    assert acts["0.act"].saturation is not None


@pytest.mark.parametrize("case", ["scripted-layer", "data-parallel"])
def test_models_sampled_with_the_global_hook_record_their_layers(tmp_path, case):
    """A scripted layer cannot take a wrapped forward, and DataParallel replicas would copy one: both
    are sampled with one global forward hook, present for the sampled pass only."""
    torch.manual_seed(0)
    inner = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    if case == "scripted-layer":
        inner[2] = torch.jit.script(inner[2])
        model, prefix = inner, ""
    else:
        model, prefix = torch.nn.DataParallel(inner), "module."
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    forwards = [vars(m).get("forward") for m in model.modules()]  # a scripted module has its own
    with floatscope.watch(model, opt, store=str(tmp_path / "s.sqlite"), health_every=1) as w:
        for _ in range(2):
            x = torch.randn(16, 4)
            expected = inner[0](x).abs().max().item()
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    assert w.result.status == "clean"
    assert [vars(m).get("forward") for m in model.modules()] == forwards
    acts = {(a.step, a.layer): a for a in fr.activations(w.run_id, store=str(tmp_path / "s.sqlite"))}
    assert {layer for _, layer in acts} >= {f"{prefix}0", f"{prefix}1"}
    assert acts[1, f"{prefix}0"].absmax == pytest.approx(expected, rel=1e-6)


class _Block(torch.nn.Module):
    """torchvision's BasicBlock: conv, BN, in-place ReLU, conv, BN, `out += identity`, in-place ReLU."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(channels)
        self.relu = torch.nn.ReLU(inplace=True)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(channels)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def test_outputs_written_in_place_later_are_measured_as_the_layer_returned_them(tmp_path):
    """An in-place ReLU and a residual `+=` overwrite a layer's output after it returns: from the
    second sample on the sampler keeps a copy of those outputs, so BatchNorm's rms is ~1 (not the
    ReLU'd values) and each in-place ReLU has its own sample; dead units of a conv ReLU are channels."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), _Block(8),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    with torch.no_grad():
        model[0].bias[:4] = -1000.0  # 4 of 8 channels dead after the first ReLU
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    truth: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            truth[name] = output.detach().double().clone()
        return hook

    for name, m in model.named_modules():
        if name in ("2.bn1", "2.bn2", "1"):
            m.register_forward_hook(keep(name))
    expected = {}
    with floatscope.watch(model, opt, store=str(tmp_path / "s.sqlite"), health_every=1) as w:
        for step in range(3):
            model(torch.randn(4, 3, 8, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            expected[step] = {n: (t.abs().max().item(), t.pow(2).mean().sqrt().item()) for n, t in truth.items()}
            expected[step]["dead"] = (truth["1"] == 0).all(dim=3).all(dim=2).all(dim=0).double().mean().item()
    acts = {(a.step, a.layer): a for a in fr.activations(w.run_id, store=str(tmp_path / "s.sqlite"))}
    for step in (1, 2):
        for name in ("2.bn1", "2.bn2"):
            absmax, rms = expected[step][name]
            assert acts[step, name].rms == pytest.approx(rms, rel=1e-5)  # about 1: BatchNorm's output
            assert acts[step, name].absmax == pytest.approx(absmax, rel=1e-5)
        assert acts[step, "2.relu"].type == "ReLU" and acts[step, "2.relu"].dead_frac is not None
        assert acts[step, "1"].dead_frac == pytest.approx(expected[step]["dead"]) == 0.5
    assert (0, "2.bn1") not in acts  # the first sample finds the overwrite: not measured, not wrong


def test_a_compiled_model_keeps_one_graph_and_records_parameter_samples(tmp_path):
    """Layer wrappers would be traced by Dynamo: a compiled model's activations are not sampled."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        with floatscope.watch(compiled, opt, store=str(tmp_path / "s.sqlite"), health_every=1) as w:
            for _ in range(3):
                compiled(torch.randn(3, 4)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
        assert w.result.status == "clean"
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
        assert fr.activations(w.run_id, store=str(tmp_path / "s.sqlite")) == []
        assert {p.step for p in fr.params(w.run_id, store=str(tmp_path / "s.sqlite"))} == {0, 1, 2}
        assert all("forward" not in vars(m) for m in model.modules())
    finally:
        torch._dynamo.reset()


class _Twice(torch.nn.Module):
    """Calls one Linear twice in a forward: two samples of one layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, 6)
        self.act = torch.nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.fc(x)))


def _train_twice(store: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = _Twice()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with floatscope.watch(model, opt, store=store, health_every=1) as w:
        for _ in range(3):
            model(torch.randn(8, 6)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    assert w.run_id is not None
    return w.run_id


def test_a_layer_called_twice_has_a_sample_per_call_and_identical_runs_diff_as_identical(tmp_path):
    store = str(tmp_path / "s.sqlite")
    torch.manual_seed(0)
    model = _Twice()
    x = torch.randn(8, 6)  # the first batch of _train_twice's run
    with torch.no_grad():
        first = model.fc(x)
        second = model.fc(torch.relu(first))
    run_a = _train_twice(store)
    run_b = _train_twice(store)
    acts = {(a.step, a.layer): a for a in fr.activations(run_a, store=store)}
    assert sorted(layer for step, layer in acts if step == 0) == ["act", "fc", "fc#2"]
    assert acts[0, "fc"].absmax == pytest.approx(first.abs().max().item(), rel=1e-6)
    assert acts[0, "fc#2"].absmax == pytest.approx(second.abs().max().item(), rel=1e-6)
    assert acts[0, "fc#2"].rms == pytest.approx(second.pow(2).mean().sqrt().item(), rel=1e-5)
    result = fr.diff(run_a, run_b, store=store, exact=True)
    assert result.first_divergent_step is None and result.first_divergent_tensor is None


def test_inference_calls_before_training_are_not_the_training_steps_samples(tmp_path):
    """Evaluation calls under no_grad before the first optimizer step (a sanity check) are folded into
    step 0 by the step count: the samples of steps 0, 2, 4 are the training calls', once each, and a
    no_grad call made before the training call of a later step is not sampled either."""
    store = str(tmp_path / "s.sqlite")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    trained: list[float] = []
    model[0].register_forward_hook(
        lambda m, a, out: trained.append(out.detach().double().abs().max().item()) if torch.is_grad_enabled() else None)
    with floatscope.watch(model, opt, store=store, health_every=2) as w:
        with torch.no_grad():
            for _ in range(5):
                model(torch.randn(32, 8) * 100)  # evaluation before training: absmax in the hundreds
        for _ in range(6):
            with torch.no_grad():
                model(torch.randn(32, 8) * 100)  # a validation call before the training call
            model(torch.randn(32, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    assert w.result.steps == 6
    samples = [(a.step, a.absmax) for a in fr.activations(w.run_id, store=store) if a.layer == "0"]
    assert [step for step, _ in samples] == [0, 2, 4]
    for step, absmax in samples:
        assert absmax == pytest.approx(trained[step], rel=1e-6)


def test_inference_only_runs_sample_their_calls_and_a_manual_loop_after_evaluation_has_no_duplicate(tmp_path):
    store = str(tmp_path / "s.sqlite")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    with floatscope.watch(model, store=store, health_every=2) as w:
        with torch.no_grad():
            for _ in range(5):
                model(torch.randn(16, 4))
    assert sorted({a.step for a in fr.activations(w.run_id, store=store)}) == [0, 2, 4]
    with floatscope.watch(None, store=store, health_every=2) as w:
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(16, 4) * 100)
        for _ in range(4):
            model(torch.randn(16, 4)).pow(2).mean().backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * p.grad
                    p.grad = None
    steps = [a.step for a in fr.activations(w.run_id, store=store) if a.layer == "0"]
    assert steps == sorted(set(steps)), steps  # one sample per step
    assert all(s % 2 == 0 for s in steps) and len(steps) >= 2


class _Shift(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.0


class _GroupBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(3, 6, 3, padding=1)
        self.gn = torch.nn.GroupNorm(3, 6)
        self.mix = _Shift()  # a custom layer of unknown layout between the norm and the ReLU
        self.relu = torch.nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.mix(self.gn(self.conv(x))))


def test_dead_units_after_a_group_norm_and_a_custom_layer_are_channels(tmp_path):
    store = str(tmp_path / "s.sqlite")
    torch.manual_seed(0)
    model = _GroupBlock()
    with torch.no_grad():
        model.gn.bias[:4] = -100.0  # channels 0-3 of 6 are dead after the ReLU
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    out: list[torch.Tensor] = []
    model.relu.register_forward_hook(lambda m, a, o: out.append(o.detach().double()))
    with floatscope.watch(model, opt, store=store, health_every=1) as w:
        model(torch.randn(8, 3, 10)).mean().backward()
        opt.step()
    dead = (out[0] == 0).all(dim=2).all(dim=0).double().mean().item()
    assert dead == pytest.approx(4 / 6)
    [relu] = [a for a in fr.activations(w.run_id, store=store) if a.layer == "relu"]
    assert relu.dead_frac == pytest.approx(dead)
