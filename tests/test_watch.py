"""The watch: no false alarms, GradScaler semantics, leak-free exit, modes, and the run store."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import floatscope
import floatscope.runs as fr
from floatscope import NonFiniteError, UsageError
from conftest import line_of, torch_global_state


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)) for _ in range(n)]


# ----------------------------------------------------------------------------------- no false alarms
def test_healthy_fp32_training_is_clean_and_recorded(store_path):
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with floatscope.watch(model, opt, store=str(store_path)) as w:
        for x, y in _batches(20):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert w.result.status == "clean" and w.result.incident is None
    assert w.result.steps == 20 and w.result.skipped_steps == 0
    steps = fr.steps(w.run_id, store=store_path)
    assert [s.step for s in steps] == list(range(20))
    assert all(s.loss is not None and 0 < s.loss < 5 and s.grad_norm > 0 for s in steps)
    record = fr.load_run(w.run_id, store=store_path)
    assert record.status == "clean" and record.env["torch"] == torch.__version__


def test_healthy_bf16_autocast_training_is_clean():
    torch.manual_seed(0)
    model = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True), num_layers=2)
    head = torch.nn.Linear(32, 4)
    full = torch.nn.Sequential(model, head)
    opt = torch.optim.AdamW(full.parameters(), lr=1e-3)
    with floatscope.watch(full, opt, store=None) as w:
        for step in range(10):
            x = torch.randn(4, 12, 32)
            y = torch.randint(0, 4, (4, 12))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = full(x)
            loss = F.cross_entropy(logits.float().reshape(-1, 4), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert w.result.status == "clean" and w.result.steps == 10


def test_fp16_gradscaler_skips_are_counted_not_reported():
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # far too high: the first steps overflow
    with floatscope.watch(model, opt, scaler=scaler, store=None) as w:
        for x, y in _batches(40):
            with torch.autocast("cpu", dtype=torch.float16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    assert w.result.incident is None and w.result.status == "clean"
    assert w.result.skipped_steps > 0
    assert w.result.steps == 40
    assert w.result.loss_scale is not None and w.result.loss_scale < 2.0**40


def test_gradscaler_collapse_is_an_incident_with_the_backward_origin():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    with pytest.raises(NonFiniteError) as info:
        with floatscope.watch(model, opt, scaler=scaler, store=None):
            for step in range(30):
                x = torch.randn(6, 4)
                with torch.autocast("cpu", dtype=torch.float16):
                    z = model(x)
                dist = torch.sqrt((z.float() - z.float().detach()) ** 2 + 0.0)  # MARK:collapse-sqrt
                loss = dist.sum()
                opt.zero_grad()
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
    incident = info.value.incident
    assert incident.category == "loss-scale-collapse"
    assert incident.op == "aten.sqrt.default" and incident.phase == "backward"
    assert (incident.file, incident.line) == line_of("MARK:collapse-sqrt")
    assert "loss scale" in incident.explanation


# ----------------------------------------------------------------------------------- modes
def _nan_step(model, opt, i):
    x = torch.randn(4, 16)
    if i == 1:
        x[0, 0] = float("inf")  # the data itself is broken
    loss = model(x).sum() * 0.0 + torch.log(torch.tensor(0.0) if i == 2 else torch.tensor(1.0))
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_record_mode_keeps_going_and_keeps_the_first_incident():
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with floatscope.watch(model, opt, on_anomaly="record", store=None) as w:
        for i in range(4):
            x = torch.randn(4, 16) * (1e20 if i == 1 else 1.0)
            loss = model(x).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert w.incident is not None and w.incident.step == 1
    assert w.result.steps == 4 and w.result.status == "nonfinite"


def test_warn_mode_warns_at_the_users_line():
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with floatscope.watch(model, opt, on_anomaly="warn", store=None):
            for i in range(2):
                loss = model(torch.randn(4, 16) * (1e20 if i == 1 else 1.0)).pow(2).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()  # MARK:warn-step
    ours = [w for w in caught if "first" in str(w.message)]
    assert len(ours) == 1
    assert (ours[0].filename, ours[0].lineno) == line_of("MARK:warn-step")


def test_nan_in_the_input_batch_is_reported_as_such():
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(NonFiniteError) as info:
        with floatscope.watch(model, opt, store=None):
            x = torch.randn(4, 16)
            x[2, 3] = float("nan")
            loss = model(x).sum()
            loss.backward()
            opt.step()
    incident = info.value.incident
    assert incident.category == "input" and incident.phase == "forward"
    assert "input" in incident.explanation and incident.operands[0].nan == 1


def test_bad_arguments_give_clear_errors():
    with pytest.raises(UsageError, match="on_anomaly"):
        floatscope.watch(_mlp(), on_anomaly="explode")
    with pytest.raises(UsageError, match="torch.nn.Module"):
        floatscope.watch("not a model")
    with pytest.raises(UsageError, match="Optimizer"):
        floatscope.watch(_mlp(), optimizer=object())


# ----------------------------------------------------------------------------------- leak-free exit
def _train_a_bit(model, opt, scaler=None, raise_at=None):
    for i in range(3):
        if raise_at == i:
            raise KeyError("user code failed")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=scaler is None):
            loss = model(torch.randn(4, 16)).float().pow(2).mean()
        opt.zero_grad()
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()


class Exploding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("the model itself raised")
        return self.fc(x)


@pytest.mark.parametrize("case", ["normal", "user-error", "model-raises", "nonfinite"])
@pytest.mark.parametrize("global_mode", [False, True])
def test_watch_leaves_no_trace(case, global_mode):
    before = torch_global_state()
    model = Exploding() if case == "model-raises" else _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    args = (None, None) if global_mode else (model, opt)
    try:
        with floatscope.watch(*args, scaler=None if global_mode else scaler, store=None):
            if case == "nonfinite":
                model(torch.full((2, 16), float("nan"))).sum().backward()
                opt.step()
            else:
                _train_a_bit(model, opt, scaler=scaler, raise_at=1 if case == "user-error" else None)
    except (KeyError, RuntimeError, NonFiniteError):
        pass
    assert torch_global_state() == before
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert not {"zero_grad", "__reduce_ex__"} & set(vars(model))
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert "step" not in vars(scaler) and "update" not in vars(scaler)


def _scripts_own_hook(module, args, output):
    return None


@pytest.mark.parametrize("store", ["file", None])
@pytest.mark.parametrize("global_mode", [False, True])
def test_copies_of_a_watched_model_carry_nothing_of_the_watch(tmp_path, store, global_mode):
    """An EMA copy (deepcopy), torch.optim.swa_utils.AveragedModel and torch.save of a watched model
    work, and the copies hold no floatscope hook or patch: the EMA's zero_grad leaves the model's grads."""
    import copy
    import io
    import pickle

    model = _mlp()
    model.register_forward_hook(_scripts_own_hook)  # copied with the model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = (None, None) if global_mode else (model, opt)
    with floatscope.watch(*args, store=tmp_path / "run.sqlite" if store else None) as w:
        for i, (x, y) in enumerate(_batches(4)):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            if i == 0:
                ema = copy.deepcopy(model)
                swa = torch.optim.swa_utils.AveragedModel(model)
            opt.step()
            ema.load_state_dict(model.state_dict())
            swa.update_parameters(model)
            buffer = io.BytesIO()
            torch.save(model, buffer)
            assert b"floatscope" not in pickle.dumps(model)
            ema.zero_grad()
            assert all(p.grad is not None for p in model.parameters())  # the model's grads are its own
        for copied in (ema, swa.module):
            assert not {"zero_grad", "__reduce_ex__"} & set(vars(copied))
            assert len(copied._forward_hooks) == 1 and not copied._forward_pre_hooks  # only the script's
        loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
        torch.testing.assert_close(loaded(_batches(1)[0][0]), model(_batches(1)[0][0]))
    assert w.result.status == "clean" and w.result.steps == 4
    assert not {"zero_grad", "__reduce_ex__"} & set(vars(model)) and len(model._forward_hooks) == 1


def test_locate_leaves_no_trace_even_when_fn_raises():
    before = torch_global_state()

    def fn():
        torch.log(torch.zeros(2))
        raise ValueError("boom")

    with pytest.raises(ValueError):
        floatscope.locate(fn)
    assert torch_global_state() == before


def test_replay_restores_buffers_and_rng():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with floatscope.watch(model, opt, on_anomaly="record", store=None) as w:
        out = model(torch.randn(16, 8))
        running_mean = model[1].running_mean.clone()
        rng = torch.get_rng_state().clone()
        (out.pow(2) * 3e38).sum().backward()  # overflows in the loss: replay runs BatchNorm and Dropout again
        opt.step()
        assert torch.equal(model[1].running_mean, running_mean)
        assert torch.equal(torch.get_rng_state(), rng)
    assert w.incident is not None and w.incident.exact


class _SyncCounter(torch.overrides.TorchFunctionMode):
    """Counts device-to-host reads (item, tolist, bool, float, int, cpu, numpy) made by floatscope's code."""

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}

    def __init__(self):
        super().__init__()
        self.count = 0
        import os

        self.package = os.path.dirname(floatscope.__file__)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        import sys

        if getattr(func, "__name__", "") in self.READS:
            frame = sys._getframe(1)
            while frame is not None and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(self.package):
                self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("health_every", [0, 5])
