"""The fault library, part 2: NaN/Inf born anywhere in a training step, in scripts of every shape.

Loss checks that stop or skip the step, raw-tensor models, manual updates, ``torch.autograd.grad``
loops, free functions, separately built modules called nested, broken data, broken parameters,
huge-but-finite updates, several optimizers, closures and exact zeros. Each case asserts the op,
phase, module, file:line and step found; each has a healthy counterpart that must stay clean.
Scripts run through ``floatscope run`` (in-process) exactly as a user would run them.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

import floatscope
from conftest import line_of
from floatscope import NonFiniteError
from floatscope._cli.run import EXIT_INCIDENT, run_script


def run(tmp_path: Path, source: str, name: str = "train.py") -> tuple[int, floatscope.RunResult, Path]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    code, result = run_script(path, [], store=None)
    return code, result, path


def assert_found(result, path, *, op, phase, module, marker, step, category=None, model=None):
    incident = result.incident
    assert incident is not None, result
    file, line = line_of(marker, path)
    assert (incident.op, incident.phase, incident.module, incident.step) == (op, phase, module, step), \
        incident.diagnosis()
    assert (incident.file, incident.line) == (file, line), incident.diagnosis()
    if category is not None:
        assert incident.category == category, incident.diagnosis()
    if model is not None:
        assert incident.model == model, incident.diagnosis()
    assert incident.suggestions
    return incident


# --------------------------------------------------------------------------- 1. loss checks that stop or skip
LOSS_CHECK = """
    import sys
    import torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(6):
        x = torch.randn(16, 4)
        y = torch.randint(0, 3, (16,))
        probs = torch.softmax(model(x) * (1e4 if step == 3 else 1.0), dim=-1)
        loss = -torch.log(probs[torch.arange(16), y]).mean()  # MARK:loss
        CHECK
        opt.zero_grad()
        loss.backward()
        opt.step()
