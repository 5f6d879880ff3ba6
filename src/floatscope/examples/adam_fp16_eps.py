"""Adam on pure float16 parameters: exp_avg_sq underflows and eps=1e-8 rounds to 0."""

import torch

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).half()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # eps=1e-8 is 0 in float16

for step in range(3):
    x = torch.randn(64, 16).half()  # (B, F)
    target = 0.01 * torch.randn(64, 1).half()
    loss = ((model(x) - target) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()  # origin: the update divides by sqrt(0) + 0
    print(f"step {step}: loss {loss.item():.4f}")
