"""Health sampling: per-layer numerics every N steps, computed on the device, read with the step's transfer.

On a sampling step the module tracker, present for that one forward pass, keeps a reference
to each layer's output (and to the input of Sigmoid/Tanh layers). When the pass ends, the
statistics of all layers are computed together: outputs of the same dtype and size are stacked
and reduced row by row, so a sampling step costs a few dozen kernels whatever the number of
layers. NaN and Inf are counted, never dropped: magnitudes are taken over the finite elements and
the non-finite counts are kept beside them. Parameter statistics (the update of each weight and,
in float16 training, the share of gradient elements that would flush to zero at candidate loss
scales) use ``torch._foreach`` ops and one flat histogram.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.utils._pytree as pytree

from floatscope._instrument.modules import ModuleTracker
from floatscope._numerics.formats import dtype_name, format_of

__all__ = ["HealthSampler", "ACTIVATION_FIELDS", "PARAM_FIELDS", "FLUSH_SCALES", "activation_row"]

ACTIVATION_FIELDS = ("absmax", "rms", "zero_frac", "nan", "inf", "below_normal_frac", "saturation", "dead_frac")
PARAM_FIELDS = ("grad_norm", "weight_norm", "update_norm", "grad_nonzero", "grad_flush_frac", "grad_absmax",
                "loss_scale")
_SATURATING = (torch.nn.Sigmoid, torch.nn.Tanh)
_RECTIFIERS = (torch.nn.ReLU, torch.nn.ReLU6)
_FP16_SMALLEST_SUBNORMAL = 2.0**-24
FLUSH_SCALES = (1.0, 2.0**4, 2.0**8, 2.0**12, 2.0**16)
_CHUNK_ELEMENTS = 2**24  # stack at most this many elements at once (a sampling step's memory bound)


def _group_stats(outputs: list[torch.Tensor]) -> torch.Tensor:
    """(k, 6) float32: absmax, rms, zero_frac, nan, inf, below_normal_frac of k same-shape outputs."""
    s = torch.stack([o.detach().reshape(-1) for o in outputs])  # (k, n)
    n = s.shape[1]
    finite = torch.isfinite(s)
    a = torch.where(finite, s.abs(), 0)
    tiny = format_of(s.dtype).smallest_normal
    nan = torch.isnan(s).sum(1)
    nonfinite = n - finite.sum(1)
    return torch.stack([
        a.amax(1).float(),
        torch.linalg.vector_norm(a, dim=1, dtype=torch.float32) / math.sqrt(max(n, 1)),
        (s == 0).sum(1).float() / n,
        nan.float(),
        (nonfinite - nan).float(),
        ((a > 0) & (a < tiny)).sum(1).float() / n,
    ], dim=1)


class HealthSampler:
    """Collects per-layer statistics on sampling steps; see the module docstring."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.types: dict[str, str] = {}
        self._tracker: ModuleTracker | None = None
        self._collected: list[tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor | None]] = []
        self._seen: set[int] = set()
        self._snapshot: list[torch.Tensor] | None = None

    def is_sampling(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    # ------------------------------------------------------------------ activations
    def attach(self, roots: list[torch.nn.Module]) -> None:
        """Keep every named layer's output of the coming forward pass."""
        self.detach()
        tracker = ModuleTracker(on_exit=self._hook)
        for root in roots:
            tracker.add_root(root)
            for name, module in root.named_modules():
                self.types.setdefault(name, type(module).__name__)
        self._collected, self._seen = [], set()
        self._tracker = tracker.__enter__()

    def _hook(self, key: tuple[str, int], module: torch.nn.Module, args: Any, output: Any) -> None:
        name = key[0]
        if not name or id(module) not in self._tracker_paths():
            return
        out = output if isinstance(output, torch.Tensor) else next(
            (t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)), None)
        if out is None or not out.is_floating_point() or out.numel() == 0 or id(out) in self._seen:
            return  # a container returning its last child's tensor: measured once, under the child
        self._seen.add(id(out))
        inp = None
        if isinstance(module, _SATURATING):
            inp = next((t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor) and t.is_floating_point()),
                       None)
        self._collected.append((name, module, out, inp))

    def _tracker_paths(self) -> dict[int, str]:
        return self._tracker.paths if self._tracker is not None else {}

    def detach(self) -> None:
        if self._tracker is not None:
            self._tracker.__exit__(None, None, None)
            self._tracker = None

    @property
    def attached(self) -> bool:
        return self._tracker is not None

    def take_activations(self) -> list[tuple[str, str, str, torch.Tensor]]:
        """Statistics of the collected outputs: (layer, dtype, module type, 8 float32 values)."""
        self.detach()
        collected, self._collected, self._seen = self._collected, [], set()
        if not collected:
            return []
        groups: dict[tuple[torch.device, torch.dtype, int], list[int]] = {}
        for i, (_, _, out, _) in enumerate(collected):
            groups.setdefault((out.device, out.dtype, out.numel()), []).append(i)
        rows: list[torch.Tensor | None] = [None] * len(collected)
        with torch.no_grad():
            for (_, _, numel), index in groups.items():
                per_chunk = max(1, _CHUNK_ELEMENTS // max(numel, 1))
                for start in range(0, len(index), per_chunk):
                    part = index[start:start + per_chunk]
                    stats = _group_stats([collected[i][2] for i in part])
                    for i, row in zip(part, stats.unbind(0), strict=True):
                        rows[i] = row
            out_rows = []
            for i, (name, module, out, inp) in enumerate(collected):
                minus_one = torch.full((), -1.0, device=out.device)
                saturation = (inp.detach().abs() > 5.0).float().mean() if inp is not None else minus_one
                if isinstance(module, _RECTIFIERS) and out.dim() >= 1 and out.shape[-1] > 0:
                    dead = (out.detach().reshape(-1, out.shape[-1]) == 0).all(dim=0).float().mean()
                else:
                    dead = minus_one
                row = rows[i]
                assert row is not None
                values = torch.cat([row, torch.stack([saturation.to(row.device), dead.to(row.device)])])
                out_rows.append((name, dtype_name(out.dtype), self.types.get(name, type(module).__name__), values))
        return out_rows

    # ------------------------------------------------------------------ parameters
    def before_step(self, params: list[torch.Tensor], scale: torch.Tensor | None,
                    fp16: bool) -> torch.Tensor | None:
        """Snapshot parameters for the update norms; in fp16 training, gradient flush statistics.

        Returns float32 values, ``len(FLUSH_SCALES) + 2`` per parameter (fp16 only, else None): the
        count of non-zero gradient elements, then for each factor ``k`` in FLUSH_SCALES the fraction
        of them that would flush to zero in fp16 at ``scale * k`` (``|g| * scale * k < 2**-24``),
        then the largest ``|g|``.
        """
        with torch.no_grad():
            self._snapshot = torch._foreach_mul([p.detach() for p in params], 1.0) if params else None
            if not fp16 or not params:
                return None
            device = params[0].device
            s = scale.float().to(device) if scale is not None else torch.ones((), device=device)
            grads = [p.grad.detach() for p in params]
            sizes = [g.numel() for g in grads]
            flat = torch.cat([g.reshape(-1).float().abs() for g in grads])
            # Bucket b counts |g| in [t_b, t_(b+1)): thresholds below which |g| * scale * k flushes.
            cuts = torch.stack([_FP16_SMALLEST_SUBNORMAL / (s * k) for k in reversed(FLUSH_SCALES)])
            buckets = torch.bucketize(flat, cuts, right=True)  # 0: flushes at every scale ... 5: at none
            owner = torch.repeat_interleave(torch.arange(len(grads), device=device),
                                            torch.tensor(sizes, device=device))
            nb = len(FLUSH_SCALES) + 1
            counts = torch.bincount(owner * nb + buckets, minlength=len(grads) * nb).reshape(len(grads), nb).float()
            zeros = torch.zeros(len(grads), device=device).index_add_(0, owner, (flat == 0).float())
            nonzero = torch.tensor(sizes, device=device, dtype=torch.float32) - zeros
            # Bucket 0 includes the exact zeros, which never "flush"; remove them.
            counts[:, 0] -= zeros
            cumulative = counts.cumsum(1)  # elements flushing at factor index j: buckets 0..(4 - j)
            fracs = torch.stack([cumulative[:, len(FLUSH_SCALES) - 1 - j] for j in range(len(FLUSH_SCALES))], dim=1)
            fracs = fracs / nonzero.clamp_min(1.0).unsqueeze(1)
            absmax = torch.stack([n.float().to(device) for n in torch._foreach_norm(grads, float("inf"))])
            return torch.cat([nonzero.unsqueeze(1), fracs, absmax.unsqueeze(1)], dim=1).reshape(-1)

    def after_step(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        """Per-parameter norm of the update the optimizer just applied."""
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is None or len(snapshot) != len(params):
            return None
        with torch.no_grad():
            torch._foreach_sub_(snapshot, [p.detach() for p in params])
            return torch.stack([n.float() for n in torch._foreach_norm(snapshot)])


def activation_row(name: str, dtype: str, values: list[float], module_type: str) -> dict[str, Any]:
    """The stored record of one layer's activation statistics (headroom in the output's dtype)."""
    data: dict[str, Any] = dict(zip(ACTIVATION_FIELDS, values, strict=True))
    for key in ("saturation", "dead_frac"):
        if data[key] < 0:
            data[key] = None
    data["nan"], data["inf"] = int(data["nan"]), int(data["inf"])
    try:
        fmt_max = format_of(dtype).max
    except ValueError:
        fmt_max = None
    absmax = data["absmax"]
    data["headroom_bits"] = (math.log2(fmt_max / absmax) if fmt_max and absmax > 0 else None)
    data["dtype"] = dtype
    data["type"] = module_type
    return data
