"""Health calibration: healthy runs of 1,000+ steps must give no finding.

Fresh noisy batches every step, lr warm-up and decay, a transformers model fine-tuned from a config,
an LSTM, bfloat16 autocast and float16 autocast with a GradScaler (CPU). The thresholds of
``floatscope._diagnose.health`` are set so that all of these are clean while the bad runs of
``test_health.py`` are still found.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import floatscope
import floatscope.runs as fr


def regression(steps=1059):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    w = torch.randn(8, 1)
    def step(i):
        x = torch.randn(32, 8); y = torch.sin(x @ w) + 0.3 * torch.randn(32, 1)
        loss = F.mse_loss(m(x), y); opt.zero_grad(); loss.backward(); opt.step()
    return m, opt, step, steps, None

def classification_warmup(steps=1000):
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(20, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    centers = torch.randn(10, 20) * 2
    def step(i):
        y = torch.randint(0, 10, (64,)); x = centers[y] + torch.randn(64, 20)
        loss = F.cross_entropy(m(x), y); opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    return m, opt, step, steps, None

def lstm(steps=1000):
    torch.manual_seed(2)
    class M(nn.Module):
        def __init__(self):
            super().__init__(); self.rnn = nn.LSTM(4, 32, batch_first=True); self.head = nn.Linear(32, 1)
        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])
    m = M(); opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    def step(i):
        x = torch.randn(16, 20, 4); y = x[:, :, 0].cumsum(1)[:, -1:] * 0.1
        loss = F.mse_loss(m(x), y); opt.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step()
    return m, opt, step, steps, None

def bert(steps=1000):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(3)
    cfg = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64, num_labels=2)
    m = BertForSequenceClassification(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.0, 1 - s / steps))
    def step(i):
        ids = torch.randint(1, 200, (16, 24)); labels = (ids[:, 0] > 100).long()
        mask = torch.ones_like(ids); mask[:, 20:] = torch.randint(0, 2, (16, 4))
        out = m(input_ids=ids, attention_mask=mask, labels=labels)
        opt.zero_grad(); out.loss.backward(); opt.step(); sched.step()
    return m, opt, step, steps, None

def bf16(steps=1000):
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(16, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 4))
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    def step(i):
        x = torch.randn(32, 16); y = torch.randint(0, 4, (32,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        loss = F.cross_entropy(out.float(), y); opt.zero_grad(); loss.backward(); opt.step()
    return m, opt, step, steps, None

def fp16_scaler(steps=1000):
    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    w = torch.randn(16, 1) / 4
    def step(i):
        x = torch.randn(32, 16); y = x @ w + 0.1 * torch.randn(32, 1)
        with torch.autocast("cpu", dtype=torch.float16):
            out = m(x)
        loss = F.mse_loss(out.float(), y)
        opt.zero_grad(); scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
    return m, opt, step, steps, scaler


RUNS = [regression, classification_warmup, lstm, bert, bf16, fp16_scaler]


@pytest.mark.parametrize("make", RUNS, ids=[f.__name__ for f in RUNS])
def test_a_healthy_run_of_a_thousand_steps_has_no_finding(tmp_path, make):
    if make is bert:
        pytest.importorskip("transformers")
    model, opt, step, steps, scaler = make()
    store = tmp_path / "s.sqlite"
    with floatscope.watch(model, opt, store=str(store)) as w:
        for i in range(steps):
            step(i)
    assert w.incident is None
    record = fr.load_run(w.run_id, store=store)
    assert record.status == "clean" and record.steps == steps
    assert fr.findings(w.run_id, store=store) == []
    if scaler is not None:  # the GradScaler skipped its first steps (scale 65536 overflows float16 gradients)
        assert record.skipped_steps >= 1
