"""Health sampling: per-layer numerics every N steps, computed on the device, read at the step's sync.

On a sampling step the watch attaches forward hooks to every submodule for that one forward pass
and removes them after it; other steps run no per-module Python. Each statistic is a device tensor
that joins the step's single host transfer. NaN and Inf are counted, never dropped: magnitudes are
taken over the finite elements and the non-finite counts are kept beside them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.utils._pytree as pytree

from floatscope._numerics.formats import format_of

__all__ = ["HealthSampler", "ACTIVATION_FIELDS", "PARAM_FIELDS", "FLUSH_SCALES"]

ACTIVATION_FIELDS = ("absmax", "rms", "zero_frac", "nan", "inf", "below_normal_frac", "saturation", "dead_frac")
PARAM_FIELDS = ("grad_norm", "weight_norm", "update_norm", "grad_nonzero", "grad_flush_frac", "grad_absmax",
                "loss_scale")
_SATURATING = (torch.nn.Sigmoid, torch.nn.Tanh)
_RECTIFIERS = (torch.nn.ReLU, torch.nn.ReLU6)
_FP16_SMALLEST_SUBNORMAL = 2.0**-24
FLUSH_SCALES = (1.0, 2.0**4, 2.0**8, 2.0**12, 2.0**16)


def _activation_stats(module: torch.nn.Module, inp: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """Eight statistics of one module output (see ACTIVATION_FIELDS) as a float32 device tensor."""
    x = out.detach()
    fmt = format_of(x.dtype)
    finite = torch.isfinite(x)
    xf = torch.where(finite, x, torch.zeros_like(x)).float()
    a = xf.abs()
    n = max(x.numel(), 1)
    minus_one = torch.full((), -1.0, device=x.device)
    if isinstance(module, _SATURATING) and inp is not None:
        saturation = (inp.detach().float().abs() > 5.0).float().mean()
    else:
        saturation = minus_one
    if isinstance(module, _RECTIFIERS) and x.dim() >= 1 and x.shape[-1] > 0:
        dead = (x.reshape(-1, x.shape[-1]) == 0).all(dim=0).float().mean()
    else:
        dead = minus_one
    return torch.stack([
        a.max(), (xf.square().sum() / n).sqrt(), (x == 0).float().sum() / n,
        torch.isnan(x).sum().float(), torch.isinf(x).sum().float(),
        ((a > 0) & (a < fmt.smallest_normal)).float().sum() / n, saturation, dead,
    ])


class HealthSampler:
    """Collects per-layer statistics on sampling steps; see the module docstring."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.handles: list[Any] = []
        self.pending: list[tuple[str, str, torch.Tensor]] = []  # (layer, dtype, stats)
        self.types: dict[str, str] = {}
        self.snapshot: list[torch.Tensor] | None = None

    def is_sampling(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    # ------------------------------------------------------------------ activations
    def attach(self, roots: list[torch.nn.Module]) -> None:
        """Hook every submodule of ``roots`` for the coming forward pass only."""
        self.detach()
        for root in roots:
            for name, module in root.named_modules():
                if not name:
                    continue
                self.types[name] = type(module).__name__
                self.handles.append(module.register_forward_hook(self._make_hook(name)))

    def _make_hook(self, name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
            if not leaves or leaves[0].numel() == 0:
                return
            inputs = [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor) and t.is_floating_point()]
            self.pending.append((name, str(leaves[0].dtype).removeprefix("torch."),
                                 _activation_stats(module, inputs[0] if inputs else None, leaves[0])))

        return hook

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    # ------------------------------------------------------------------ parameters
    def before_step(self, params: list[torch.Tensor], scale: torch.Tensor | None) -> torch.Tensor:
        """Snapshot parameters for the update ratio; gradient flush statistics at candidate loss scales.

        Returns float32 values, ``len(FLUSH_SCALES) + 2`` per parameter: the count of non-zero
        gradient elements, then for each factor ``k`` in FLUSH_SCALES the fraction of them that would
        flush to zero in fp16 at ``scale * k`` (``|g| * scale * k < 2**-24``), then the largest ``|g|``.
        """
        self.snapshot = [p.detach().clone() for p in params]
        device = params[0].device if params else torch.device("cpu")
        s = scale.float().to(device) if scale is not None else torch.ones((), device=device)
        out = []
        for p in params:
            g = p.grad
            if g is None or g.is_sparse or g.numel() == 0:
                out.append(torch.zeros(len(FLUSH_SCALES) + 2, device=device))
                continue
            ga = g.detach().float().abs()
            nonzero_mask = ga > 0
            nonzero = nonzero_mask.float().sum()
            fracs = [((nonzero_mask & (ga * (s * k) < _FP16_SMALLEST_SUBNORMAL)).float().sum() / nonzero.clamp_min(1.0))
                     for k in FLUSH_SCALES]
            out.append(torch.stack([nonzero, *fracs, ga.max()]).to(device))
        return torch.cat(out) if out else torch.zeros(0)

    def after_step(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        """Per-parameter norm of the update the optimizer just applied."""
        if self.snapshot is None or len(self.snapshot) != len(params):
            return None
        deltas = [(p.detach() - old).float() for p, old in zip(params, self.snapshot)]
        self.snapshot = None
        if not deltas:
            return None
        return torch.stack([torch.linalg.vector_norm(d) for d in deltas])

    def take_activations(self) -> list[tuple[str, str, torch.Tensor]]:
        pending, self.pending = self.pending, []
        return pending


def activation_row(name: str, dtype: str, values: list[float], module_type: str) -> dict[str, Any]:
    """The stored record of one layer's activation statistics (headroom in the output's dtype)."""
    data: dict[str, Any] = dict(zip(ACTIVATION_FIELDS, values))
    for key in ("saturation", "dead_frac"):
        if data[key] < 0:
            data[key] = None
    data["nan"], data["inf"] = int(data["nan"]), int(data["inf"])
    fmt_max = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38, "float32": 3.4028234663852886e38,
               "float64": 1.7976931348623157e308}.get(dtype)
    absmax = data["absmax"]
    data["headroom_bits"] = (math.log2(fmt_max / absmax) if fmt_max and absmax > 0 else None)
    data["dtype"] = dtype
    data["type"] = module_type
    return data
