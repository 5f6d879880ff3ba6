"""The fault library: real-world NaN/Inf patterns, each with the exact op, phase, module, line and step.

Every pattern runs a small training loop under ``floatscope.watch`` (the cheap path), which must
detect the failure and replay the failing step to name the origin.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import floatscope
from floatscope import NonFiniteError
from conftest import line_of


def watch_until_incident(model, optimizer, step_fn, steps, **kwargs):
    """Run ``step_fn(step)`` for ``steps`` iterations under a raising watch; return the incident."""
    with pytest.raises(NonFiniteError) as info:
        with floatscope.watch(model, optimizer, store=None, **kwargs):
            for step in range(steps):
                step_fn(step)
    return info.value.incident


def assert_origin(incident, *, op, phase, module, marker, step, category=None, backward_node=None):
    file, line = line_of(marker)
    assert (incident.op, incident.phase, incident.module, incident.step) == (op, phase, module, step), incident
    assert (incident.file, incident.line) == (file, line), incident.diagnosis()
    if category is not None:
        assert incident.category == category, incident.diagnosis()
    if backward_node is not None:
        assert incident.backward_node == backward_node
    assert incident.exact
    assert incident.suggestions, "every diagnosis must say what to change"


# --------------------------------------------------------------------------- 1. log(softmax) underflow
def test_log_of_softmax_underflow_in_loss_code():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(i):
        x = torch.randn(16, 8) * (300.0 if i == 2 else 1.0)
        y = torch.randint(0, 4, (16,))
        probs = torch.softmax(model(x), dim=-1)
        loss = F.nll_loss(torch.log(probs), y)  # MARK:log-softmax
        opt.zero_grad()
        loss.backward()
        opt.step()

    incident = watch_until_incident(model, opt, step, 5)
    assert_origin(incident, op="aten.log.default", phase="forward", module=None, marker="MARK:log-softmax",
                  step=2, category="underflow")
    assert "log_softmax" in " ".join(incident.suggestions)
    assert incident.operands[0].zeros > 0 and incident.output.inf > 0


# --------------------------------------------------------------------------- 2. BCE on a saturated sigmoid
class SigmoidClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 1)

    def forward(self, x):
        return torch.sigmoid(self.fc(x))


def test_handwritten_bce_on_saturated_sigmoid():
    torch.manual_seed(0)
    model = SigmoidClassifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    y = torch.zeros(8, 1)
    y[::2] = 1.0

    def step(i):
        with torch.no_grad():
            if i == 3:
                model.fc.bias.fill_(60.0)  # a bias that drifted far: sigmoid saturates to exactly 1.0
        p = model(x)
        loss = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()  # MARK:bce
        opt.zero_grad()
        loss.backward()
        opt.step()

    incident = watch_until_incident(model, opt, step, 5)
    assert_origin(incident, op="aten.log.default", phase="forward", module=None, marker="MARK:bce", step=3,
                  category="underflow")
    assert "binary_cross_entropy_with_logits" in " ".join(incident.suggestions)


# --------------------------------------------------------------------------- 3. sqrt at zero, backward only
class Embedder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(6, 3)

    def forward(self, a, b):
        za, zb = self.proj(a), self.proj(b)
        return torch.sqrt(((za - zb) ** 2).sum(-1))  # MARK:sqrt


def test_sqrt_at_zero_is_a_backward_origin_blamed_on_the_forward_line():
    torch.manual_seed(0)
    model = Embedder()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(i):
        a = torch.randn(5, 6)
        b = a.clone() if i == 1 else torch.randn(5, 6)
        loss = model(a, b).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    incident = watch_until_incident(model, opt, step, 3)
    assert_origin(incident, op="aten.sqrt.default", phase="backward", module="", marker="MARK:sqrt", step=1,
                  category="division-by-zero", backward_node="SqrtBackward0")
    assert "vector_norm" in " ".join(incident.suggestions)


# --------------------------------------------------------------------------- 4. 0/0 in a normalisation (forward)
class Normalised(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(5, 5, bias=False)

    def forward(self, x):
        h = self.fc(x)
        return h / h.norm(dim=-1, keepdim=True)  # MARK:norm-div


def test_zero_over_zero_in_normalisation():
    torch.manual_seed(0)
    model = Normalised()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(i):
        x = torch.randn(4, 5)
        if i == 2:
            x[1] = 0.0
        loss = model(x).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    incident = watch_until_incident(model, opt, step, 4)
    assert_origin(incident, op="aten.div.Tensor", phase="forward", module="", marker="MARK:norm-div", step=2,
                  category="invalid")
    assert incident.kind == "nan"
    assert incident.operands[1].zeros == 1


# --------------------------------------------------------------------------- 5. std by hand at zero (backward)
class StdFeature(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        return h.var(dim=-1).sqrt()  # MARK:std


def test_std_by_hand_at_zero_backward():
    # torch's own x.std() masks the zero-std gradient; sqrt(var) does not.
    torch.manual_seed(0)
    model = StdFeature()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(i):
        x = torch.randn(3, 4)
        if i == 1:
            with torch.no_grad():
                model.fc.weight.zero_()  # every output equal: var == 0
                model.fc.bias.fill_(0.5)
        loss = model(x).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    incident = watch_until_incident(model, opt, step, 3)
    assert_origin(incident, op="aten.sqrt.default", phase="backward", module="", marker="MARK:std", step=1,
                  backward_node="SqrtBackward0")


# --------------------------------------------------------------------------- 6. acos at the boundary
def test_acos_of_cosine_similarity_at_one():
    # A collapsed representation: at step 2 every output is the same constant, so the normalised
    # vectors are exactly (0.5, 0.5, 0.5, 0.5) and the cosine with a detached copy is exactly 1.0 on
    # any CPU (every intermediate is exact, so no SIMD summation order can round it below 1).
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(i):
        if i == 2:
            with torch.no_grad():
                model.weight.zero_()
                model.bias.fill_(3.0)
        x = torch.randn(4, 4)
        z = F.normalize(model(x), dim=-1)
        other = z.detach().clone() if i == 2 else F.normalize(torch.randn(4, 4), dim=-1)
        cos = (z * other).sum(-1).clamp(-1.0, 1.0)
        angle = torch.acos(cos)  # MARK:acos
        loss = angle.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    incident = watch_until_incident(model, opt, step, 4)
    assert_origin(incident, op="aten.acos.default", phase="backward", module=None, marker="MARK:acos", step=2,
                  backward_node="AcosBackward0")
    assert any("clamp" in s for s in incident.suggestions)


def test_atan2_at_origin_backward():
    x = torch.zeros(3, requires_grad=True)
    y = torch.zeros(3, requires_grad=True)

    def fn():
        angle = torch.atan2(y, x)  # MARK:atan2
        angle.sum().backward()
        return x.grad

    incident = floatscope.locate(fn)
    assert_origin(incident, op="aten.atan2.default", phase="backward", module=None, marker="MARK:atan2", step=0,
                  backward_node="Atan2Backward0")


# --------------------------------------------------------------------------- 7. fully masked softmax row
class MaskedAttention(torch.nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.q = torch.nn.Linear(dim, dim)
        self.k = torch.nn.Linear(dim, dim)

    def forward(self, x, pad):
        scores = self.q(x) @ self.k(x).transpose(-2, -1)  # (B, T, T)
        scores = scores.masked_fill(pad[:, None, :], float("-inf"))
        return torch.softmax(scores, dim=-1)  # MARK:masked-softmax


def test_fully_masked_softmax_row_blames_softmax_not_the_mask():
    torch.manual_seed(0)
    model = MaskedAttention()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(i):
        x = torch.randn(2, 5, 8)
        pad = torch.zeros(2, 5, dtype=torch.bool)
        pad[0, 3:] = True  # ordinary padding: never blamed
        if i == 1:
            pad[1, :] = True  # a sample that is all padding
        loss = model(x, pad).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    incident = watch_until_incident(model, opt, step, 3)
    assert_origin(incident, op="aten._softmax.default", phase="forward", module="",
                  marker="MARK:masked-softmax", step=1, category="invalid")
    assert "mask" in incident.explanation
    assert incident.operands[0].inf > 0


# --------------------------------------------------------------------------- 8. log(1 + exp) overflow
def test_log_one_plus_exp_overflow():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(i):
        x = torch.randn(4, 2) * (80.0 if i == 1 else 1.0)
        z = model(x) * 10.0
        loss = torch.log(1 + torch.exp(z)).mean()  # MARK:softplus
        opt.zero_grad()
        loss.backward()
        opt.step()

    incident = watch_until_incident(model, opt, step, 3)
    assert_origin(incident, op="aten.exp.default", phase="forward", module=None, marker="MARK:softplus", step=1,
                  category="overflow")
    assert "softplus" in " ".join(incident.suggestions)


# --------------------------------------------------------------------------- 9. product of probabilities
class SequenceScorer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 8)

    def forward(self, x):
        probs = torch.softmax(self.fc(x), dim=-1).amax(-1)  # (B, T)
        return torch.log(probs.prod(dim=-1))  # MARK:prod-log


def test_product_of_probabilities_underflows_before_log():
    torch.manual_seed(0)
    model = SequenceScorer()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(i):
        length = 400 if i == 2 else 10
        x = torch.randn(2, length, 4)
        loss = -model(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    incident = watch_until_incident(model, opt, step, 4)
    assert_origin(incident, op="aten.log.default", phase="forward", module="", marker="MARK:prod-log", step=2,
                  category="underflow")
    assert "sum logs" in " ".join(incident.suggestions)


# --------------------------------------------------------------------------- 10. learning-rate divergence
def _divergence_setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.6)
    data = [(torch.randn(16, 4), torch.randn(16, 1)) for _ in range(40)]
    return model, opt, data


def test_learning_rate_divergence_overflows_after_a_few_steps():
    # Oracle: the first step at which plain training sees a non-finite loss.
    model, opt, data = _divergence_setup()
    first_bad = None
    for i, (x, y) in enumerate(data):
        loss = ((model(x) - y) ** 2).mean()
        if not torch.isfinite(loss):
            first_bad = i
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first_bad is not None and first_bad > 3

    model, opt, data = _divergence_setup()

    def step(i):
        x, y = data[i]
        loss = ((model(x) - y) ** 2).mean()  # MARK:divergence
        opt.zero_grad()
        loss.backward()
        opt.step()

    incident = watch_until_incident(model, opt, step, len(data))
    assert incident.step == first_bad
    assert incident.phase == "forward" and incident.category == "overflow"
    assert (incident.file, incident.line) == line_of("MARK:divergence")
    assert incident.op == "aten.pow.Tensor_Scalar"
    assert "diverging" in incident.explanation
    assert any("clip_grad_norm_" in s for s in incident.suggestions)


# --------------------------------------------------------------------------- 11. Adam eps in pure fp16
def test_adam_eps_in_pure_fp16_is_an_optimizer_origin():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).half()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(i):
        x = torch.randn(64, 16).half()
        loss = ((model(x) - 0.01 * torch.randn(64, 1).half()) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()  # MARK:adam-step

    incident = watch_until_incident(model, opt, step, 3)
    assert (incident.phase, incident.step, incident.category) == ("optimizer", 0, "optimizer")
    assert incident.param == "0.weight" and incident.module == "0"
    assert incident.op == "Adam.step"
    assert (incident.file, incident.line) == line_of("MARK:adam-step")
    assert any(line.startswith("exp_avg_sq") for line in incident.optimizer_state)
    assert "eps=1e-08" in incident.explanation and "rounds to 0" in incident.explanation
    assert any("autocast" in s for s in incident.suggestions)


def test_locate_names_the_aten_op_of_an_optimizer_origin():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).half()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)
    x = torch.randn(64, 16).half()
    target = 0.01 * torch.randn(64, 1).half()

    def fn():
        loss = ((model(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        return [p.detach() for p in model.parameters()]

    incident = floatscope.locate(fn)
    assert incident.phase == "optimizer" and incident.param == "0.weight"
    assert incident.op == "aten.addcdiv_.default"
    assert incident.category == "optimizer" and "rounds to 0" in incident.explanation


# --------------------------------------------------------------------------- 12. custom autograd.Function
class UnstableInverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(1e-3).log()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / x  # MARK:custom-backward


class CustomModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x):
        return UnstableInverse.apply(torch.abs(self.fc(x)))


def test_nan_made_inside_a_custom_function_backward():
    torch.manual_seed(0)
    model = CustomModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(i):
        if i == 1:
            with torch.no_grad():
                model.fc.weight.zero_()
                model.fc.bias.zero_()  # the custom backward now divides by exact zeros
        loss = model(torch.randn(4, 3)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    incident = watch_until_incident(model, opt, step, 3)
    assert incident.phase == "backward" and incident.step == 1
    assert incident.backward_node == "UnstableInverseBackward"
    assert incident.op == "aten.div.Tensor"
    assert (incident.file, incident.line) == line_of("MARK:custom-backward")
    # The module that called the Function (its inputs came from there), and the user's backward named as such.
    assert (incident.module, incident.model) == ("", "CustomModel")
    assert incident.explanation.startswith("in the backward of UnstableInverse (a custom autograd.Function")
    assert "the gradient of div" not in incident.explanation
    assert any("UnstableInverse.backward" in s for s in incident.suggestions)


# --------------------------------------------------------------------------- 13. forward Inf absorbed by tanh
class Absorbing(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)

    def forward(self, x):
        return torch.tanh(torch.exp(self.fc(x)))  # MARK:absorbed


def test_forward_inf_absorbed_by_tanh_is_blamed_at_the_overflow():
    torch.manual_seed(0)
    model = Absorbing()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(i):
        x = torch.randn(3, 2) * (200.0 if i == 1 else 1.0)
        out = model(x)
        loss = out.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    incident = watch_until_incident(model, opt, step, 3)
    assert_origin(incident, op="aten.exp.default", phase="forward", module="", marker="MARK:absorbed", step=1,
                  category="overflow")
    assert incident.consequence is not None and "backward" in incident.consequence


# --------------------------------------------------------------------------- 14. variance by cancellation
class NaiveNorm(torch.nn.Module):
    def forward(self, x):
        var = (x * x).mean(-1) - x.mean(-1) ** 2  # E[x^2] - E[x]^2 cancels catastrophically
        return torch.sqrt(var)  # MARK:cancel-sqrt


def test_variance_by_cancellation_goes_negative_and_sqrt_is_nan():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), NaiveNorm())
    torch.manual_seed(0)
    with torch.no_grad():
        model[0].weight.fill_(0.0)
        model[0].bias.copy_(torch.tensor([1e4, 1e4 + 0.1, 1e4 + 0.2, 1e4 + 0.3]))  # true variance 0.0125
    incident = floatscope.locate(lambda: model(torch.randn(64, 4)))
    assert incident.op == "aten.sqrt.default" and incident.phase == "forward" and incident.module == "1"
    assert incident.category == "invalid" and (incident.file, incident.line) == line_of("MARK:cancel-sqrt")
    assert "Welford" in " ".join(incident.suggestions) or "two-pass" in " ".join(incident.suggestions)


# --------------------------------------------------------------------------- 15. fp16 matmul overflow under autocast
def test_fp16_autocast_linear_overflow_names_the_module():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(i):
        x = torch.randn(8, 32)
        if i == 2:
            with torch.no_grad():
                model[0].weight.mul_(1e5)  # weights that grew: fp16 activations overflow
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)  # MARK:autocast-call
        loss = out.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    incident = watch_until_incident(model, opt, step, 4)
    assert incident.phase == "forward" and incident.step == 2 and incident.category == "overflow"
    assert incident.module == "0" and incident.op == "aten.addmm.default"
    # nn.Sequential and nn.Linear are torch code: the user's line is the model call
    assert (incident.file, incident.line) == line_of("MARK:autocast-call")
    assert incident.output.dtype == "float16"
    assert any("bfloat16" in s for s in incident.suggestions)


# --------------------------------------------------------------------------- 16. VAE logvar
class TinyVAE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(6, 4)

    def forward(self, x):
        mu, logvar = self.enc(x).chunk(2, dim=-1)
        std = torch.exp(0.5 * logvar)  # MARK:logvar
        return mu + std * torch.randn_like(std), mu, logvar


def test_vae_logvar_overflow_replays_with_the_same_noise():
    torch.manual_seed(0)
    model = TinyVAE()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(i):
        x = torch.randn(5, 6) * (500.0 if i == 3 else 1.0)
        z, mu, logvar = model(x)
        kl = -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(-1).mean()
        loss = z.pow(2).mean() + kl
        opt.zero_grad()
        loss.backward()
        opt.step()

    incident = watch_until_incident(model, opt, step, 5)
    assert_origin(incident, op="aten.exp.default", phase="forward", module="", marker="MARK:logvar", step=3,
                  category="overflow")
    assert "logvar" in " ".join(incident.suggestions)


def test_locate_returns_none_when_everything_is_finite():
    x = torch.randn(4, requires_grad=True)
    assert floatscope.locate(lambda: (x.exp().sum()).backward()) is None


def test_incident_json_round_trips_with_strict_json():
    x = torch.zeros(2, requires_grad=True)
    incident = floatscope.locate(lambda: torch.sqrt(x).sum().backward())
    text = incident.to_json()
    assert "Infinity" not in text and "NaN" not in text
    again = floatscope.Incident.from_dict(__import__("json").loads(text))
    assert again.op == incident.op and again.operands[0].shape == incident.operands[0].shape
    assert math.isnan(again.output.min) or again.output.min == incident.output.min


def test_exact_optimizer_replays_the_update_op_by_op():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).half()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def step(i):
        x = torch.randn(64, 16).half()
        loss = ((model(x) - 0.01 * torch.randn(64, 1).half()) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()  # MARK:exact-adam-step

    incident = watch_until_incident(model, opt, step, 3, exact_optimizer=True)
    assert (incident.phase, incident.step, incident.param) == ("optimizer", 0, "0.weight")
    assert incident.op == "aten.addcdiv_.default" and incident.exact
    assert (incident.file, incident.line) == line_of("MARK:exact-adam-step")
    denominator = incident.operands[2]
    assert denominator.zeros > 0 and incident.output.inf == denominator.zeros  # x / 0 where sqrt(v) + eps == 0
    assert "rounds to 0" in incident.explanation
    # The replay put the post-step values back: the parameter is as the failing step left it.
    assert not torch.equal(model[0].weight, before["0.weight"]) and torch.isinf(model[0].weight).any()
