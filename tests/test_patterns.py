"""Public training patterns, written as their tutorials and libraries write them, watched unchanged.

A Lightning ``training_step`` (its ``optimizer.step(closure)`` included), models called through
``torch.func.functional_call`` (plain and MAML-style, with graphs through the inner update), and
textbook regressions from scratch (d2l's linear regression, with ``param -= lr * param.grad``).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from conftest import line_of
from floatscope._cli.run import EXIT_INCIDENT, run_script


def run(tmp_path: Path, source: str) -> tuple[int, object, Path]:
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(source))
    code, result = run_script(path, [], store=None)
    return code, result, path


LIGHTNING = """
    import torch
    import lightning as L

    class LitClassifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

        def training_step(self, batch, batch_idx):
            x, y = batch
            probs = torch.softmax(self.net(x) * (1e4 if self.global_step == BUG_AT else 1.0), dim=-1)
            loss = -torch.log(probs[torch.arange(len(y)), y]).mean()  # MARK:pl-loss
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(256, 8), torch.randint(0, 3, (256,)))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(LitClassifier(), torch.utils.data.DataLoader(data, batch_size=16))
"""


def test_lightning_training_step_names_the_users_loss_line_and_global_step(tmp_path):
    pytest.importorskip("lightning")
    code, result, path = run(tmp_path, LIGHTNING.replace("BUG_AT", "5"))
    assert code == EXIT_INCIDENT
    incident = result.incident
    assert (incident.op, incident.phase, incident.module, incident.step) == ("aten.log.default", "forward", None, 5)
    assert (incident.file, incident.line) == line_of("MARK:pl-loss", path)
    assert incident.category == "underflow"


def test_a_healthy_lightning_run_is_clean_and_counts_its_steps(tmp_path):
    pytest.importorskip("lightning")
    code, result, _ = run(tmp_path, LIGHTNING.replace("BUG_AT", "-1"))
    assert (code, result.status, result.steps) == (0, "clean", 16)
    assert result.watched["optimizer_steps"] == 16


def test_functional_call_with_manual_updates(tmp_path):
    code, result, path = run(tmp_path, """
        import torch
        from torch.func import functional_call
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
        for step in range(6):
            x = torch.randn(16, 4) * (1e19 if step == 3 else 1.0)
            out = functional_call(model, params, (x,))  # MARK:fc-call
            loss = out.pow(2).mean()
            grads = torch.autograd.grad(loss, list(params.values()))
            with torch.no_grad():
                for p, g in zip(params.values(), grads):
                    p -= 0.01 * g
    """)
    assert code == EXIT_INCIDENT
    incident = result.incident
    # Oracle: the same loop in plain PyTorch; the first non-finite model output.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    first = None
    for step in range(6):
        out = torch.func.functional_call(model, params, (torch.randn(16, 4) * (1e19 if step == 3 else 1.0),))
        if not torch.isfinite(out).all():
            first = step
            break
        grads = torch.autograd.grad(out.pow(2).mean(), list(params.values()))
        with torch.no_grad():
            for p, g in zip(params.values(), grads, strict=False):
                p -= 0.01 * g
    assert first is not None
    assert (incident.phase, incident.step, incident.category) == ("forward", first, "overflow")
    assert incident.op == "aten.addmm.default" and incident.module in ("0", "2")
    assert (incident.file, incident.line) == line_of("MARK:fc-call", path)


def test_maml_style_outer_loss_through_functional_fast_weights(tmp_path):
    code, result, path = run(tmp_path, """
        import torch
        from torch.func import functional_call
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        meta = torch.optim.Adam(model.parameters(), lr=1e-3)
        for it in range(6):
            x, y = torch.randn(10, 2), torch.randn(10, 1)
            params = dict(model.named_parameters())
            inner = ((functional_call(model, params, (x,)) - y) ** 2).mean()
            grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
            fast = {k: v - 0.1 * g for (k, v), g in zip(params.items(), grads)}
            pred = functional_call(model, fast, (torch.randn(10, 2),))
            spread = ((pred - pred.detach()) ** 2).mean()
            outer = torch.sqrt(spread + (0.0 if it == 4 else 1.0))  # MARK:maml-outer
            meta.zero_grad()
            outer.backward()
            meta.step()
    """)
    assert code == EXIT_INCIDENT
    incident = result.incident
    assert (incident.op, incident.phase, incident.step, incident.backward_node) == (
        "aten.sqrt.default", "backward", 4, "SqrtBackward0")
    assert (incident.file, incident.line) == line_of("MARK:maml-outer", path)
    assert result.steps == 4 and result.watched["grad_calls"] == 5  # iterations 0-3 completed


def test_d2l_linear_regression_from_scratch(tmp_path):
    # "Linear Regression Implementation from Scratch" (d2l.ai): sgd() updates params in place.
    code, result, path = run(tmp_path, """
        import torch
        def synthetic_data(w, b, n):
            X = torch.normal(0, 1, (n, len(w)))
            y = torch.matmul(X, w) + b
            y += torch.normal(0, 0.01, y.shape)
            return X, y.reshape((-1, 1))
        def linreg(X, w, b):
            return torch.matmul(X, w) + b
        def squared_loss(y_hat, y):
            return (y_hat - y.reshape(y_hat.shape)) ** 2 / 2  # MARK:d2l-loss
        def sgd(params, lr, batch_size):
            with torch.no_grad():
                for param in params:
                    param -= lr * param.grad / batch_size
                    param.grad.zero_()
        torch.manual_seed(0)
        features, labels = synthetic_data(torch.tensor([2, -3.4]), 4.2, 1000)
        w = torch.normal(0, 0.01, size=(2, 1), requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        lr, batch_size = LR, 10
        for epoch in range(3):
            for i in range(0, 1000, batch_size):
                X, y = features[i:i + batch_size], labels[i:i + batch_size]
                l = squared_loss(linreg(X, w, b), y)
                l.sum().backward()
                sgd([w, b], lr, batch_size)
            print(f"epoch {epoch + 1}, loss {float(squared_loss(linreg(features, w, b), labels).mean()):f}")
    """.replace("LR", "50.0"))
    assert code == EXIT_INCIDENT
    incident = result.incident
    assert (incident.phase, incident.category, incident.module) == ("forward", "overflow", None)
    assert (incident.file, incident.line) == line_of("MARK:d2l-loss", path)
    assert incident.op == "aten.pow.Tensor_Scalar"
    assert "diverging" in incident.explanation


def test_d2l_linear_regression_with_its_learning_rate_is_clean(tmp_path):
    # The same model with the book's learning rate (0.03), in one epoch.
    code, result, _ = run(tmp_path, """
        import torch
        torch.manual_seed(0)
        X = torch.normal(0, 1, (1000, 2))
        y = (X @ torch.tensor([2, -3.4]) + 4.2).reshape(-1, 1)
        w = torch.normal(0, 0.01, size=(2, 1), requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        for i in range(0, 1000, 10):
            l = ((X[i:i + 10] @ w + b - y[i:i + 10]) ** 2 / 2).sum()
            l.backward()
            with torch.no_grad():
                for param in (w, b):
                    param -= 0.03 * param.grad / 10
                    param.grad.zero_()
    """)
    assert (code, result.status, result.steps) == (0, "clean", 100)
