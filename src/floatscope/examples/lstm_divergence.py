"""An LSTM forecaster whose error compounds over time steps until training diverges.

Autoregressive rollout: each prediction is fed back as the next input, so an error made at one
time step is carried, and amplified, by every later one. With no gradient clipping and a large
learning rate, the amplified errors blow up the weights and training overflows.
"""

import torch


class Forecaster(torch.nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.cell = torch.nn.LSTMCell(1, hidden)
        self.head = torch.nn.Linear(hidden, 1)

    def forward(self, first: torch.Tensor, horizon: int) -> torch.Tensor:
        h = c = first.new_zeros(first.shape[0], self.cell.hidden_size)  # (B, H)
        x, outputs = first, []
        for _ in range(horizon):
            h, c = self.cell(x, (h, c))
            x = self.head(h) * 2.0 + x  # residual rollout: errors compound step by step
            outputs.append(x)
        return torch.cat(outputs, dim=1)  # (B, horizon)


torch.manual_seed(0)
model = Forecaster()
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # no clipping, large lr
t = torch.linspace(0, 8, 41)
for step in range(200):
    phase = torch.rand(16, 1) * 6.28
    series = torch.sin(t + phase)  # (B, 41)
    pred = model(series[:, :1], horizon=40)  # (B, 40)
    loss = ((pred - series[:, 1:]) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 5 == 0:
        print(f"step {step}: loss {loss.item():.4g}")