def test_the_watch_reads_the_device_about_once_per_step(store_path, health_every):
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    counter = _SyncCounter()
    steps = 20
    with counter:
        with floatscope.watch(model, opt, store=str(store_path), health_every=health_every):
            for x, y in _batches(steps):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
    # One tolist() per step, plus the final read of the last step's flags at exit.
    assert counter.count <= steps + 1, counter.count


class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x, temperature):
        return torch.exp(self.fc(x) / temperature)  # MARK:inference-exp


def test_inference_only_watch_finds_the_origin():
    torch.manual_seed(0)
    model = Scaled().eval()
    with pytest.raises(NonFiniteError) as info:
        with floatscope.watch(model, store=None):
            with torch.no_grad():
                for temperature in (1.0, 1.0, 1e-3, 1.0):
                    model(torch.randn(2, 4), temperature=temperature)
    incident = info.value.incident
    assert incident.op == "aten.exp.default" and incident.phase == "forward" and incident.module == ""
    assert (incident.file, incident.line) == line_of("MARK:inference-exp")


def test_nan_losses_stay_visible_in_the_store(store_path):
    import math

    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with floatscope.watch(model, opt, store=str(store_path), on_anomaly="record") as w:
        for i in range(3):
            loss = model(torch.randn(4, 16)).sum() * (float("nan") if i == 1 else 1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
    steps = fr.steps(w.run_id, store=store_path)
    assert math.isnan(steps[1].loss) and math.isnan(steps[1].grad_norm)  # not dropped to NULL
    assert math.isfinite(steps[0].loss)


# ----------------------------------------------------------------------------------- the one transfer
def _count_transfers(w):
    return w._channel.transfers


def test_one_transfer_per_step_and_none_for_finite_reads(store_path):
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with floatscope.watch(model, opt, store=str(store_path)) as w:
        for i, (x, y) in enumerate(_batches(12)):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            print(f"step {i} loss {loss.item():.3f}")  # a finite read costs no transfer
        during = _count_transfers(w)
    assert during == 12  # one per step, read at the optimizer step
    assert _count_transfers(w) == 13  # and the final read at exit


def test_lazy_sync_reads_one_step_late_and_says_so():
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = []
    with floatscope.watch(model, opt, store=None, sync="lazy", on_anomaly="record") as w:
        for i, (x, y) in enumerate(_batches(6)):
            loss = F.cross_entropy(model(x) * (1e30 if i == 3 else 1.0), y) * (float("inf") if i == 3 else 1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen.append(w.incident is not None)
    assert seen == [False, False, False, False, True, True]  # found at the next step's read
    incident = w.incident
    assert incident.step == 3 and not incident.exact
    assert "sync='step'" in incident.explanation


def test_lazy_sync_is_exact_when_the_parameters_did_not_change():
    # The loop stops after the bad step: the final read at exit replays it with its own parameters.
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with floatscope.watch(model, opt, store=None, sync="lazy", on_anomaly="record") as w:
        for i, (x, y) in enumerate(_batches(5)):
            logits = model(x)
            loss = -torch.log(torch.softmax(logits * (1e4 if i == 2 else 1.0), -1)[:, 0]).mean()  # MARK:lazy-loss
            if i == 2:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    incident = w.incident
    assert incident.exact and incident.op == "aten.log.default" and incident.step == 2
    assert (incident.file, incident.line) == line_of("MARK:lazy-loss")


def test_sync_must_be_known():
    with pytest.raises(UsageError, match="sync"):
        floatscope.watch(_mlp(), sync="sometimes")


# ----------------------------------------------------------------------------------- no trace on any exit
@pytest.mark.parametrize("case", ["closure-raises", "step-raises", "nonfinite-read", "keyboard-interrupt",
                                  "system-exit"])
def test_every_exit_path_leaves_no_trace(case):
    before = torch_global_state()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=2) if case == "closure-raises" else \
        torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 3)

    class Boom(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("the optimizer failed")

    if case == "step-raises":
        opt = Boom(model.parameters(), lr=0.1)
    try:
        with floatscope.watch(None, None, store=None):
            if case == "closure-raises":
                def closure():
                    opt.zero_grad()
                    loss = model(x).pow(2).mean()
                    loss.backward()
                    raise ValueError("closure failed")
                opt.step(closure)
            elif case == "step-raises":
                model(x).sum().backward()
                opt.step()
            elif case == "nonfinite-read":
                (model(x) * float("inf")).sum().item()
            elif case == "keyboard-interrupt":
                model(x).sum().backward()
                raise KeyboardInterrupt
            else:
                model(x).sum().backward()
                raise SystemExit(0)
    except (ValueError, RuntimeError, NonFiniteError, KeyboardInterrupt, SystemExit):
        pass
    assert torch_global_state() == before
    assert "zero_grad" not in vars(opt) and "zero_grad" not in vars(model)
    assert not model._forward_hooks and not model._forward_pre_hooks
