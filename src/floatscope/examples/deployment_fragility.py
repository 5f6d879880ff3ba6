"""The quiz: is an overfit model fragile when deployed in fp16 by another runtime?

Two classifiers of the same architecture learn the same synthetic task:

* *overfit*: trained to memorise 12 examples, with no regularisation, for many steps;
* *normal*: trained on 2,000 examples with weight decay, for a fixed budget.

Each is exported to ONNX, converted to float16 (fp32 inputs and outputs) and run in ONNX Runtime.
floatscope compares it with PyTorch fp32 layer by layer and measures the top-1 flip rate and the
largest logit change over a test set and noisy copies of it.

    python -m floatscope.examples.deployment_fragility      (needs pip install 'floatscope[onnx]')
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 10))


def task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, 32, generator=torch.Generator().manual_seed(0)) * 1.5
    y = torch.randint(0, 10, (n,), generator=g)
    x = centers[y] + torch.randn(n, 32, generator=g) * 2.0  # overlapping classes
    return x, y


def train(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = make_model()
    if kind == "overfit":
        x, y = task(12, seed=1)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        steps = 1500
    else:
        x, y = task(2000, seed=1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        steps = 300
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def measure(perturb: int = 8) -> dict[str, dict[str, float]]:
    from floatscope.compare import onnxruntime

    test_x, _ = task(2048, seed=2)
    out = {}
    for kind in ("overfit", "normal"):
        model = train(kind)
        result = onnxruntime(model, (test_x,), dtype="float16", perturb=perturb, noise=0.05)
        with torch.no_grad():
            logits = model(test_x)
        top2 = logits.topk(2, dim=-1).values
        out[kind] = {"top1_flip_rate": result.output.top1_flip_rate, "max_logit_change": result.output.max_logit_change,
                     "max_rel": result.output.max_rel, "logit_scale": float(logits.abs().max()),
                     "median_margin": float((top2[:, 0] - top2[:, 1]).median()),
                     "weight_norm": float(sum(p.detach().norm() ** 2 for p in model.parameters()) ** 0.5)}
    return out


def main() -> None:
    results = measure()
    print(f"{'model':<9}{'top-1 flips':>13}{'max logit change':>18}{'logit scale':>13}{'median margin':>15}"
          f"{'weight norm':>13}")
    for kind, r in results.items():
        print(f"{kind:<9}{r['top1_flip_rate']:>13.2%}{r['max_logit_change']:>18.4g}{r['logit_scale']:>13.4g}"
              f"{r['median_margin']:>15.4g}{r['weight_norm']:>13.4g}")


if __name__ == "__main__":
    main()
