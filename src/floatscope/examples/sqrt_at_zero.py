"""A distance loss with sqrt at zero: forward is fine, the gradient 1/(2*sqrt(0)) is not."""

import torch

torch.manual_seed(0)
encoder = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3)


def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(((a - b) ** 2).sum(dim=-1))  # origin: gradient is infinite where a == b


for step in range(4):
    anchors = torch.randn(16, 8)  # (B, F)
    positives = anchors + 0.1 * torch.randn(16, 8)
    if step == 2:
        positives[:4] = anchors[:4]  # duplicates in the batch: identical pairs
    za, zp = encoder(anchors), encoder(positives)  # (B, 4) each
    loss = distance(za, zp).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step}: loss {loss.item():.4f}")