"""
CHECKS = {
    "sys.exit(0)": "if torch.isnan(loss) or torch.isinf(loss):\n            print('Loss:', loss.item())\n"
                   "            sys.exit(0)",
    "break": "if not torch.isfinite(loss):\n            break",
    "continue": "if torch.isinf(loss).any():\n            continue",
    "log and go on": "print(f'step {step} loss {loss.item():.4f}')",
    "math.isfinite": "import math\n        if not math.isfinite(loss.item()):\n            raise SystemExit(0)",
}


@pytest.mark.parametrize("check", list(CHECKS))
def test_a_loss_the_script_checks_and_acts_on_is_found_before_backward(tmp_path, check):
    code, result, path = run(tmp_path, LOSS_CHECK.replace("CHECK", CHECKS[check]))
    assert code == EXIT_INCIDENT and result.status == "nonfinite"
    incident = assert_found(result, path, op="aten.log.default", phase="forward", module=None,
                            marker="MARK:loss", step=3, category="underflow")
    assert "log_softmax" in " ".join(incident.suggestions)
    assert result.steps == 3  # iterations 0-2 completed


def test_a_loop_that_checks_its_finite_loss_stays_clean(tmp_path):
    source = LOSS_CHECK.replace("* (1e4 if step == 3 else 1.0)", "").replace("CHECK", CHECKS["sys.exit(0)"])
    code, result, _ = run(tmp_path, source)
    assert (code, result.status, result.steps) == (0, "clean", 6)
    assert result.watched["reads"] >= 6


# --------------------------------------------------------------------------- 2. raw-tensor models
RAW_LOGISTIC = """
    import torch
    torch.manual_seed(0)
    X = torch.randn(64, 4) * SCALE
    y = (X[:, 0] > 0).float().unsqueeze(1)
    W = torch.randn(4, 1, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([W, b], lr=1.0)
    for step in range(50):
        p = torch.sigmoid(X @ W + b)
        loss = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()  # MARK:bce
        opt.zero_grad()
        loss.backward()
        opt.step()
"""


def test_raw_tensor_logistic_regression_names_the_log_line(tmp_path):
    code, result, path = run(tmp_path, RAW_LOGISTIC.replace("SCALE", "10"))
    assert code == EXIT_INCIDENT
    incident = assert_found(result, path, op="aten.log.default", phase="forward", module=None,
                            marker="MARK:bce", step=1, category="underflow")
    assert incident.model is None and "binary_cross_entropy_with_logits" in " ".join(incident.suggestions)
    assert incident.exact


def test_raw_tensor_logistic_regression_that_trains_is_clean(tmp_path):
    code, result, _ = run(tmp_path, RAW_LOGISTIC.replace("SCALE", "1").replace("lr=1.0", "lr=0.5"))
    assert (code, result.status, result.steps) == (0, "clean", 50)
    assert result.watched["models"] == 0 and result.watched["calls"] > 0


def test_raw_softmax_regression_with_a_manual_cross_entropy(tmp_path):
    # A textbook softmax regression written with raw tensors, without max subtraction.
    code, result, path = run(tmp_path, """
        import torch
        torch.manual_seed(0)
        X = torch.randn(32, 5)
        y = torch.randint(0, 3, (32,))
        W = torch.randn(5, 3, requires_grad=True)
        opt = torch.optim.SGD([W], lr=0.1)
        for step in range(4):
            logits = X @ W * (100.0 if step == 2 else 1.0)
            e = torch.exp(logits)  # MARK:exp
            p = e / e.sum(dim=1, keepdim=True)
            loss = -torch.log(p[torch.arange(32), y]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    """)
    assert code == EXIT_INCIDENT
    assert_found(result, path, op="aten.exp.default", phase="forward", module=None, marker="MARK:exp", step=2,
                 category="overflow")


# --------------------------------------------------------------------------- 3. no torch.optim
MANUAL_POLY = """
    import torch
    torch.manual_seed(0)
    x = torch.linspace(-3, 3, 200).unsqueeze(1)
    y = torch.sin(x)
    a, b, c, d = (torch.randn((), requires_grad=True) for _ in range(4))
    for t in range(STEPS):
        y_pred = a + b * x + c * x ** 2 + d * x ** 3
        loss = (y_pred - y).pow(2).sum()  # MARK:poly-loss
        loss.backward()
        with torch.no_grad():
            for p in (a, b, c, d):
                p -= LR * p.grad  # MARK:update
                p.grad = None
"""


def _first_nonfinite_poly_step(lr: float, steps: int) -> int | None:
    torch.manual_seed(0)
    x = torch.linspace(-3, 3, 200).unsqueeze(1)
    y = torch.sin(x)
    a, b, c, d = (torch.randn((), requires_grad=True) for _ in range(4))
    for t in range(steps):
        loss = (a + b * x + c * x ** 2 + d * x ** 3 - y).pow(2).sum()
        if not torch.isfinite(loss):
            return t
        loss.backward()
        with torch.no_grad():
            for p in (a, b, c, d):
                p -= lr * p.grad
                p.grad = None
    return None


def test_manual_updates_count_iterations_and_find_the_diverging_step(tmp_path):
    oracle = _first_nonfinite_poly_step(0.1, 40)
    assert oracle is not None and oracle > 2
    code, result, path = run(tmp_path, MANUAL_POLY.replace("STEPS", "40").replace("LR", "0.1"))
    assert code == EXIT_INCIDENT
    incident = assert_found(result, path, op="aten.pow.Tensor_Scalar", phase="forward", module=None,
                            marker="MARK:poly-loss", step=oracle, category="overflow")
    assert "diverging" in incident.explanation
    assert result.watched["manual_updates"] == 4 * oracle


def test_manual_updates_that_train_are_clean_and_counted(tmp_path):
    code, result, _ = run(tmp_path, MANUAL_POLY.replace("STEPS", "30").replace("LR", "1e-5"))
    assert (code, result.status, result.steps) == (0, "clean", 30)
    assert result.watched["optimizer_steps"] == 0 and result.watched["manual_updates"] == 120


def test_a_manual_update_that_makes_the_nan_is_the_optimizer_phase(tmp_path):
    code, result, path = run(tmp_path, """
        import torch
        torch.manual_seed(0)
        W = torch.randn(3, 3, requires_grad=True)
        x = torch.randn(8, 3)
        for step in range(4):
            loss = (x @ W).relu().sum() * (0.0 if step == 2 else 1.0)
            loss.backward()
            with torch.no_grad():
                W -= 0.1 * W.grad / W.grad.norm()  # MARK:normalised-update
                W.grad.zero_()
    """)
    assert code == EXIT_INCIDENT
    incident = assert_found(result, path, op="aten.div.Tensor", phase="optimizer", module=None,
                            marker="MARK:normalised-update", step=2, category="invalid")
    assert incident.param == "W"


def test_data_preparation_after_a_manual_update_is_the_next_iterations_forward(tmp_path):
    """The batch's normalisation at the top of the loop builds no graph; it follows iteration 2's
    update, so it begins iteration 3 (not the end of iteration 2), in the forward phase."""
    code, result, path = run(tmp_path, """
        import torch
        torch.manual_seed(0)
        W = torch.randn(4, 1, requires_grad=True)
        for it in range(6):
            x = torch.randn(8, 4) if it != 3 else torch.ones(8, 4)
            x = (x - x.mean(0)) / x.std(0)  # MARK:normalise
            loss = (x @ W).pow(2).mean()
            loss.backward()
            with torch.no_grad():
                W -= 0.1 * W.grad
                W.grad = None
    """)
    assert code == EXIT_INCIDENT
    assert_found(result, path, op="aten.div.Tensor", phase="forward", module=None, marker="MARK:normalise",
                 step=3, category="invalid")
    assert result.steps == 3


# Linear regression with raw tensors and two hand-written updates per step; lr 1e39 (inf in float32) at step 2.
TWO_UPDATES = """
    import torch
    torch.manual_seed(0)
    X, Y = torch.randn(20, 3), torch.randn(20, 1)
    W = torch.zeros(3, 1, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    for epoch in range(5):
        loss = ((X @ W + b - Y) ** 2).mean()
        loss.backward()
        with torch.no_grad():
            lr = 1e39 if epoch == 2 else 0.1
            UPDATES
"""


def _two_updates(tmp_path, *lines: str):
    return run(tmp_path, TWO_UPDATES.replace("UPDATES", "\n            ".join(lines)))


def test_two_hand_written_updates_that_both_overflow_name_the_first_and_its_parameter(tmp_path):
    code, result, path = _two_updates(tmp_path, "W -= lr * W.grad  # MARK:W-update", "b -= lr * b.grad",
                                      "W.grad = None", "b.grad = None")
    assert code == EXIT_INCIDENT
    incident = assert_found(result, path, op="aten.mul.Tensor", phase="optimizer", module=None,
                            marker="MARK:W-update", step=2, category="overflow")
    assert incident.param == "W" and incident.exact


def test_a_second_manual_update_whose_gradient_is_zeroed_later_is_not_claimed_exact(tmp_path):
    """The update of b runs in a window of its own (W's update came before it); the script zeroes
    b.grad after it, so a replay can no longer see the gradient the update read. The incident names
    the update's line and step and says what it could not replay; it never invents an origin."""
    code, result, path = _two_updates(tmp_path, "W -= 0.1 * W.grad", "b -= lr * b.grad  # MARK:b-update",
                                      "W.grad.zero_()", "b.grad.zero_()")
    assert code == EXIT_INCIDENT
    incident = result.incident
    file, line = line_of("MARK:b-update", path)
    assert (incident.file, incident.line, incident.step, incident.kind) == (file, line, 2, "inf"), incident.diagnosis()
    assert not incident.exact
    assert f"not replayed: the mul at {file}:{line} (an input was changed in place after it ran)" in \
        incident.explanation


def test_an_autograd_grad_loop_without_optimizer(tmp_path):
    code, result, path = run(tmp_path, """
        import torch
        def energy(z):
            return (z ** 2).sum() + torch.log(z.abs().sum() - 10.0)  # MARK:energy
        z = torch.full((4,), 3.0, requires_grad=True)
        for i in range(50):
            g, = torch.autograd.grad(energy(z), z)
            z = (z - 0.05 * g).detach().requires_grad_()
    """)
    z = torch.full((4,), 3.0, requires_grad=True)  # oracle: the first iteration whose energy is NaN
    oracle = None
    for i in range(50):
        e = (z ** 2).sum() + torch.log(z.abs().sum() - 10.0)
        if torch.isnan(e):
            oracle = i
            break
        g, = torch.autograd.grad(e, z)
        z = (z - 0.05 * g).detach().requires_grad_()
    assert oracle is not None
    assert code == EXIT_INCIDENT
    incident = assert_found(result, path, op="aten.log.default", phase="forward", module=None,
                            marker="MARK:energy", step=oracle, category="invalid")
    assert "negative" in incident.explanation


def test_a_free_function_called_outside_forward(tmp_path):
    code, result, path = run(tmp_path, """
        import torch
        def attention(q, k, v, temperature):
            scores = q @ k.transpose(-2, -1) / temperature
            return torch.exp(scores) @ v  # MARK:free-exp
        torch.manual_seed(0)
        proj = torch.nn.Linear(8, 24)
        opt = torch.optim.Adam(proj.parameters(), lr=1e-3)
        for step in range(4):
            q, k, v = proj(torch.randn(2, 5, 8)).chunk(3, dim=-1)
            out = attention(q, k, v, 1e-3 if step == 1 else 1.0)
            loss = out.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    """)
    assert code == EXIT_INCIDENT
    assert_found(result, path, op="aten.exp.default", phase="forward", module=None, marker="MARK:free-exp", step=1,
                 category="overflow")


# --------------------------------------------------------------------------- 4. nested, separately built modules
NESTED = """
    import torch
    class AttnPool(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.score = torch.nn.Linear(d, 1)
        def forward(self, x, mask):
            s = self.score(x).squeeze(-1).masked_fill(~mask, float("-inf"))
            w = torch.softmax(s, dim=-1)  # MARK:softmax
            return (w.unsqueeze(-1) * x).sum(1)
    torch.manual_seed(0)
    pool = AttnPool(8)
    head = torch.nn.Linear(8, 2)
    opt = torch.optim.Adam(list(pool.parameters()) + list(head.parameters()), lr=1e-3)
    for step in range(5):
        x = torch.randn(4, 6, 8)
        mask = torch.ones(4, 6, dtype=torch.bool)
        mask[0, 4:] = False  # ordinary padding: never blamed
        if step == 2 and BUG:
            mask[1] = False  # a sample that is all padding
        out = head(pool(x, mask))
        loss = torch.nn.functional.cross_entropy(out, torch.randint(0, 2, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
"""


def test_nested_modules_blame_the_inner_softmax_not_the_outer_input(tmp_path):
    code, result, path = run(tmp_path, NESTED.replace("BUG", "True"))
    assert code == EXIT_INCIDENT
    incident = assert_found(result, path, op="aten._softmax.default", phase="forward", module="",
                            marker="MARK:softmax", step=2, category="invalid", model="AttnPool")
    assert "mask" in incident.explanation


def test_nested_modules_with_ordinary_padding_are_clean(tmp_path):
    code, result, _ = run(tmp_path, NESTED.replace("BUG", "False"))
    assert (code, result.status, result.steps) == (0, "clean", 5)
    assert result.watched["models"] == 2


# --------------------------------------------------------------------------- 5. broken data
def test_an_inf_in_the_batch_that_a_linear_turns_into_nan_is_the_input():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(NonFiniteError) as info:
        with floatscope.watch(model, opt, store=None):
            for step in range(4):
                x = torch.randn(8, 4)
                if step == 2:
                    x[3, 1] = float("inf")
                loss = model(x).pow(2).mean()  # MARK:inf-batch
                opt.zero_grad()
                loss.backward()
                opt.step()
    incident = info.value.incident
    assert (incident.op, incident.phase, incident.category, incident.step) == ("<input>", "forward", "input", 2)
    assert (incident.file, incident.line) == line_of("MARK:inf-batch")
    assert incident.operands[0].inf == 1 and incident.operands[0].shape == [8, 4]
    assert "module '2'" in incident.explanation  # where the Inf became NaN


def test_a_batch_from_a_dataloader_with_nan_is_the_input(tmp_path):
    code, result, path = run(tmp_path, """
        import torch
        data = torch.randn(64, 4)
        data[37, 2] = float("nan")  # a missing value in the dataset
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data, torch.randn(64, 1)),
                                             batch_size=16)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for x, y in loader:
            loss = ((model(x) - y) ** 2).mean()  # MARK:loader-batch
            opt.zero_grad()
            loss.backward()
            opt.step()
    """)
    assert code == EXIT_INCIDENT
    incident = assert_found(result, path, op="<input>", phase="forward", module="", marker="MARK:loader-batch",
                            step=2, category="input")
    assert incident.operands[0].nan == 1


# --------------------------------------------------------------------------- 6. broken parameters
def test_a_nan_parameter_from_a_checkpoint_is_named_before_the_first_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    with torch.no_grad():
        model[2].weight[0, 3] = float("nan")  # a corrupt checkpoint, loaded before watching
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(NonFiniteError) as info:
        with floatscope.watch(model, opt, store=None):
            for _ in range(3):
                loss = model(torch.randn(8, 4)).pow(2).mean()  # MARK:first-use
                opt.zero_grad()
                loss.backward()
                opt.step()
    incident = info.value.incident
    assert (incident.op, incident.category, incident.param, incident.module, incident.step) == (
        "<parameter>", "parameter", "2.weight", "2", 0)
    assert (incident.file, incident.line) == line_of("MARK:first-use")
    assert incident.operands[0].nan == 1 and "checkpoint" in " ".join(incident.suggestions)


def test_an_inf_written_by_nn_init_before_the_first_call_names_the_init_line(tmp_path):
    """Under floatscope run the watch is on before the model exists: its initialisation is recorded
    (nn.init passes its tensor as a keyword), and the parameter's incident names the write."""
    code, result, path = run(tmp_path, """
        import torch
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.nn.init.constant_(model[2].bias, float("inf"))  # MARK:init
        for step in range(3):
            loss = model(torch.randn(16, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    """)
    assert code == EXIT_INCIDENT
    incident = assert_found(result, path, op="<parameter>", phase="forward", module="2", marker="MARK:init",
                            step=0, category="parameter")
    assert incident.param == "2.bias"
    assert "constant_ wrote these values into it" in incident.explanation


@pytest.mark.parametrize("first, second, marked", [
    ('torch.nn.init.constant_(net[0].weight, float("inf"))', "torch.nn.init.zeros_(net[0].bias)", 1),
    ("torch.nn.init.xavier_uniform_(net[0].weight)", 'torch.nn.init.constant_(net[0].weight, float("nan"))', 2),
    ('torch.nn.init.normal_(net[0].weight, mean=float("nan"))', "pass", 1),
])
def test_initialisation_calls_are_not_a_raw_tensor_model(tmp_path, first, second, marked):
    """nn.init.* on a parameter (in place, under no_grad inside) neither registers it as a raw tensor
    (which named it tensor(7, 5)) nor hides the write that broke it (a second init of the same tensor)."""
    lines = [first + ("  # MARK:broken" if marked == 1 else ""), second + ("  # MARK:broken" if marked == 2 else "")]
    code, result, path = run(tmp_path, f"""
        import torch
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
        {lines[0]}
        {lines[1]}
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)
        for it in range(3):
            loss = ((net(torch.randn(4, 5)) - torch.randn(4, 2)) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    """)
    assert code == EXIT_INCIDENT
    incident = assert_found(result, path, op="<parameter>", phase="forward", module="0", marker="MARK:broken",
                            step=0, category="parameter")
    assert incident.param == "0.weight"


def test_a_checkpoint_loaded_with_nan_inside_the_script_names_the_load(tmp_path):
    code, result, path = run(tmp_path, """
        import torch
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        state = model.state_dict()
        state["2.weight"][0, 3] = float("nan")
        model.load_state_dict(state)  # MARK:load
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for step in range(4):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    """)
    assert code == EXIT_INCIDENT
    incident = assert_found(result, path, op="<parameter>", phase="forward", module="2", marker="MARK:load",
                            step=0, category="parameter")
    assert incident.param == "2.weight"


def test_a_checkpoint_file_with_nan_names_the_parameter_and_the_load_line(tmp_path):
    # torch.load fills uninitialised tensors behind the dispatcher: their values are data, not computed,
    # and load_state_dict's copy_ into the parameter is a write the next forward's check names.
    bad = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 10))
    state = {k: v.clone() for k, v in bad.state_dict().items()}
    state["3.weight"][2, 17] = float("nan")
    torch.save(state, tmp_path / "ckpt.pt")
    code, result, path = run(tmp_path, f"""
        import torch
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                    torch.nn.Linear(144, 10))
        model.load_state_dict(torch.load({str(tmp_path / "ckpt.pt")!r}))  # MARK:torch-load
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for step in range(5):
            x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    """)
    assert code == EXIT_INCIDENT
    incident = assert_found(result, path, op="<parameter>", phase="forward", module="3", marker="MARK:torch-load",
                            step=0, category="parameter", model="Sequential")
    assert incident.param == "3.weight" and incident.operands[0].nan == 1
    assert "NaN in parameter '3.weight' before step 0" in incident.diagnosis()


def test_a_checkpoint_file_without_nan_loads_and_trains_clean(tmp_path):
    good = torch.nn.Linear(6, 2)
    torch.save(good.state_dict(), tmp_path / "ok.pt")
    code, result, _ = run(tmp_path, f"""
        import torch
        model = torch.nn.Linear(6, 2)
        model.load_state_dict(torch.load({str(tmp_path / "ok.pt")!r}))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for step in range(4):
            loss = model(torch.randn(8, 6)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    """)
    assert (code, result.status, result.steps, result.contained) == (0, "clean", 4, [])


# --------------------------------------------------------------------------- optimizer state
ADAM_OUTLIER = """
    import torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(10):
        x = torch.randn(16, 4)
        if step == 3:
            x[0] = SCALE  # one unnormalised sample
        loss = (model(x) - 1).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()  # MARK:adam-step
"""


def test_adam_second_moment_overflow_that_freezes_weights_is_an_optimizer_incident(tmp_path):
    # Gradients ~1e30 are finite, the weights stay finite, but exp_avg_sq = (1-beta2) g^2 is Inf from then
    # on and exp_avg / sqrt(inf) = 0: those weights stop training. Plain PyTorch shows nothing.
    code, result, path = run(tmp_path, ADAM_OUTLIER.replace("SCALE", "3e30"))
    assert code == EXIT_INCIDENT
    incident = assert_found(result, path, op="Adam.step", phase="optimizer", module="0", marker="MARK:adam-step",
                            step=3, category="optimizer", model="Sequential")
    assert incident.param == "0.weight" and incident.output.inf > 0
    assert "exp_avg_sq" in incident.explanation and "stopped training" in incident.explanation
    assert any(line.startswith("exp_avg_sq:") for line in incident.optimizer_state)


def test_a_large_but_representable_outlier_keeps_adam_clean(tmp_path):
    code, result, _ = run(tmp_path, ADAM_OUTLIER.replace("SCALE", "1e6"))
    assert (code, result.status, result.steps) == (0, "clean", 10)


EMBEDDING_EPS0 = """
    import torch
    torch.manual_seed(0)
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.enc = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 2)
        def forward(self, ids):
            return self.enc(self.emb(ids).mean(1))
    m = M()
    opt_enc = torch.optim.SGD(m.enc.parameters(), lr=0.1)
    opt_emb = torch.optim.Adam(m.emb.parameters(), lr=1e-3, eps=ADAM_EPS)
    for step in range(STEPS):
        ids = torch.randint(0, 10, (16, 5))  # rows 10..49 are never used: their gradients are exactly 0
        loss = torch.nn.functional.cross_entropy(m(ids), torch.randint(0, 2, (16,)))
        opt_enc.zero_grad(); opt_emb.zero_grad()
        loss.backward()
        opt_enc.step(); opt_emb.step()  # MARK:steps
"""


@pytest.mark.parametrize("steps", [3, 10])
def test_adam_eps_zero_on_unused_embedding_rows_is_named_at_its_first_step(tmp_path, steps):
    # The NaN rows are never used by a forward, so no loss or gradient shows them: the parameter check
    # after the first steps finds them, at the step that wrote them, with the 0/0 of zero gradients.
    code, result, path = run(tmp_path, EMBEDDING_EPS0.replace("ADAM_EPS", "0.0").replace("STEPS", str(steps)))
    assert code == EXIT_INCIDENT
    incident = assert_found(result, path, op="Adam.step", phase="optimizer", module="emb", marker="MARK:steps",
                            step=0, category="optimizer", model="M")
    assert incident.param == "emb.weight" and incident.output.nan == 320
    assert "exactly 0" in incident.explanation and "0/0" in incident.explanation
    assert "flush" not in incident.explanation and "autocast" not in " ".join(incident.suggestions)
    assert "eps=1e-8" in incident.suggestions[0]


def test_adam_with_its_default_eps_on_unused_embedding_rows_is_clean(tmp_path):
    code, result, _ = run(tmp_path, EMBEDDING_EPS0.replace("ADAM_EPS", "1e-8").replace("STEPS", "10"))
    assert (code, result.status, result.steps) == (0, "clean", 10)


# --------------------------------------------------------------------------- manual updates on modules
TWO_HEADS = """
    import torch
    torch.manual_seed(0)
    class TwoHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)
        def forward(self, x, use_b):
            h = torch.tanh(self.body(x))
            return self.b(h) if use_b else self.a(h)
    model = TwoHead()
    for step in range(6):
        loss = model(torch.randn(16, 4), use_b=(step % 2 == 1)).pow(2).mean()
        model.zero_grad(set_to_none=False)  # the unused head keeps an all-zero gradient
        loss.backward()
        for p in model.parameters():
            if p.grad is not None:
                UPDATE
"""
UPDATES = {
    "p.data.add_": "p.data.add_(-0.1 * p.grad / p.grad.norm())  # MARK:normalised",
    "no_grad -=": "with torch.no_grad():\n                    p -= 0.1 * p.grad / p.grad.norm()  # MARK:normalised",
}


@pytest.mark.parametrize("update", list(UPDATES))
def test_a_normalised_manual_update_of_a_zero_gradient_is_the_division(tmp_path, update):
    # The NaN is made after the first parameters were already updated: the update-phase calls are
    # replayed on their own (they read gradients, not the changed weights).
    code, result, path = run(tmp_path, TWO_HEADS.replace("UPDATE", UPDATES[update]))
    assert code == EXIT_INCIDENT
    incident = assert_found(result, path, op="aten.div.Tensor", phase="optimizer", module=None,
                            marker="MARK:normalised", step=1, category="invalid")
    assert incident.exact and "0/0" in incident.explanation
    assert incident.param == "a.weight"


def test_a_normalised_manual_update_with_an_epsilon_is_clean(tmp_path):
    code, result, _ = run(tmp_path, TWO_HEADS.replace(
        "UPDATE", "p.data.add_(-0.1 * p.grad / (p.grad.norm() + 1e-8))"))
    assert (code, result.status, result.steps) == (0, "clean", 6)


# --------------------------------------------------------------------------- contained infinities
LOG_PRIOR = """
    import torch
    import torch.nn.functional as F
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (1000,))                      # class 4 never occurs
    prior = torch.bincount(labels, minlength=5).float() / 1000
    log_prior = torch.log(prior)                              # MARK:log-prior
    model = torch.nn.Linear(10, 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(8):
        idx = torch.randint(0, 1000, (32,))
        y = labels[idx]
        BREAK
        logits = model(torch.randn(32, 10)) + log_prior
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
"""


def test_an_infinity_the_loss_absorbs_is_a_note_not_an_incident(tmp_path):
    # Logit adjustment with a log class prior: log(0) = -inf for the unseen class; cross_entropy gives it
    # probability 0 and gradient 0, so plain PyTorch trains fine. The run is clean, with a note.
    code, result, path = run(tmp_path, LOG_PRIOR.replace("BREAK", "pass"))
    assert (code, result.status, result.steps) == (0, "clean", 8)
    [note] = result.contained
    assert (note.op, note.phase, note.category, note.kind) == ("aten.log.default", "forward", "division-by-zero",
                                                                "inf")
    assert (note.file, note.line) == line_of("MARK:log-prior", path)
    assert "zero numerator" in note.explanation
    assert result.to_dict()["contained"][0]["op"] == "aten.log.default"


def test_an_infinity_made_before_the_loop_that_reaches_the_loss_later_is_blamed_where_it_was_made(tmp_path):
    # The unseen class turns up at step 5: the -inf logit is now the target's, the loss is inf.
    code, result, path = run(tmp_path, LOG_PRIOR.replace("BREAK", "y[0] = 4 if step == 5 else y[0]"))
    assert code == EXIT_INCIDENT
    incident = assert_found(result, path, op="aten.log.default", phase="forward", module=None,
                            marker="MARK:log-prior", step=0, category="division-by-zero")
    assert "reached" in incident.consequence and "step 5" in incident.consequence
    assert result.steps == 5


def test_a_where_that_masks_a_log_of_zero_trains_clean(tmp_path):
    # torch.where(x > 0, log(x), 0) with ReLU outputs: log(0) = -inf in the unused branch; the final
    # ReLU's backward masks the 0 * inf gradient, so every gradient stays finite.
    code, result, path = run(tmp_path, """
        import torch
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1), torch.nn.ReLU())
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for step in range(6):
            rate = model(torch.randn(16, 3))
            loss = -torch.where(rate > 0, torch.log(rate), torch.zeros_like(rate)).mean()  # MARK:where-log
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    """)
    assert (code, result.status, result.steps) == (0, "clean", 6)
    assert [(c.op, c.line) for c in result.contained] == [("aten.log.default", line_of("MARK:where-log", path)[1])]


def test_a_where_around_a_log_whose_gradient_is_nan_names_the_log_and_the_backward(tmp_path):
    # The torch.where gradient trap: the masked branch's log(0) = -inf gets gradient 0, and LogBackward's
    # 0 / 0 is NaN. The advice must put the safe value inside the log, not wrap the log in another where.
    code, result, path = run(tmp_path, """
        import torch
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1),
                                    torch.nn.Softplus())
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for step in range(3):
            observed = (torch.rand(32, 1) > 0.2).float()
            rate = model(torch.randn(32, 4)) * observed
            safe_log = torch.where(rate > 0, torch.log(rate), torch.zeros_like(rate))  # MARK:where-log
            loss = (safe_log ** 2 * observed).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    """)
    assert code == EXIT_INCIDENT
    incident = assert_found(result, path, op="aten.log.default", phase="forward", module=None,
                            marker="MARK:where-log", step=0, category="division-by-zero")
    assert "LogBackward0 in backward" in incident.consequence
    assert "torch.log(torch.where(keep, p, 1.0))" in incident.suggestions[0]
    assert "torch.where(keep, torch.log" not in " ".join(incident.suggestions)


def test_a_contained_value_carried_through_a_cat_and_a_scaling_is_blamed_where_it_was_made(tmp_path):
    # speed = dist / dur with one zero duration: the Inf sits in a feature table (cat, then scaled) and
    # reaches the loss only when its row's batch comes up, at step 1.
    code, result, path = run(tmp_path, """
        import torch
        torch.manual_seed(0)
        dist, dur = torch.rand(128, 1) * 10, torch.rand(128, 1) + 0.1
        dur[37] = 0.0
        speed = dist / dur  # MARK:speed
        X = torch.cat([speed, dist], 1) * 0.5
        Y = torch.randn(128, 1)
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        for step in range(4):
            rows = slice(step * 32, (step + 1) * 32)
            loss = torch.nn.functional.mse_loss(model(X[rows]), Y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    """)
    assert code == EXIT_INCIDENT
    incident = assert_found(result, path, op="aten.div.Tensor", phase="forward", module=None, marker="MARK:speed",
                            step=0, category="division-by-zero")
    assert "step 1" in incident.consequence
    assert result.steps == 1


def test_cross_entropy_over_a_batch_whose_labels_are_all_ignored_is_explained(tmp_path):
    # A collator that masks every label with -100 (a prompt-only batch): the mean over zero targets is 0/0.
    code, result, path = run(tmp_path, """
        import torch
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 10)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(4):
            labels = torch.randint(0, 10, (16,))
            if step == 2:
                labels[:] = -100
            loss = torch.nn.functional.cross_entropy(model(torch.randn(16, 8)), labels)  # MARK:ce
            opt.zero_grad()
            loss.backward()
            opt.step()
    """)
    assert code == EXIT_INCIDENT
    incident = assert_found(result, path, op="aten.nll_loss_forward.default", phase="forward", module=None,
                            marker="MARK:ce", step=2, category="invalid")
    assert "all 16 targets equal ignore_index=-100" in incident.explanation
    assert "clamp_min(1)" in incident.suggestions[1]


def test_class_weights_from_integer_counts_are_a_division_by_zero(tmp_path):
    # counts.float() of an integer count of 0 is an exact zero, not an underflow.
    code, result, path = run(tmp_path, """
        import torch
        torch.manual_seed(0)
        labels = torch.randint(0, 4, (500,))
        counts = torch.bincount(labels, minlength=5).float()
        class_w = counts.sum() / counts  # MARK:class-weights
        model = torch.nn.Linear(10, 5)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(6):
            idx = torch.randint(0, 500, (16,))
            y = labels[idx]
            if step == 4:
                y[0] = 4  # the class the counts never saw
            loss = torch.nn.functional.cross_entropy(model(torch.randn(16, 10)), y, weight=class_w)
            opt.zero_grad()
            loss.backward()
            opt.step()
    """)
    assert code == EXIT_INCIDENT
    incident = assert_found(result, path, op="aten.div.Tensor", phase="forward", module=None,
                            marker="MARK:class-weights", step=0, category="division-by-zero")
    assert "step 4" in incident.consequence


# --------------------------------------------------------------------------- 7. huge but finite updates
def test_a_huge_finite_update_is_not_an_optimizer_incident_the_next_forward_is():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteError) as info:
        with floatscope.watch(model, opt, store=None):
            for step in range(5):
                x = torch.randn(8, 4)
                if step == 1:
                    x[0] = 1e18  # gradients ~4e34: finite, but their L2 norm overflows float32
                loss = model(x).pow(2).mean()  # MARK:huge
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step == 1:
                    assert all(torch.isfinite(p).all() for p in model.parameters())
                    assert max(float(p.abs().max()) for p in model.parameters()) > 1e33
    incident = info.value.incident
    assert (incident.op, incident.phase, incident.module, incident.step, incident.category) == (
        "aten.addmm.default", "forward", "2", 2, "overflow")
    assert (incident.file, incident.line) == line_of("MARK:huge")


# --------------------------------------------------------------------------- 8. several optimizers
GAN = """
    import torch
    torch.manual_seed(0)
    G = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    D = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3)
    for it in range(10):
        real = torch.randn(32, 2)
        fake = G(torch.randn(32, 4))
        d_loss = -(torch.log(torch.sigmoid(D(real))) + torch.log(1 - torch.sigmoid(D(fake.detach())))).mean()
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        scale = 1e4 if it == BUG_AT else 1.0
        g_loss = -torch.log(torch.sigmoid(-D(fake).abs() * scale)).mean()  # MARK:gloss
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
"""


def test_a_gan_bug_at_iteration_7_is_reported_at_step_7(tmp_path):
    code, result, path = run(tmp_path, GAN.replace("BUG_AT", "7"))
    assert code == EXIT_INCIDENT
    assert_found(result, path, op="aten.log.default", phase="forward", module=None, marker="MARK:gloss", step=7,
                 category="underflow")


def test_a_gan_counts_one_step_per_iteration(tmp_path):
    code, result, _ = run(tmp_path, GAN.replace("BUG_AT", "-1"))
    assert (code, result.status, result.steps) == (0, "clean", 10)
    assert result.watched["optimizer_steps"] == 20


ACCUMULATION = """
    import torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(5):
        opt.zero_grad()
        for micro in range(4):
            x = torch.randn(8, 4)
            out = model(x)
            if step == 3 and micro == 2 and BUG:
                out = out * torch.tensor(float("inf"))
            loss = torch.log(out.pow(2).mean()) / 4  # MARK:micro-loss
            loss.backward()
        opt.step()
"""


def test_gradient_accumulation_counts_one_step_per_optimizer_step(tmp_path):
    code, result, _ = run(tmp_path, ACCUMULATION.replace("BUG", "False"))
    assert (code, result.status, result.steps) == (0, "clean", 5)
    assert result.watched["backward"] == 20 and result.watched["model_calls"] == 20


def test_a_nan_in_micro_batch_3_of_step_3_is_step_3(tmp_path):
    code, result, path = run(tmp_path, ACCUMULATION.replace("BUG", "True"))
    assert code == EXIT_INCIDENT
    incident = result.incident
    assert (incident.step, incident.phase, incident.category) == (3, "forward", "input")
    assert (incident.file, incident.line) == line_of("out = out * torch.tensor", path)


def test_a_data_side_op_after_an_earlier_micro_batch_backward_is_the_forward_phase(tmp_path):
    """torch.log of labels builds no graph and runs after micro-batch 0's backward: it is data (the
    forward phase) of step 1, not part of the optimizer's update."""
    code, result, path = run(tmp_path, """
        import torch
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for i in range(12):
            x, y = torch.randn(4, 3), torch.rand(4, 1)
            if i == 5:
                y = torch.zeros(4, 1)
            loss = (model(x) - torch.log(y)).pow(2).mean() / 4  # MARK:log-labels
            loss.backward()
            if i % 4 == 3:
                opt.step()
                opt.zero_grad()
    """)
    assert code == EXIT_INCIDENT
    assert_found(result, path, op="aten.log.default", phase="forward", module=None, marker="MARK:log-labels",
                 step=1, category="division-by-zero")


def test_a_manual_loop_after_an_optimizer_loop_counts_its_iterations(tmp_path):
    """50 torch.optim steps, then hand-written updates: iteration 10 of the second loop is step 60."""
    code, result, path = run(tmp_path, """
        import torch
        torch.manual_seed(0)
        X = torch.randn(32, 3)
        Y = X.sum(1, keepdim=True)
        V = torch.zeros(3, 1, requires_grad=True)
        opt = torch.optim.SGD([V], lr=0.05)
        for epoch in range(50):
            loss = ((X @ V - Y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        for epoch in range(20):
            loss = ((X @ V - Y) ** 2).mean()
            loss.backward()
            with torch.no_grad():
                V -= 0.05 * V.grad / (V.grad.norm() * (0.0 if epoch == 10 else 1.0))  # MARK:manual
                V.grad = None
    """)
    assert code == EXIT_INCIDENT
    incident = assert_found(result, path, op="aten.div.Tensor", phase="optimizer", module=None, marker="MARK:manual",
                            step=60, category="division-by-zero")
    assert incident.param == "V"


def _counted_steps(tmp_path, source: str) -> int:
    code, result, _ = run(tmp_path, source)
    assert code == 0 and result.status == "clean", result
    return result.steps


def test_weights_written_by_hand_next_to_an_optimizer_step_do_not_count_again(tmp_path):
    """Clamping weights before the step (WGAN-style) or an EMA update after it: one step per iteration."""
    for where in ("before", "after"):
        steps = _counted_steps(tmp_path, f"""
            import torch
            torch.manual_seed(0)
            model = torch.nn.Linear(3, 1)
            shadow = torch.nn.Linear(3, 1)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            for step in range(7):
                loss = model(torch.randn(8, 3)).pow(2).mean() + shadow(torch.randn(8, 3)).sum() * 0
                opt.zero_grad()
                loss.backward()
                if "{where}" == "before":
                    with torch.no_grad():
                        for p in model.parameters():
                            p.clamp_(-0.5, 0.5)
                opt.step()
                if "{where}" == "after":
                    with torch.no_grad():
                        for s, p in zip(shadow.parameters(), model.parameters()):
                            s.mul_(0.9).add_(p, alpha=0.1)
        """)
        assert steps == 7, where


LBFGS = """
    import torch
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    x = torch.randn(32, 3)
    y = x.sum(1, keepdim=True)
    for step in range(6):
        def closure():
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean() + (torch.log(torch.zeros(())) if step == BUG_AT else 0.0)  # MARK:closure
            loss.backward()
            return loss
        opt.step(closure)
"""


def test_a_closure_optimizer_names_the_loss_line_not_the_step(tmp_path):
    code, result, path = run(tmp_path, LBFGS.replace("BUG_AT", "3"))
    assert code == EXIT_INCIDENT
    assert_found(result, path, op="aten.log.default", phase="forward", module=None, marker="MARK:closure", step=3,
                 category="division-by-zero")


def test_an_lbfgs_step_and_its_closure_calls_are_one_iteration(tmp_path):
    code, result, _ = run(tmp_path, LBFGS.replace("BUG_AT", "-1"))
    assert (code, result.status, result.steps) == (0, "clean", 6)
    assert result.watched["backward"] > 6  # LBFGS calls the closure several times per step


# --------------------------------------------------------------------------- 10. exact zeros
WGAN_GP = """
    import torch
    torch.manual_seed(0)
    D = torch.nn.Sequential(torch.nn.Linear(2, 16), ACT, torch.nn.Linear(16, 1))
    G = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optD = torch.optim.Adam(D.parameters(), lr=1e-4, betas=(0.5, 0.9))
    optG = torch.optim.Adam(G.parameters(), lr=1e-4, betas=(0.5, 0.9))
    for step in range(5):
        real, z = torch.randn(64, 2) * 0.1, torch.randn(64, 4)
        fake = G(z).detach()
        alpha = torch.rand(64, 1)
        xhat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        g, = torch.autograd.grad(D(xhat).sum(), xhat, create_graph=True)
        gp = ((NORM - 1) ** 2).mean()  # MARK:gp
        lossD = D(fake).mean() - D(real).mean() + 10 * gp
        optD.zero_grad(); lossD.backward(); optD.step()
        lossG = -D(G(z)).mean()
        optG.zero_grad(); lossG.backward(); optG.step()
"""


def test_a_gradient_penalty_is_part_of_its_iteration(tmp_path):
    # autograd.grad(..., create_graph=True) inside the critic's loss ends nothing: 5 iterations.
    code, result, _ = run(tmp_path, WGAN_GP.replace("ACT", "torch.nn.LeakyReLU(0.2)").replace(
        "NORM", "torch.linalg.vector_norm(g, dim=1)"))
    assert (code, result.status, result.steps) == (0, "clean", 5)


def test_a_hand_written_gradient_norm_at_zero_is_found_in_the_first_iteration(tmp_path):
    # Dead ReLUs give g = 0 for some samples; sqrt's gradient there is infinite. No update ran yet.
    source = WGAN_GP.replace("ACT", "torch.nn.ReLU()").replace("NORM", "torch.sqrt((g ** 2).sum(dim=1))")
    source = source.replace("    for step", "    with torch.no_grad():\n        D[0].bias.fill_(-3.0)\n    for step")
    code, result, path = run(tmp_path, source)
    assert code == EXIT_INCIDENT
    assert_found(result, path, op="aten.sqrt.default", phase="backward", module=None, marker="MARK:gp", step=0)
    assert result.steps == 0


def test_log_of_an_exact_zero_product_is_a_division_by_zero_not_an_underflow(tmp_path):
    code, result, path = run(tmp_path, """
        import torch
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(4):
            p = torch.softmax(model(torch.randn(8, 4)), -1)
            keep = torch.ones(8, 2) if step < 2 else torch.zeros(8, 2)
            loss = -torch.log(p * keep).mean()  # MARK:log-zero
            opt.zero_grad()
            loss.backward()
            opt.step()
    """)
    assert code == EXIT_INCIDENT
    incident = assert_found(result, path, op="aten.log.default", phase="forward", module=None,
                            marker="MARK:log-zero", step=2, category="division-by-zero")
    assert "exact zero" in incident.explanation and "underflow" not in incident.explanation


def test_a_product_of_probabilities_that_underflows_is_still_underflow():
    torch.manual_seed(0)
    p = torch.rand(2, 400) * 0.5 + 0.1

    def fn():
        return torch.log(p.prod(dim=-1))  # MARK:prod-underflow

    incident = floatscope.locate(fn)
    assert incident.category == "underflow" and (incident.file, incident.line) == line_of("MARK:prod-underflow")


# --------------------------------------------------------------------------- healthy counterparts
def test_masks_outside_modules_are_not_incidents(tmp_path):
    code, result, _ = run(tmp_path, """
        import torch
        torch.manual_seed(0)
        proj = torch.nn.Linear(8, 24)
        opt = torch.optim.SGD(proj.parameters(), lr=0.01)
        T = 6
        causal = torch.full((T, T), float("-inf")).triu(1)  # an additive -inf mask, made on purpose
        for step in range(5):
            q, k, v = proj(torch.randn(2, T, 8)).chunk(3, dim=-1)
            scores = q @ k.transpose(-2, -1) + causal
            pad = torch.zeros(2, T, dtype=torch.bool)
            pad[0, 4:] = True
            scores = scores.masked_fill(pad[:, None, :], torch.finfo(scores.dtype).min)
            attn = torch.softmax(scores, dim=-1)
            print("masked scores min", scores.min().item(), "isinf", torch.isinf(scores).any().item())
            loss = (attn @ v).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    """)
    assert (code, result.status, result.steps) == (0, "clean", 5)


def test_an_intended_infinity_that_reaches_the_loss_is_an_incident(tmp_path):
    code, result, path = run(tmp_path, """
        import torch
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for step in range(3):
            scores = model(torch.randn(5, 4))
            if step == 1:
                scores = scores.masked_fill(scores > 0, float("-inf"))  # MARK:mask-fill
            loss = scores.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    """)
    assert code == EXIT_INCIDENT
    incident = result.incident
    assert (incident.step, incident.category, incident.phase) == (1, "input", "forward")
    assert (incident.file, incident.line) == line_of("MARK:mask-fill", path)


# --------------------------------------------------------------------------- what was watched
def test_a_script_with_nothing_to_watch_says_so(tmp_path, capsys):
    from floatscope._cli.main import main

    (tmp_path / "plain.py").write_text("print(sum(range(10)))\n")
    code = main(["run", "--no-store", "--json", str(tmp_path / "r.json"), str(tmp_path / "plain.py")])
    err = capsys.readouterr().err
    assert code == 0
    assert "nothing was watched" in err and "clean" not in err
    import json

    data = json.loads((tmp_path / "r.json").read_text())
    assert data["status"] == "unwatched" and data["watched"]["calls"] == 0


def test_a_float_read_of_an_overflowed_loss_is_found_at_its_origin(tmp_path):
    code, result, path = run(tmp_path, """
        import torch
        w = torch.ones(3, requires_grad=True)
        for step in range(3):
            loss = (w * (1e30 if step == 1 else 1.0)).pow(2).sum()  # MARK:overflow-loss
            print("loss", float(loss))
            loss.backward()
            with torch.no_grad():
                w -= 0.01 * w.grad
                w.grad = None
    """)
    assert code == EXIT_INCIDENT
    incident = assert_found(result, path, op="aten.pow.Tensor_Scalar", phase="forward", module=None,
                            marker="MARK:overflow-loss", step=1, category="overflow")
    assert "read" in (incident.consequence or "")


def test_an_inference_loop_counts_every_model_call_as_a_step(tmp_path):
    code, result, _ = run(tmp_path, """
        import torch
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Softmax(-1)).eval()
        with torch.no_grad():
            for step in range(20):
                p = model(torch.randn(4, 8))
                if torch.isnan(p).any():
                    print("nan")
    """)
    assert (code, result.status, result.steps) == (0, "clean", 20)


def test_the_std_of_a_single_sample_is_explained_as_bessels_correction(tmp_path):
    code, result, path = run(tmp_path, """
        import torch
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(4):
            h = model(torch.randn(1 if step == 2 else 8, 5))  # the last, partial batch holds one sample
            z = (h - h.mean(0)) / (h.std(0) + 1e-5)  # MARK:batch-std
            loss = z.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    """)
    assert code == EXIT_INCIDENT
    incident = assert_found(result, path, op="aten.std.correction", phase="forward", module=None,
                            marker="MARK:batch-std", step=2, category="invalid")
    assert "n - 1 = 0" in incident.explanation and "drop_last" in " ".join(incident.suggestions)


SCALAR_DIVISOR = """
import torch

W = torch.randn(4, 1, requires_grad=True)
opt = torch.optim.SGD([W], lr=0.1)
for step in range(4):
    x = torch.randn(16, 4)
    norm = 0.0 if step == 2 else float(x.shape[0])
    loss = (x @ W).pow(2).sum() / norm  # MARK:scalar-div
    opt.zero_grad()
    loss.backward()
    opt.step()
"""


def test_a_division_by_the_number_zero_is_division_by_zero_not_overflow(tmp_path):
    code, result, path = run(tmp_path, SCALAR_DIVISOR)
    assert code == EXIT_INCIDENT
    incident = assert_found(result, path, op="aten.div.Tensor", phase="forward", module=None,
                            marker="MARK:scalar-div", step=2, category="division-by-zero")
    assert "the number 0.0" in incident.explanation and "eps" in " ".join(incident.suggestions)
