"""Origin rules of the op-level tracer: intentional infinities, in-place ops, uninitialised memory."""

from __future__ import annotations

import torch

import floatscope
from conftest import line_of


def test_intentional_infinities_are_never_origins():
    scores = torch.randn(2, 4)
    mask = torch.tensor([[False, True, True, False], [False, False, True, True]])

    def fn():
        masked = scores.masked_fill(mask, float("-inf"))
        probs = torch.softmax(masked, dim=-1)  # rows keep an unmasked entry: finite
        big = torch.full((3,), float("inf"))
        half = torch.full((2,), torch.finfo(torch.float16).min, dtype=torch.float16) - 100  # -inf, on purpose
        return probs, big.min(), half

    assert floatscope.locate(fn) is None


def test_nan_from_a_mask_blames_the_op_that_made_it_and_mentions_the_mask():
    scores = torch.randn(1, 3)

    def fn():
        masked = scores.masked_fill(torch.ones(1, 3, dtype=torch.bool), float("-inf"))
        return torch.softmax(masked, dim=-1)  # MARK:all-masked

    incident = floatscope.locate(fn)
    assert incident.op == "aten._softmax.default" and "mask" in incident.explanation
    assert (incident.file, incident.line) == line_of("MARK:all-masked")


def test_inplace_ops_are_judged_on_inputs_before_they_ran():
    def fn():
        x = torch.zeros(3)
        x.div_(x)  # MARK:inplace
        return x

    incident = floatscope.locate(fn)
    assert incident.op == "aten.div_.Tensor" and incident.kind == "nan" and incident.category == "invalid"
    assert incident.operands[0].zeros == 3 and incident.operands[0].nan == 0
    assert (incident.file, incident.line) == line_of("MARK:inplace")


def test_uninitialised_memory_is_ignored():
    def fn():
        buf = torch.empty(4)  # may hold NaN garbage; never an origin
        buf.fill_(0.0)
        return buf / buf  # MARK:empty-div

    incident = floatscope.locate(fn)
    assert incident.op == "aten.div.Tensor"
    assert (incident.file, incident.line) == line_of("MARK:empty-div")


def test_propagators_are_not_origins():
    x = torch.tensor([1.0, 0.0])

    def fn():
        y = torch.log(x)  # MARK:first-inf
        return (y * 2 + 1).exp().sum()

    incident = floatscope.locate(fn)
    assert incident.op == "aten.log.default"
    assert (incident.file, incident.line) == line_of("MARK:first-inf")


def test_an_unreproducible_failure_reports_the_finest_origin_known():
    class Flaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(2, 2)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            out = self.fc(x)
            return out * float("nan") if self.calls == 2 else out  # fails once, not on replay

    model = Flaky()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with floatscope.watch(model, opt, on_anomaly="record", store=None) as w:
        for _ in range(3):
            model(torch.randn(3, 2)).sum().backward()
            opt.step()
    incident = w.incident
    assert incident is not None and not incident.exact
    assert incident.phase == "forward" and incident.step == 1 and incident.module == ""
    assert "could not be named" in incident.explanation and "stayed finite" in incident.explanation


def test_copy_into_a_narrower_dtype_is_checked_like_a_cast():
    master = torch.tensor([1.0, 1e5])

    def fn():
        half = torch.empty(2, dtype=torch.float16)
        half.copy_(master)  # MARK:copy-overflow
        return half

    incident = floatscope.locate(fn)
    assert incident.op == "aten.copy_.default" and incident.category == "overflow"
    assert "casting to float16 overflowed" in incident.explanation
    assert (incident.file, incident.line) == line_of("MARK:copy-overflow")
