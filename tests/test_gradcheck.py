"""floatscope.gradcheck: right backwards pass, injected wrong backwards are found to the element.

Oracles are float64: the true derivative written by hand (cos for sin, ...) at the reported element.
"""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

import floatscope
from floatscope import gradcheck
from floatscope._cli.main import main as cli_main


def _x(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()


def _sin_function(bug):  # noqa: ANN001, ANN202
    """A custom autograd.Function computing sin, whose backward is ``bug(correct_grad, x)``."""

    class SinWithBug(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            ctx.save_for_backward(x)
            return torch.sin(x)

        @staticmethod
        def backward(ctx, g):  # noqa: ANN001, ANN205
            (x,) = ctx.saved_tensors
            return bug(g * torch.cos(x), x)

    return SinWithBug


def _one_column(gx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    gx = gx.clone()
    gx[1234] = gx[1234] * 3
    return gx


# -- correct functions pass ------------------------------------------------------------------


@pytest.mark.parametrize("name, fn, inputs", [
    ("relu away from 0", torch.relu, lambda: (_x(4096),)),
    ("matmul", torch.matmul, lambda: (_x(30, 40), _x(40, 20, seed=1))),
    ("softmax", lambda x: torch.softmax(x, -1), lambda: (_x(16, 64),)),
    ("layer norm", lambda x: F.layer_norm(x, (64,)), lambda: (_x(8, 64),)),
    ("log-sum-exp of large values", lambda x: torch.logsumexp(10 * x, -1), lambda: (_x(16, 256),)),
    ("a sum of 100,000 cubes", lambda x: (x ** 3).sum(), lambda: (_x(100_000),)),
    ("tuple output", lambda x, y: (x * y, (x - y).exp().sum()), lambda: (_x(50), _x(50, seed=1))),
])
def test_correct_functions_pass(name, fn, inputs):
    result = gradcheck(fn, *inputs())
    assert result.passed, str(result)
    assert all(c.verdict == "pass" and c.worst == [] and c.max_ratio < 1 for c in result.inputs)


def test_correct_custom_function_passes_at_few_evaluations():
    fn = _sin_function(lambda gx, x: gx)
    result = gradcheck(fn.apply, _x(4096))
    assert result.passed and bool(result)
    # Three calls to test the function, one for the graph, seven for the noise probe, four per tensor.
    assert result.evaluations == 15 and result.backward_passes == 2


def test_module_with_parameters_passes_and_names_them():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = gradcheck(model, torch.randn(4, 8))
    assert result.passed, str(result)
    assert [(c.kind, c.name, c.index) for c in result.inputs] == [
        ("parameter", "0.weight", 1), ("parameter", "0.bias", 2), ("parameter", "2.weight", 3),
        ("parameter", "2.bias", 4)]
    # The user's module is untouched: same values, same dtype (checked on a float64 copy).
    assert all(torch.equal(before[k], v) and v.dtype == torch.float32 for k, v in model.state_dict().items())
    assert any("float32" in n and "float64 copies" in n for n in result.notes)


# -- injected bugs: the exact element, analytic and numeric against a float64 oracle ----------------


def test_one_wrong_column_of_4096_is_found_with_its_values():
    fn = _sin_function(_one_column)
    x = _x(4096)
    result = gradcheck(fn.apply, x)
    assert not result.passed
    (check,) = result.inputs
    assert check.verdict == "fail" and check.bad_elements == 1 and check.complete
    (worst,) = check.worst
    assert worst.element == [1234] and worst.output == [1234] and worst.kind == "wrong"
    truth = math.cos(float(x[1234]))
    assert worst.analytic == pytest.approx(3 * truth, rel=1e-12)
    assert worst.numeric == pytest.approx(truth, rel=1e-8)
    assert worst.abs_error == pytest.approx(2 * abs(truth), rel=1e-8)
    assert worst.rel_error == pytest.approx(2 / 3, rel=1e-8)
    assert "SinWithBug" in check.cause and "test_gradcheck.py" in check.cause
    # Localisation is a bisection: far fewer calls than the 8,192 of a column-by-column check.
    assert result.evaluations < 200


def test_several_wrong_columns_are_all_found_at_a_cost_that_grows_with_their_number():
    elements = [17, 1234, 2222, 3001, 4000]

    def bug(gx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        gx = gx.clone()
        gx[elements] = gx[elements] * 3
        return gx

    x = _x(4096)
    one = gradcheck(_sin_function(_one_column).apply, x)
    result = gradcheck(_sin_function(bug).apply, x)
    (check,) = result.inputs
    assert check.verdict == "fail" and check.bad_elements == 5 and check.complete
    assert sorted(w.element[0] for w in check.worst) == elements
    for w in check.worst:
        truth = math.cos(float(x[w.element[0]]))
        assert w.output == w.element and w.kind == "wrong"
        assert w.analytic == pytest.approx(3 * truth, rel=1e-12) and w.numeric == pytest.approx(truth, rel=1e-8)
    # Halves are tested along the parent's direction and the second inferred from the first (two calls
    # where the function is smooth): about two calls per level of the bisection, per wrong element.
    assert one.evaluations <= 60 and result.evaluations <= 5 * one.evaluations


def test_wrong_elements_among_a_dense_function_are_found_exactly():
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            return x.clone()

        @staticmethod
        def backward(ctx, g):  # noqa: ANN001, ANN205
            g = g.clone()
            g[3, 17] *= 1.001
            g[5, 200] *= -1.0
            return g

    x = _x(8, 256)
    check = gradcheck(lambda t: torch.softmax(Scale.apply(t), -1), x, max_reported=10).inputs[0]
    assert check.verdict == "fail" and check.complete
    assert sorted(w.element for w in check.worst if w.kind == "wrong") == [[3, 17], [5, 200]]


def test_torch_fast_mode_misses_the_one_column_bug():
    """The anchor this check is measured against (benchmarks/gradcheck.py)."""
    fn = _sin_function(_one_column)
    assert torch.autograd.gradcheck(fn.apply, (_x(4096),), fast_mode=True)


def test_a_factor_in_every_element_is_named_as_a_factor():
    fn = _sin_function(lambda gx, x: 2 * gx)
    x = _x(1000)
    result = gradcheck(fn.apply, x, max_reported=3)
    (check,) = result.inputs
    assert check.verdict == "fail" and len(check.worst) == 3 and not check.complete
    for w in check.worst:
        truth = math.cos(float(x[w.element[0]]))
        assert w.output == w.element
        assert w.analytic == pytest.approx(2 * truth, rel=1e-12) and w.numeric == pytest.approx(truth, rel=1e-8)
    assert "2 times the numeric one" in check.cause and "factor" in check.cause


def test_gradient_wrong_only_for_negative_inputs():
    fn = _sin_function(lambda gx, x: torch.where(x < 0, -gx, gx))
    x = _x(512)
    check = gradcheck(fn.apply, x).inputs[0]
    assert check.verdict == "fail"
    assert all(float(x[w.element[0]]) < 0 for w in check.worst)
    assert "wrong sign" in check.cause


class _LinearWrongBiasSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x, w)
        return x @ w.T + b

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        x, w = ctx.saved_tensors
        return g @ w, g.T @ x, -g.sum(0)  # the bias gradient has the wrong sign


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(6, 5)
        self.weight = torch.nn.Parameter(torch.randn(3, 5))
        self.bias = torch.nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LinearWrongBiasSign.apply(torch.tanh(self.first(x)), self.weight, self.bias)


def test_wrong_sign_for_one_parameter_of_a_module():
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(4, 6)
    result = gradcheck(net, x)
    verdicts = {c.name: c.verdict for c in result.inputs}
    assert verdicts == {"first.weight": "pass", "first.bias": "pass", "weight": "pass", "bias": "fail"}
    bias = next(c for c in result.inputs if c.name == "bias")
    # Oracle: d sum_rows(out[:, k]) / d bias[k] = 1 per row; each entry of the Jacobian is 1.
    for w in bias.worst:
        assert w.output[1] == w.element[0]
        assert w.numeric == pytest.approx(1.0, rel=1e-8) and w.analytic == pytest.approx(-1.0, rel=1e-12)
    assert "_LinearWrongBiasSign" in bias.cause and "wrong sign" in bias.cause


def test_missing_term_in_a_product_rule():
    class XSinX(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            ctx.save_for_backward(x)
            return x * torch.sin(x)

        @staticmethod
        def backward(ctx, g):  # noqa: ANN001, ANN205
            (x,) = ctx.saved_tensors
            return g * x * torch.cos(x)  # forgets the sin(x) term

    x = _x(64)
    check = gradcheck(XSinX.apply, x).inputs[0]
    assert check.verdict == "fail"
    w = check.worst[0]
    xi = float(x[w.element[0]])
    assert w.analytic == pytest.approx(xi * math.cos(xi), rel=1e-12)
    assert w.numeric == pytest.approx(math.sin(xi) + xi * math.cos(xi), rel=1e-8)


def test_detached_path_gives_zero_analytic_and_says_so():
    x = _x(10)
    check = gradcheck(lambda x: x.exp() + x.detach() ** 2, x).inputs[0]
    assert check.verdict == "fail"
    w = check.worst[0]
    xi = float(x[w.element[0]])
    assert w.analytic == pytest.approx(math.exp(xi), rel=1e-12)
    assert w.numeric == pytest.approx(math.exp(xi) + 2 * xi, rel=1e-8)


# -- kinks, precision, randomness, in-place ------------------------------------------------------


def test_relu_exactly_at_zero_is_a_kink_not_a_wrong_backward():
    x = _x(4096).detach()
    x[100] = 0.0
    x[2000] = 0.0
    result = gradcheck(torch.relu, x.requires_grad_())
    (check,) = result.inputs
    assert result.passed and check.verdict == "kink" and check.kinks == 2 and check.bad_elements == 0
    assert sorted(w.element[0] for w in check.worst) == [100, 2000]
    for w in check.worst:
        assert (w.kind, w.analytic, w.left_slope, w.right_slope) == ("kink", 0.0, 0.0, 1.0)
        assert w.numeric == pytest.approx(0.5)
    assert "non-differentiable point, not a bug" in check.cause


def test_a_kink_does_not_hide_a_wrong_element():
    fn = _sin_function(_one_column)
    x = _x(4096).detach()
    x[7] = 0.0
    check = gradcheck(lambda t: torch.abs(fn.apply(t)), x.requires_grad_()).inputs[0]
    assert check.verdict == "fail"
    assert [w.element for w in check.worst if w.kind == "wrong"] == [[1234]]


def test_float32_inputs_are_checked_in_float64_and_say_so():
    x = _x(256, dtype=torch.float32)
    result = gradcheck(torch.tanh, x)
    assert result.passed and result.inputs[0].dtype == "torch.float32"
    assert any("float32" in n and "unreliable" in n for n in result.notes)
    assert x.dtype == torch.float32 and x.grad is None


def test_float32_inside_the_function_is_named_and_bugs_still_found():
    def f(x):  # noqa: ANN001, ANN202
        return torch.sin(x.float()).double()

    result = gradcheck(f, _x(256))
    assert result.passed and result.working_dtype == "torch.float32"
    assert any("computes in float32 inside" in n and "test_gradcheck.py" in n for n in result.notes)
    bad = _sin_function(lambda gx, x: 1.5 * gx)
    assert not gradcheck(lambda x: bad.apply(x.float()).double(), _x(256))


def test_dropout_uses_the_same_draws_every_call_and_restores_the_rng():
    state = torch.get_rng_state()
    result = gradcheck(lambda x: F.dropout(x.sin(), 0.5, training=True), _x(300))
    assert result.passed, str(result)
    assert any("draws random numbers" in n for n in result.notes)
    assert torch.equal(state, torch.get_rng_state())


def test_in_place_modification_of_an_input_is_reported():
    def f(x):  # noqa: ANN001, ANN202
        x.mul_(2)
        return x.sin()

    x = _x(20)
    before = x.detach().clone()
    result = gradcheck(f, x)
    assert any("modifies input 0 'x' in place" in n for n in result.notes)
    assert torch.equal(x.detach(), before)


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("fn, inputs, message", [
    (torch.tanh, (torch.arange(3),), "integer and boolean tensors have no gradient"),
    (torch.tanh, (torch.randn(3),), "without requires_grad"),
    (lambda x: float(x.sum()), (_x(3),), "returned float as the output"),
    (lambda x: (x.sin(), "label"), (_x(3),), "returned str as output 1"),
    (torch.log, (-_x(3).detach().abs().requires_grad_(),), "non-finite"),
    (lambda x: x[10], (_x(3),), "raised IndexError"),
])
def test_bad_input_is_one_clear_usage_error(fn, inputs, message):
    with pytest.raises(floatscope.UsageError, match=message):
        gradcheck(fn, *inputs)


def test_raise_on_failure_raises_an_assertion_with_the_report():
    fn = _sin_function(_one_column)
    with pytest.raises(AssertionError, match=r"\[1234\] +\[1234\]") as info:
        gradcheck(fn.apply, _x(4096), raise_on_failure=True)
    assert isinstance(info.value, floatscope.GradcheckError) and not info.value.result.passed


def test_public_names():
    from floatscope import GradcheckResult

    assert "gradcheck" in floatscope.__all__ and callable(floatscope.gradcheck)
    assert isinstance(gradcheck(torch.sin, _x(4)), GradcheckResult)


# -- JSON and the CLI ------------------------------------------------------------------------


_TARGETS = textwrap.dedent('''
    import torch

    class Bad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.exp()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            out = g * x.exp()
            out[1, 2] = 0.0
            return out

    def bad():
        return Bad.apply, (torch.randn(4, 8, dtype=torch.float64, requires_grad=True),)

    def good():
        torch.manual_seed(0)
        return torch.nn.GRUCell(3, 4), (torch.randn(2, 3), torch.randn(2, 4))

    def no_grad():
        return torch.tanh, (torch.randn(3),)

    def not_a_pair():
        return torch.tanh
''')


def _schema(data: dict) -> None:
    """The issue's JSON contract, exactly (extra fields allowed)."""
    assert isinstance(data["passed"], bool) and isinstance(data["seconds"], float)
    for item in data["inputs"]:
        assert isinstance(item["index"], int) and (item["name"] is None or isinstance(item["name"], str))
        assert isinstance(item["passed"], bool)
        for w in item["worst"]:
            assert isinstance(w["element"], list) and all(isinstance(i, int) for i in w["element"])
            assert w["output"] is None or all(isinstance(i, int) for i in w["output"])
            for key in ("analytic", "numeric", "abs_error", "rel_error"):
                assert isinstance(w[key], float)


def test_cli_exit_codes_text_and_json(tmp_path, capsys):
    target = tmp_path / "targets.py"
    target.write_text(_TARGETS)
    out = tmp_path / "bad.json"
    assert cli_main(["gradcheck", f"{target}:bad", "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "fail: 1 wrong element" in text and "[1, 2]" in text and "Bad" in text
    data = json.loads(out.read_text())
    _schema(data)
    assert data["passed"] is False
    (item,) = data["inputs"]
    assert (item["index"], item["name"], item["passed"]) == (0, None, False)
    (w,) = item["worst"]
    assert (w["element"], w["output"], w["analytic"]) == ([1, 2], [1, 2], 0.0) and w["numeric"] > 0

    good = tmp_path / "good.json"
    assert cli_main(["gradcheck", f"{target}:good", "--json", str(good)]) == 0
    data = json.loads(good.read_text())
    _schema(data)
    assert data["passed"] is True and [i["name"] for i in data["inputs"]] == [
        "weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    assert "gradcheck passed" in capsys.readouterr().out

    assert cli_main(["gradcheck", f"{target}:no_grad"]) == 2
    assert "requires_grad" in capsys.readouterr().err
    assert cli_main(["gradcheck", f"{target}:not_a_pair"]) == 2
    assert "must return (fn_or_module, inputs)" in capsys.readouterr().err
    assert cli_main(["gradcheck", f"{tmp_path}/missing.py:f"]) == 2


# -- the user trial: a jump hides nothing, unconverged steps, copies, targets, shapes, reports ------------


class _Missing2(torch.autograd.Function):
    """x*x whose backward forgets the factor 2."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        return g * x


def test_a_jump_at_one_element_does_not_hide_a_bug_everywhere_else():
    x = _x(1000).detach()
    x[0] = 0.0  # (x > 0) jumps there
    check = gradcheck(lambda t: _Missing2.apply(t) + (t > 0).double(), x.requires_grad_()).inputs[0]
    assert check.verdict == "fail" and check.bad_elements == 5 and check.jumps == 1
    for w in check.worst:
        xi = float(x[w.element[0]])
        assert w.element != [0] and w.output == w.element
        assert w.analytic == pytest.approx(xi, rel=1e-12) and w.numeric == pytest.approx(2 * xi, rel=1e-8)
    assert "jump discontinuity" in check.cause and "element (0,)" in check.cause


def test_a_jump_in_a_scalar_loss_does_not_hide_one_wrong_column():
    fn = _sin_function(_one_column)
    x = _x(4096).detach()
    x[10] = 1.0  # floor jumps there
    check = gradcheck(lambda t: (torch.floor(t) + fn.apply(t)).sum(), x.requires_grad_()).inputs[0]
    assert check.verdict == "fail"
    assert [(w.element, w.kind) for w in check.worst] == [([1234], "wrong"), ([10], "jump")]
    assert check.worst[0].numeric == pytest.approx(math.cos(float(x[1234])), rel=1e-6)  # a sum of 4,096: rounding
    jump = check.worst[1]
    assert jump.jump == pytest.approx(1.0, abs=1e-6) and jump.analytic == pytest.approx(math.cos(1.0), rel=1e-12)


def test_a_jump_alone_is_a_non_differentiable_point_not_a_failure():
    x = _x(500).detach()
    x[42] = 2.0
    result = gradcheck(lambda t: torch.floor(t) + torch.sin(t), x.requires_grad_())
    (check,) = result.inputs
    assert result.passed and check.verdict == "kink" and (check.kinks, check.jumps, check.bad_elements) == (1, 1, 0)
    (w,) = check.worst
    assert (w.element, w.kind) == ([42], "jump") and w.jump == pytest.approx(1.0, abs=1e-6)


def test_a_function_faster_than_the_step_is_refined_not_called_wrong():
    x = (_x(20).detach() * 1e3).requires_grad_()
    result = gradcheck(lambda t: torch.sin(t * t), x)
    assert result.passed and result.inputs[0].verdict == "pass", str(result)
    assert any("had not converged" in n and "agree with the analytic gradient" in n for n in result.notes)

    class SinSquareMissing2(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):  # noqa: ANN001, ANN205
            ctx.save_for_backward(t)
            return torch.sin(t * t)

        @staticmethod
        def backward(ctx, g):  # noqa: ANN001, ANN205
            (t,) = ctx.saved_tensors
            return g * t * torch.cos(t * t)  # forgets the factor 2

    check = gradcheck(SinSquareMissing2.apply, x).inputs[0]
    assert check.verdict == "fail"
    for w in check.worst:
        xi = float(x[w.element[0]])
        assert w.numeric == pytest.approx(2 * xi * math.cos(xi * xi), rel=1e-4)  # the refined value, not aliasing
        assert w.analytic == pytest.approx(xi * math.cos(xi * xi), rel=1e-12)


def test_finite_differences_that_never_converge_are_unreliable_not_wrong():
    result = gradcheck(lambda t: torch.sin(1e12 * t), _x(5))
    (check,) = result.inputs
    assert not result.passed and check.verdict == "unreliable" and check.bad_elements == 0
    assert all(w.kind == "unresolved" for w in check.worst) and check.unresolved == 5
    assert "never converged" in check.cause and "not a sign that the backward is wrong" in check.cause


def test_constant_inputs_are_copied_and_their_modification_reported():
    def accumulate(x, stats):  # noqa: ANN001, ANN202
        stats.add_(x.detach())
        return x.tanh()

    stats = torch.zeros(8, dtype=torch.float64)
    result = gradcheck(accumulate, _x(8), stats)
    assert result.passed and torch.equal(stats, torch.zeros(8, dtype=torch.float64))
    assert any("modifies input 1 'stats' in place" in n for n in result.notes)

    def scale(x, buf):  # noqa: ANN001, ANN202
        buf.add_(1)
        return x * buf

    buf = torch.ones(8, dtype=torch.float64)
    result = gradcheck(scale, _x(8), buf)
    assert result.passed and torch.equal(buf, torch.ones(8, dtype=torch.float64))
    assert any("modifies input 1 'buf' in place" in n for n in result.notes)
    assert not any("not deterministic" in n for n in result.notes)


def test_a_checked_input_modified_in_place_does_not_move_the_others():
    def f(x, y):  # noqa: ANN001, ANN202
        x.mul_(2)
        return x.sin() * y

    result = gradcheck(f, _x(6), _x(6, seed=1))
    assert result.passed, str(result)
    assert any("modifies input 0 'x' in place" in n for n in result.notes)


def test_empty_inputs_and_outputs_pass_with_a_note():
    empty = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    result = gradcheck(lambda e, y: (e.sin(), y.exp()), empty, _x(3))
    assert result.passed and [c.verdict for c in result.inputs] == ["pass", "pass"]
    assert any("has no elements" in n for n in result.notes)
    result = gradcheck(torch.sin, torch.zeros(0, 3, dtype=torch.float64, requires_grad=True))
    assert result.passed and any("returns only empty tensors" in n for n in result.notes)


def test_nested_outputs_are_flattened():
    torch.manual_seed(0)
    result = gradcheck(torch.nn.LSTM(3, 4, batch_first=True), torch.randn(2, 5, 3, requires_grad=True))
    assert result.passed and len(result.inputs) == 5, str(result)
    bad = _sin_function(_one_column)
    result = gradcheck(lambda t: {"y": (t.exp(), [bad.apply(t)]), "n": t.argmax(), "none": None}, _x(4096))
    (check,) = result.inputs
    assert [(w.element, w.output_tensor) for w in check.worst] == [([1234], 1)]
    assert any("output ['n'] (int64)" in n and "ignored" in n for n in result.notes)
    with pytest.raises(floatscope.UsageError, match=r"float as output 1.*do not call \.item\(\)"):
        gradcheck(lambda t: (t.sin(), t.sum().item()), _x(3))


def test_failing_repr_names_the_worst_element_and_the_cause():
    fn = _sin_function(_one_column)
    text = repr(gradcheck(fn.apply, _x(4096)))
    assert text.startswith("GradcheckResult(FAILED: input 0 element [1234]: analytic 1.00529 vs numeric 0.335098 "
                           "(3x), 1 wrong element; the backward is wrong: the custom autograd.Function")
    assert len(text) <= 240 and "\n" not in text  # pytest cuts longer assertion messages in the middle
    assert repr(gradcheck(torch.sin, _x(4))).startswith("GradcheckResult(passed=True, 1 checked tensor,")
    assert "\n" not in repr(gradcheck(torch.sin, _x(4)))


# -- the second user trial: many kinks and jumps, float32 inside, names ---------------------------


def test_many_kinks_and_jumps_pass_and_bugs_among_them_are_found():
    x = _x(200).detach()
    x[:21] = 0.0
    relu = gradcheck(torch.relu, x.clone().requires_grad_())
    (check,) = relu.inputs
    assert relu.passed and check.verdict == "kink" and check.kinks == 21 and check.complete
    assert relu.evaluations < 200
    jump = gradcheck(lambda t: (t > 0).double() + t.sin(), x.clone().requires_grad_()).inputs[0]
    assert jump.passed and jump.verdict == "kink" and jump.jumps == 21
    assert "the other elements were checked" in jump.cause
    many = _x(4096).detach()
    many[::2] = 0.0  # half the elements at relu's kink, and one wrong column elsewhere
    bad = _sin_function(_one_column)
    check = gradcheck(lambda t: torch.relu(t) + bad.apply(t), many.requires_grad_()).inputs[0]
    assert check.verdict == "fail" and [w.element for w in check.worst if w.kind == "wrong"] == [[1234]]


def test_a_float32_mask_or_constant_is_not_float32_computation():
    bad = _sin_function(lambda gx, x: gx * torch.where(torch.arange(x.numel()) == 3, 1.01, 1.0).to(gx.dtype))
    x = _x(4096).detach()
    x[7] = 0.0
    for fn in (lambda t: bad.apply(t) + torch.zeros(1), lambda t: (t > 0).float() + bad.apply(t)):
        result = gradcheck(fn, x.clone().requires_grad_())
        assert result.working_dtype == "torch.float64" and not result.notes
        assert [w.element for w in result.inputs[0].worst if w.kind == "wrong"] == [[3]]


@pytest.mark.parametrize("n", [10, 1000, 4096])
def test_float32_inside_finds_one_element_wrong_by_3_percent_at_any_size(n):
    bad = _sin_function(lambda gx, x: gx * torch.where(torch.arange(x.numel()) == 3, 1.03, 1.0).to(gx.dtype))
    result = gradcheck(lambda t: bad.apply(t.float()).double(), _x(n))
    assert result.working_dtype == "torch.float32"
    assert [w.element for w in result.inputs[0].worst if w.kind == "wrong"] == [[3]]
    assert gradcheck(lambda t: torch.sin(t.float()).double(), _x(n)).passed


def test_torch_builtins_are_named_torch_sin():
    with pytest.raises(floatscope.UsageError, match="calling torch.sin raised"):
        gradcheck(torch.sin, _x(3), "not a tensor")


def test_a_backward_rounded_to_float16_is_named():
    class HalfBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            ctx.save_for_backward(x)
            return torch.sin(x) * x

        @staticmethod
        def backward(ctx, g):  # noqa: ANN001, ANN205
            (x,) = ctx.saved_tensors
            xh = x.half()
            return ((torch.cos(xh) * xh + torch.sin(xh)) * g.half()).double()

    check = gradcheck(HalfBackward.apply, _x(50)).inputs[0]
    assert check.verdict == "fail" and "looks computed in float16" in check.cause
    # A wrong sign on exactly representable values (-1 for a bias) is not called float16.
    torch.manual_seed(0)
    bias = next(c for c in gradcheck(_Net(), torch.randn(4, 6)).inputs if c.name == "bias")
    assert "float16" not in bias.cause and "bfloat16" not in bias.cause


def test_swapped_and_transposed_gradients_are_named():
    class Swapped(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):  # noqa: ANN001, ANN205
            ctx.save_for_backward(a, b)
            return a * b * b

        @staticmethod
        def backward(ctx, g):  # noqa: ANN001, ANN205
            a, b = ctx.saved_tensors
            return g * 2 * a * b, g * b * b

    result = gradcheck(Swapped.apply, _x(6), _x(6, seed=1))
    assert all("the gradients of input 0 and input 1 look swapped" in c.cause for c in result.inputs)

    class MatMulT(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):  # noqa: ANN001, ANN205
            ctx.save_for_backward(a, b)
            return a @ b

        @staticmethod
        def backward(ctx, g):  # noqa: ANN001, ANN205
            a, b = ctx.saved_tensors
            return (b @ g.T).reshape(a.shape), a.T @ g

    result = gradcheck(MatMulT.apply, _x(3, 5), _x(5, 4, seed=1))
    assert [c.verdict for c in result.inputs] == ["fail", "pass"]
    assert "laid out as its (5, 3) transpose" in result.inputs[0].cause
    assert "look swapped" not in result.inputs[0].cause


def test_report_prints_zero_not_minus_zero_and_matches_the_cli(tmp_path, capsys):
    x = _x(10)
    result = gradcheck(lambda t: t.detach() ** 2 - t * 0.0, x)  # analytic -(1 · 0) = -0.0
    text = str(result)
    assert not result.passed and " -0 " not in text and all(w.analytic == 0.0 for w in result.inputs[0].worst)
    assert all(math.copysign(1.0, w.analytic) == 1.0 for w in result.inputs[0].worst)
    target = tmp_path / "t.py"
    target.write_text(_TARGETS)
    assert cli_main(["gradcheck", f"{target}:bad", "--max-evaluations", "16"]) == 1
    out = capsys.readouterr().out
    assert "budget ran out" in out and "gradcheck FAILED" in out
    assert cli_main(["gradcheck", f"{target}:bad", "--max-evaluations", "10"]) == 2  # below what a check needs
    assert "max_evaluations=10 is below the 15 forward calls" in capsys.readouterr().err


_BROKEN = textwrap.dedent('''
    import torch

    def boom():
        return load_weights()

    def load_weights():
        raise FileNotFoundError("weights.pt not found")

    def model_boom():
        torch.zeros(2) @ torch.zeros(3)
''')


def test_cli_a_factory_that_raises_or_a_syntax_error_exits_2_with_one_line(tmp_path, capsys):
    from floatscope._engines.target import load_target

    target = tmp_path / "broken.py"
    target.write_text(_BROKEN)
    assert cli_main(["gradcheck", f"{target}:boom"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "calling boom()" in err and "FileNotFoundError: weights.pt not found" in err
    assert f"{target}:8" in err  # the raise in load_weights, the user's line
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def f(:\n    pass\n")
    assert cli_main(["gradcheck", f"{syntax}:f"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SyntaxError" in err and f"{syntax}:1" in err
    with pytest.raises(floatscope.UsageError, match=r"calling model_boom\(\).*RuntimeError.*broken\.py:11"):
        load_target(f"{target}:model_boom")


def _off_at_0(gx, x):  # noqa: ANN001, ANN202
    gx = gx.clone()
    gx[0] = gx[0] * _off_at_0.factor
    return gx


_off_at_0.factor = 1.05
_SinSquareOff = _sin_function(_off_at_0)  # sin(u) whose backward is off by a factor at element 0 (u = x·x)


@pytest.mark.parametrize("n, factor", [(1, 1.05), (10, 1.05), (100, 1.05), (1000, 1.2), (100, 1.01), (1000, 1.05)])
def test_a_bug_in_a_fast_varying_function_is_not_hidden_by_truncation(n, factor, monkeypatch):
    monkeypatch.setattr(_off_at_0, "factor", factor)
    torch.manual_seed(0)
    x = (100 + torch.rand(n, dtype=torch.float64)).requires_grad_()
    result = gradcheck(lambda t: _SinSquareOff.apply(t * t), x)
    (check,) = result.inputs
    assert not result.passed and check.verdict == "fail" and check.max_ratio > 1, str(result)
    w = check.worst[0]
    xi = float(x[0].detach())
    assert w.element == [0] and w.output == [0] and w.kind == "wrong"
    assert w.numeric == pytest.approx(2 * xi * math.cos(xi * xi), rel=1e-4)
    assert w.analytic == pytest.approx(factor * 2 * xi * math.cos(xi * xi), rel=1e-9)


@pytest.mark.parametrize("centre", [3.0, 100.0, 1000.0])
def test_a_correct_fast_varying_function_still_passes_with_a_consistent_max_ratio(centre):
    g = torch.Generator().manual_seed(1)
    x = (centre + torch.rand(100, generator=g, dtype=torch.float64)).requires_grad_()
    result = gradcheck(lambda t: torch.sin(t * t), x)
    (check,) = result.inputs
    assert result.passed and check.verdict == "pass" and check.max_ratio <= 1, str(result)


def test_max_ratio_agrees_with_the_verdict_on_correct_functions():
    for fn, inputs in [(lambda x: torch.softmax(x, -1), (_x(16, 64),)), (torch.exp, (_x(1000),)),
                       (lambda x: torch.sin(x * x), ((_x(200).detach() * 30).requires_grad_(),))]:
        result = gradcheck(fn, *inputs)
        assert result.passed and all(c.max_ratio <= 1 for c in result.inputs), str(result)


def test_a_budget_below_what_a_check_needs_is_refused():
    x = _x(100)
    with pytest.raises(floatscope.UsageError, match="max_evaluations=5 is below the 15 forward calls"):
        gradcheck(torch.sin, x, max_evaluations=5)
    result = gradcheck(torch.sin, x, max_evaluations=15)
    assert result.passed and result.evaluations <= 15


def test_a_nan_from_the_backward_is_reported_at_its_output():
    def nan_at_50(gx, x):  # noqa: ANN001, ANN202
        gx = gx.clone()
        gx[50] = float("nan")
        return gx

    NanAt50 = _sin_function(nan_at_50)

    for n in (60, 100):
        x = _x(n)
        result = gradcheck(NanAt50.apply, x)
        (check,) = result.inputs
        assert check.verdict == "fail" and "the backward returns NaN" in check.cause, str(result)
        w = check.worst[0]
        assert w.element == [50] and w.output == [50] and math.isnan(w.analytic) and math.isfinite(w.tolerance)
        assert w.numeric == pytest.approx(math.cos(float(x[50].detach())), rel=1e-6)
        data = result.to_dict()["inputs"][0]["worst"][0]
        assert data["analytic"] is None and data["output"] == [50]
