"""0/0 in a normalisation: an all-zero (padded) row divided by its zero norm."""

import torch


class L2Normalize(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=-1, keepdim=True)  # origin: 0/0 for an all-zero row


class Encoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(12, 6, bias=False)
        self.norm = L2Normalize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


torch.manual_seed(0)
model = Encoder()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(4):
    x = torch.randn(10, 12)  # (B, F)
    if step == 1:
        x[7] = 0.0  # a padded sample
    emb = model(x)  # (B, 6)
    loss = (1 - (emb[:5] * emb[5:]).sum(-1)).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step}: loss {loss.item():.4f}")
