"""log of a softmax underflows: a batch with large features pushes logits apart until p == 0.

Run it watched: ``floatscope run log_softmax_underflow.py``.
"""

import torch

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

for step in range(6):
    x = torch.randn(32, 16)  # (B, F)
    y = torch.randint(0, 4, (32,))  # (B,)
    if step == 4:
        x = x * 200.0  # an unnormalised batch: logit gaps reach hundreds
    logits = model(x)  # (B, C)
    probs = torch.softmax(logits, dim=-1)
    loss = -torch.log(probs[torch.arange(32), y]).mean()  # origin: log(0) once probs underflow
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step}: loss {loss.item():.4f}")
