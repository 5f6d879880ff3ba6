"""Health sampling: per-layer numerics every N steps, computed on the device, read with the step's transfer.

On a sampling step one global forward hook, present for that one forward pass, keeps a reference
to each layer's output (and to the input of Sigmoid/Tanh layers). When the pass ends, the
statistics of all layers are computed together: outputs of the same dtype and size are stacked
and reduced row by row, so a sampling step costs a few dozen kernels whatever the number of
layers. NaN and Inf are never dropped: they propagate into a layer's absmax and RMS, and the layer is
marked as holding them. Parameter statistics (the update of each weight and,
in float16 training, the share of gradient elements that would flush to zero at candidate loss
scales) use ``torch._foreach`` ops and one flat histogram.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.nn.modules.module import register_module_forward_hook

from floatscope._instrument.modules import module_paths
from floatscope._numerics.formats import dtype_name, format_of
from floatscope._numerics.stats import Scratch, l2_norms

__all__ = ["HealthSampler", "ACTIVATION_FIELDS", "ACTIVATION_RECORD", "DEVICE_FIELDS", "PARAM_FIELDS", "FLUSH_SCALES",
           "activation_columns"]

ACTIVATION_FIELDS = ("absmax", "rms", "zero_frac", "nan", "inf", "below_normal_frac", "saturation", "dead_frac")
PARAM_FIELDS = ("grad_norm", "weight_norm", "update_norm", "grad_nonzero", "grad_flush_frac", "grad_absmax",
                "loss_scale")
_SATURATING = (torch.nn.Sigmoid, torch.nn.Tanh)
_RECTIFIERS = (torch.nn.ReLU, torch.nn.ReLU6)
_FP16_SMALLEST_SUBNORMAL = 2.0**-24
FLUSH_SCALES = (1.0, 2.0**4, 2.0**8, 2.0**12, 2.0**16)
_DTYPE_NAMES = {d: dtype_name(d) for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
_CHUNK_ELEMENTS = 2**24  # stack at most this many elements at once (a sampling step's memory bound)
_STACK_ELEMENTS = 2**20  # smaller groups of outputs are stacked and reduced together
_COPY_ELEMENTS = 2**21  # on the CPU, snapshots of parameters up to this size in all reuse their buffers


# The device table of a sampling step: one row per statistic, one column per layer (-1: not measured).
# nan and inf are read from absmax on the host (NaN and Inf propagate into it).
DEVICE_FIELDS = ("absmax", "rms", "zero_frac", "below_normal_frac", "saturation", "dead_frac")


def _group_stats(outputs: list[torch.Tensor], scratch: Scratch | None = None) -> torch.Tensor:
    """(2, k) or (4, k) float32 for k outputs of one shape: absmax and rms, then for float16 and
    bfloat16 outputs zero_frac and below_normal_frac.

    Reductions only: max, min and the L2 norm (rms); NaN and Inf propagate into them, so a layer
    holding them shows as such without a pass of its own; a sampled layer that is non-finite is an
    incident anyway, whose operand statistics count them exactly. Small outputs are stacked and
    reduced together; large ones one by one (no copy). The zero and below-normal fractions matter
    for float16 and bfloat16 outputs and are measured only for them. Few kernels: on a sampling
    step each op call costs more than its arithmetic. Called under no_grad.
    """
    dtype = outputs[0].dtype
    n = outputs[0].numel()
    if n * len(outputs) <= _STACK_ELEMENTS or n < 4096:
        # (k, n): one copy, no per-output op
        s = (scratch.stack(outputs) if scratch is not None else torch.stack(outputs)).reshape(len(outputs), -1)
        high, low = s.amax(dim=1), s.amin(dim=1)
        l2 = torch.linalg.vector_norm(s, dim=1, dtype=torch.float32)
        parts = [s]
    else:
        parts = [o.reshape(1, -1) for o in outputs]
        high = torch.stack([p.amax() for p in parts])
        low = torch.stack([p.amin() for p in parts])
        l2 = torch.stack([torch.linalg.vector_norm(p, dtype=torch.float32) for p in parts])
    absmax = torch.maximum(high, low.neg_()).float()  # max |x| = max(max x, -min x); NaN propagates
    rows = [absmax, l2 / math.sqrt(max(n, 1))]
    if dtype in (torch.float16, torch.bfloat16):
        tiny = format_of(dtype).smallest_normal
        nonzero = torch.cat([torch.linalg.vector_norm(p, ord=0, dim=1) for p in parts])
        small = torch.cat([torch.linalg.vector_norm(p.abs().clamp_(max=tiny).sub_(tiny), ord=0, dim=1)
                           for p in parts])  # |x| < tiny
        rows += [((n - nonzero) / n).float(), ((small - (n - nonzero)) / n).float()]
    return torch.stack(rows)


class HealthSampler:
    """Collects per-layer statistics on sampling steps; see the module docstring."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.types: dict[str, str] = {}
        self._handle: Any = None
        self._names: dict[int, str] = {}
        self._paths: dict[int, dict[int, str]] = {}
        self._collected: list[tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor | None]] = []
        self._seen: set[int] = set()
        self._snapshot: list[torch.Tensor] | None = None
        self._copies: tuple[Any, list[torch.Tensor]] | None = None  # kept snapshot buffers (CPU)
        self._scratch = Scratch()

    def is_sampling(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    # ------------------------------------------------------------------ activations
    def attach(self, roots: list[torch.nn.Module]) -> None:
        """Keep every named layer's output of the coming forward pass (one global forward hook)."""
        self.detach()
        names: dict[int, str] = {}
        for root in roots:
            paths = self._paths.get(id(root))
            if paths is None:
                paths = self._paths[id(root)] = {k: v for k, v in module_paths(root).items() if v}
                for name, module in root.named_modules():
                    self.types.setdefault(name, type(module).__name__)
            for key, path in paths.items():
                names.setdefault(key, path)
        self._names = names
        self._collected, self._seen = [], set()
        self._handle = register_module_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        # Called for every module of the sampled forward pass: the common case (a tensor output) first.
        name = self._names.get(id(module))
        if name is None:
            return
        out = output if type(output) is torch.Tensor else (
            output if isinstance(output, torch.Tensor) else
            next((t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)), None))
        if out is None or not out.is_floating_point() or out.numel() == 0:
            return
        key = id(out)
        if key in self._seen:
            return  # a container returning its last child's tensor: measured once, under the child
        self._seen.add(key)
        inp = None
        if isinstance(module, _SATURATING):
            inp = next((t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor) and t.is_floating_point()),
                       None)
        self._collected.append((name, module, out, inp))

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def take_activations(self) -> tuple[list[tuple[str, str, str]], torch.Tensor | None]:
        """Statistics of the collected outputs: [(layer, dtype, module type)] and one (6, layers)
        float32 tensor, a row per statistic of DEVICE_FIELDS (-1: not measured)."""
        self.detach()
        collected, self._collected, self._seen = self._collected, [], set()
        if not collected:
            return [], None
        groups: dict[tuple[torch.device, torch.dtype, torch.Size], list[int]] = {}
        for i, (_, _, out, _) in enumerate(collected):
            groups.setdefault((out.device, out.dtype, out.shape), []).append(i)
        device = collected[0][2].device
        with torch.no_grad():
            table = torch.full((len(DEVICE_FIELDS), len(collected)), -1.0, device=device)
            for (_, _, shape), index in groups.items():
                per_chunk = max(1, _CHUNK_ELEMENTS // max(shape.numel(), 1))
                for start in range(0, len(index), per_chunk):
                    part = index[start:start + per_chunk]
                    stats = _group_stats([collected[i][2] for i in part], self._scratch).to(device)
                    width = stats.shape[0]  # absmax, rms (, zero_frac, below_normal_frac)
                    if part[-1] - part[0] == len(part) - 1:
                        table[:width, part[0]:part[-1] + 1] = stats
                    else:
                        table[:width, torch.tensor(part, device=device)] = stats
            types, dtypes = self.types, _DTYPE_NAMES
            meta = []
            for i, (name, module, out, inp) in enumerate(collected):
                meta.append((name, dtypes.get(out.dtype) or dtype_name(out.dtype),
                             types.get(name) or type(module).__name__))
                if inp is not None:
                    table[4, i] = (inp.abs() > 5.0).float().mean().to(device)
                if isinstance(module, _RECTIFIERS) and out.dim() >= 1 and out.shape[-1] > 0:
                    table[5, i] = (out.reshape(-1, out.shape[-1]) == 0).all(dim=0).float().mean().to(device)
        return meta, table

    # ------------------------------------------------------------------ parameters
    def snapshot(self, params: list[torch.Tensor]) -> None:
        """Copy ``params`` before the optimizer step, for :meth:`after_step`'s update norms.

        On the CPU, parameters of up to ``_COPY_ELEMENTS`` elements in all are copied into buffers
        kept from one sampling step to the next (a fresh allocation of a few megabytes page-faults);
        elsewhere into fresh copies (a GPU's caching allocator reuses them).
        """
        with torch.no_grad():  # no detach needed: nothing made under no_grad is tracked
            self._snapshot = None
            if not params:
                return
            if params[0].device.type == "cpu" and sum(p.numel() for p in params) <= _COPY_ELEMENTS:
                key = tuple((p.shape, p.dtype, p.device) for p in params)
                if self._copies is None or self._copies[0] != key:
                    self._copies = (key, [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params])
                torch._foreach_copy_(self._copies[1], params)
                self._snapshot = self._copies[1]
            else:
                self._snapshot = torch._foreach_mul(params, 1.0)

    def before_step(self, params: list[torch.Tensor], scale: torch.Tensor | None,
                    fp16: bool) -> torch.Tensor | None:
        """In float16 training, gradient flush statistics (None otherwise).

        Returns float32 values, ``len(FLUSH_SCALES) + 2`` per parameter (fp16 only, else None): the
        count of non-zero gradient elements, then for each factor ``k`` in FLUSH_SCALES the fraction
        of them that would flush to zero in fp16 at ``scale * k`` (``|g| * scale * k < 2**-24``),
        then the largest ``|g|``.
        """
        with torch.no_grad():
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

    def after_step(self, params: list[torch.Tensor]) -> tuple[list[int] | None, torch.Tensor] | None:
        """Per-parameter norm of the update the optimizer just applied: ``(order, norms)`` as
        :func:`~floatscope._numerics.stats.l2_norms` returns them (None: in the order of ``params``)."""
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is None or len(snapshot) != len(params):
            return None
        with torch.no_grad():
            torch._foreach_sub_(snapshot, params)
            if all(s.dtype == torch.float32 for s in snapshot) and len({s.device for s in snapshot}) == 1:
                return l2_norms(snapshot, scratch=self._scratch)
            return None, torch.stack([n.float() for n in torch._foreach_norm(snapshot)])


ACTIVATION_RECORD = (*ACTIVATION_FIELDS, "headroom_bits", "dtype", "type")
_MAX_OF: dict[str, float] = {}


def _format_max(dtype: str) -> float:
    fmt_max = _MAX_OF.get(dtype)
    if fmt_max is None:
        try:
            fmt_max = format_of(dtype).max
        except ValueError:
            fmt_max = 0.0
        _MAX_OF[dtype] = fmt_max
    return fmt_max


def activation_columns(values: list[float], dtypes: list[str], types: list[str]) -> list[list[Any]]:
    """The stored activation record of every layer, column by column in the order of ACTIVATION_RECORD.

    ``values`` is the (6, layers) device table of :meth:`HealthSampler.take_activations`, flattened.
    Statistics that were not measured for a layer (-1) are None; nan and inf are 1 when the layer
    held any (its absmax is NaN, or +inf); ``headroom_bits`` is log2 of the layer dtype's largest
    value over its absmax.
    """
    n = len(dtypes)
    absmax, rms, zero, below, saturation, dead = (values[k * n:(k + 1) * n] for k in range(len(DEVICE_FIELDS)))
    nan = [1 if a != a else 0 for a in absmax]
    inf = [1 if a == math.inf else 0 for a in absmax]
    zero, below, saturation, dead = ([v if v >= 0 else None for v in c] for c in (zero, below, saturation, dead))
    columns: list[list[Any]] = [absmax, rms, zero, nan, inf, below, saturation, dead]  # ACTIVATION_FIELDS
    headroom: list[float | None] = []
    for a, dtype in zip(absmax, dtypes, strict=True):
        fmt_max = _format_max(dtype)
        if 0 < a < math.inf and fmt_max:
            headroom.append(math.log2(fmt_max / a))
        else:
            headroom.append(-math.inf if a == math.inf else None)
    return [*columns, headroom, list(dtypes), list(types)]
