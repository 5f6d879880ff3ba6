"""Health sampling: per-layer numerics every N steps, computed on the device, read with the step's transfer.

On a sampling step each named layer of the root module keeps a reference to its output (and to
the input of Sigmoid/Tanh layers) for that one forward pass. The ``forward`` of each layer class is
wrapped for the pass, once per class whatever the number of its layers: the wrapper runs the class's
own function and records the output of the instances being sampled (another model's layers of the
same class pass through). This keeps PyTorch's fast module call (a forward hook sends every module
call of the pass down the slow path, about 5 us each), and each class attribute is put back when the
pass ends, on every exit path. A layer whose instance has a ``forward`` of its own (accelerate's
hooks set one) has that wrapped through an instance attribute instead; a ``Sequential`` is not
wrapped, its output being its last child's. A root that copies its children's attributes
(``DataParallel`` replicas) or a scripted layer is sampled with one global forward hook instead,
and a compiled model is not sampled (Dynamo would trace the wrappers). Outputs are told apart by
tensor and version: an in-place ReLU's output is its own sample, a container returning a child's
tensor is measured once, under the child, and an output that the pass writes in place after its
layer returned (``out += identity``) is left out once, then copied on return. When the pass ends, the
statistics of all layers are computed together: outputs of the same dtype and size are stacked
and reduced row by row, so a sampling step costs a few dozen kernels whatever the number of
layers; the whole stored record (nan, inf and headroom included) is made there, and how it is laid
out (the groups, names and dtypes) is kept while the layers and their shapes repeat, so the host
packs the transferred numbers as they come. NaN and Inf are never dropped: they propagate into a
layer's absmax and RMS, and the layer is marked as holding them. Parameter statistics (the update
of each weight and, in float16 training, the share of gradient elements that would flush to zero
at candidate loss scales) use ``torch._foreach`` ops and one flat histogram.
"""

from __future__ import annotations

import functools
import math
import types
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.nn.modules.module import register_module_forward_hook

from floatscope._numerics.formats import dtype_name, format_of
from floatscope._numerics.stats import Scratch, l2_norms

__all__ = ["HealthSampler", "ACTIVATION_FIELDS", "ACTIVATION_RECORD", "DEVICE_FIELDS", "PARAM_FIELDS", "FLUSH_SCALES",
           "Layout"]

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


_MISSING = object()
_PLANS_KEPT = 8  # sets of roots whose layers are kept between sampling steps

# The working table of a sampling step on the device: one row per statistic, one column per layer (NaN:
# not measured). nan, inf and headroom_bits are derived from absmax (NaN and Inf propagate into it).
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


_PLAIN, _SATURATES, _RECTIFIES = 0, 1, 2
# Layers whose 3-d outputs are (N, C, L) and those whose are (N, L, features). Any other layer (an
# activation, dropout, a custom block) keeps the layout of the layer before it when it keeps its shape.
_CHANNELS_FIRST_1D = frozenset((
    "Conv1d", "ConvTranspose1d", "LazyConv1d", "LazyConvTranspose1d", "BatchNorm1d", "LazyBatchNorm1d",
    "InstanceNorm1d", "LazyInstanceNorm1d", "GroupNorm", "MaxPool1d", "AvgPool1d", "LPPool1d",
    "AdaptiveAvgPool1d", "AdaptiveMaxPool1d", "Dropout1d", "ConstantPad1d", "ReflectionPad1d",
    "ReplicationPad1d", "ZeroPad1d", "CircularPad1d", "Upsample"))
_FEATURES_LAST = frozenset((
    "Linear", "LazyLinear", "Bilinear", "LayerNorm", "RMSNorm", "Embedding", "MultiheadAttention", "LSTM", "GRU",
    "RNN", "TransformerEncoderLayer", "TransformerDecoderLayer"))


def _unit_dims(key: list[tuple[Any, torch.Size, Any, Any]], rectifying: list[int]) -> list[int]:
    """The dimension of each rectifier output's units: channels (dim 1) for images and volumes
    (N, C, H, W...) and for (N, C, L) after a 1-d convolution, pooling or norm; features (the last
    dim) otherwise. For a 3-d output the layout is the last layer of a known kind before it, looked
    up through the layers that kept its shape."""
    dims = []
    for i in rectifying:
        shape = key[i][1]
        dim = -1
        if len(shape) >= 4:
            dim = 1
        elif len(shape) == 3:
            for layer, before, _, _ in reversed(key[:i]):
                if before != shape:
                    break
                if layer.type in _CHANNELS_FIRST_1D:
                    dim = 1
                    break
                if layer.type in _FEATURES_LAST:
                    break
        dims.append(dim)
    return dims


class _Layer:
    """A named layer of a sampled root, kept from one sampling step to the next: the class whose
    ``forward`` it runs (``owner``), and the wrapper used when its forward is its instance's own."""

    __slots__ = ("name", "module", "type", "kind", "owner", "fast", "target", "forward", "wrapper", "copy")

    def __init__(self, name: str, module: torch.nn.Module, sampler: HealthSampler) -> None:
        self.name, self.module, self.type = name, module, type(module).__name__
        self.kind = (_SATURATES if isinstance(module, _SATURATING) else
                     _RECTIFIES if isinstance(module, _RECTIFIERS) else _PLAIN)
        self.owner = _forward_owner(type(module))
        self.copy = False  # the output is written in place later in the pass: keep a copy of it
        self.fast = self.kind != _SATURATES  # a tensor output is recorded as it is (no input, no copy)
        self.target: Any = None  # the instance forward that ``forward`` is bound from
        self.forward: Any = None
        layer = self

        def sampled_forward(*args: Any, **kwargs: Any) -> Any:
            output = layer.forward(*args, **kwargs)
            sampler._collect(layer, args, output)
            return output

        self.wrapper = sampled_forward


def _forward_owner(cls: type) -> type | None:
    """The class whose ``forward`` instances of ``cls`` run (None: only Module's placeholder)."""
    for klass in cls.__mro__:
        if "forward" in klass.__dict__:
            return None if klass is torch.nn.Module else klass
    return None


class _ClassWrapper:
    """The ``forward`` of one layer class for a sampling pass: the class's own function, then the
    output of each sampled instance recorded (other instances pass through). One attribute per class
    is set and removed, whatever the number of its layers, and a layer's call pays a dict lookup."""

    __slots__ = ("owner", "original", "layers", "function")

    def __init__(self, owner: type, sampler: HealthSampler) -> None:
        self.owner, self.original = owner, owner.__dict__["forward"]
        self.layers: dict[int, _Layer] = {}
        original, layers, collected, tensor = self.original, self.layers, sampler._collected, torch.Tensor

        @functools.wraps(original)  # name, docstring and __wrapped__: inspect.signature sees the class's own
        def forward(module: Any, *args: Any, **kwargs: Any) -> Any:
            output = original(module, *args, **kwargs)
            layer = layers.get(id(module))
            if layer is not None:
                if layer.fast and type(output) is tensor:
                    version = output._version
                    if not collected or collected[-1][1] is not output or collected[-1][3] != version:
                        collected.append((layer, output, None, version))
                    # else a container returning its last child's output, as recorded: measured under the child
                else:
                    sampler._collect(layer, args, output)
            return output

        self.function = forward


class _Plan:
    """The layers of one set of roots: by the class whose ``forward`` they run, those with none but
    Module's placeholder, and whether they need the global hook (a ``DataParallel`` root, whose
    replicas copy their modules' attributes, or a scripted layer)."""

    __slots__ = ("roots", "layers", "attrs", "by_owner", "unowned", "hooked")

    def __init__(self, roots: tuple[torch.nn.Module, ...], layers: list[_Layer]) -> None:
        self.roots, self.layers = roots, layers
        self.attrs = [layer.module.__dict__ for layer in layers]  # where an instance forward would be
        self.by_owner: dict[type, dict[int, _Layer]] = {}
        self.unowned: list[_Layer] = []
        for layer in layers:
            if layer.owner is torch.nn.Sequential and len(layer.module):
                continue  # its output is its last child's, measured under the child
            if layer.owner is None:
                self.unowned.append(layer)
            else:
                self.by_owner.setdefault(layer.owner, {})[id(layer.module)] = layer
        self.hooked = any(isinstance(r, torch.nn.DataParallel) for r in roots) or any(
            isinstance(layer.module, torch.jit.ScriptModule) for layer in layers)


class Layout:
    """How a sampling step's statistics are laid out, derived from its layers and their outputs'
    shapes alone, and kept from one sample to the next while they repeat (the Python work of a
    sample is per layer): the name, dtype and module type of each column, the groups of outputs
    reduced together, and the layers with a saturation or dead-unit statistic."""

    __slots__ = ("key", "names", "dtypes", "types", "device", "groups", "saturating", "rectifying", "_log2_max")

    def __init__(self, key: list[tuple[_Layer, torch.Size, torch.dtype, torch.device]]) -> None:
        self.key = key
        # A layer called more than once in the pass has a column per call: name, name#2, name#3, ...
        calls: dict[str, int] = {}
        self.names = []
        for layer, _, _, _ in key:
            k = calls[layer.name] = calls.get(layer.name, 0) + 1
            self.names.append(layer.name if k == 1 else f"{layer.name}#{k}")
        self.dtypes = [_DTYPE_NAMES.get(dtype) or dtype_name(dtype) for _, _, dtype, _ in key]
        self.types = [layer.type for layer, _, _, _ in key]
        self.device = key[0][3]
        by_shape: dict[tuple[torch.device, torch.dtype, torch.Size], list[int]] = {}
        for i, (_, shape, dtype, where) in enumerate(key):
            by_shape.setdefault((where, dtype, shape), []).append(i)
        # (device, the outputs' indices, their columns in the table: a slice where they are contiguous)
        self.groups: list[tuple[torch.device, list[int], slice | torch.Tensor]] = []
        for (where, _, shape), index in by_shape.items():
            per_chunk = max(1, _CHUNK_ELEMENTS // max(shape.numel(), 1))
            for start in range(0, len(index), per_chunk):
                part = index[start:start + per_chunk]
                columns = (slice(part[0], part[-1] + 1) if part[-1] - part[0] == len(part) - 1
                           else torch.tensor(part, device=self.device))
                self.groups.append((where, part, columns))
        self.saturating = [i for i, (layer, _, _, _) in enumerate(key) if layer.kind == _SATURATES]
        rectifying = [i for i, (layer, shape, _, _) in enumerate(key) if layer.kind == _RECTIFIES and len(shape)]
        self.rectifying = list(zip(rectifying, _unit_dims(key, rectifying), strict=True))  # (index, units' dim)
        self._log2_max: dict[torch.device, torch.Tensor] = {}

    def log2_max(self, device: torch.device) -> torch.Tensor:
        """log2 of each column's format maximum (NaN for a dtype without one), float32 on ``device``."""
        values = self._log2_max.get(device)
        if values is None:
            values = self._log2_max[device] = torch.tensor(
                [math.log2(m) if m else math.nan for m in map(_format_max, self.dtypes)], device=device)
        return values


def _same_outputs(collected: list[Any], key: list[tuple[_Layer, torch.Size, torch.dtype, torch.device]]) -> bool:
    """Whether the collected outputs are those ``key`` describes, layer by layer, each as its layer
    returned it (the common case: every sample of a training run)."""
    for (layer, out, _, version), (expected, shape, dtype, device) in zip(collected, key, strict=True):
        if (layer is not expected or (version >= 0 and out._version != version) or out.shape != shape
                or out.dtype != dtype or out.device != device):
            return False
    return True


class HealthSampler:
    """Collects per-layer statistics on sampling steps; see the module docstring."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.types: dict[str, str] = {}
        self._handle: Any = None
        self._plans: dict[tuple[int, ...], _Plan] = {}
        self._by_module: dict[int, _Layer] = {}  # for the global hook
        self._classes: dict[type, _ClassWrapper] = {}  # kept between samples
        self._installed: list[_ClassWrapper] = []  # the class forwards set for this pass
        self._wrapped: list[tuple[_Layer, Any]] = []  # (layer, the instance forward its wrapper replaced)
        # (layer, its output, the input of a saturating layer, the output's version; -1: a copy). One list
        # for the sampler's life: the class wrappers append to it.
        self._collected: list[tuple[_Layer, torch.Tensor, torch.Tensor | None, int]] = []
        self._seen: set[tuple[int, int]] = set()  # outputs already recorded as a copy
        self._snapshot: list[torch.Tensor] | _SnapshotPlan | None = None
        self._copies: tuple[Any, _SnapshotPlan] | None = None  # kept snapshot buffers (CPU)
        self._scratch = Scratch()
        self._layout: Layout | None = None

    def is_sampling(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    # ------------------------------------------------------------------ activations
    def _plan_of(self, roots: list[torch.nn.Module]) -> _Plan:
        """The named layers of ``roots`` (the first root wins for a shared layer), built once per
        roots; see :class:`_Plan`.

        A plan holds its roots, so their ids are not reused while it is kept; the last few are kept
        (a script that builds a new model now and then does not grow the cache).
        """
        key = tuple(id(r) for r in roots)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        layers, seen = [], set()
        for root in roots:
            for name, module in root.named_modules():
                self.types.setdefault(name, type(module).__name__)
                if name and id(module) not in seen:
                    seen.add(id(module))
                    layers.append(_Layer(name, module, self))
        while len(self._plans) >= _PLANS_KEPT:
            del self._plans[next(iter(self._plans))]
        plan = self._plans[key] = _Plan(tuple(roots), layers)
        return plan

    def attach(self, roots: list[torch.nn.Module]) -> None:
        """Keep every named layer's output of the coming forward pass of ``roots``.

        Each layer class's ``forward`` is wrapped for the pass (see :class:`_ClassWrapper`); a layer
        whose instance has a ``forward`` of its own (as accelerate's hooks set) has it wrapped instead.
        """
        self.detach()
        self._collected.clear()
        self._seen = set()
        if any(type(r).__name__ == "OptimizedModule" or getattr(r, "_compiled_call_impl", None) is not None
               for r in roots):
            return  # a compiled model: wrappers or hooks would be traced and break its graphs
        plan = self._plan_of(roots)
        if plan.hooked:
            self._by_module = {id(layer.module): layer for layer in plan.layers}
            self._handle = register_module_forward_hook(self._hook)
            return
        own = [layer for layer, attrs in zip(plan.layers, plan.attrs, strict=True) if "forward" in attrs]
        skip = {id(layer.module) for layer in own}
        for owner, table in plan.by_owner.items():
            wrapper = self._classes.get(owner)
            current = owner.__dict__.get("forward")
            if wrapper is None or current is not wrapper.original:
                if not isinstance(current, types.FunctionType):  # not a plain function: wrap the instances
                    own += [layer for layer in table.values() if id(layer.module) not in skip]
                    continue
                wrapper = self._classes[owner] = _ClassWrapper(owner, self)
            wrapper.layers.update(table)
            for i in skip.intersection(table):
                del wrapper.layers[i]
            type.__setattr__(owner, "forward", wrapper.function)
            self._installed.append(wrapper)
        own += plan.unowned
        missing, wrapped = _MISSING, self._wrapped
        for layer in own:
            module = layer.module
            attrs = module.__dict__
            previous = attrs.get("forward", missing)
            target = previous if previous is not missing else type(module).forward
            if layer.target is not target:  # first use, or the layer's forward was replaced since
                layer.target, layer.forward = target, module.forward
                layer.wrapper.__wrapped__ = layer.forward  # inspect.signature sees the layer's own
            attrs["forward"] = layer.wrapper
            wrapped.append((layer, previous))

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        layer = self._by_module.get(id(module))
        if layer is not None:
            self._collect(layer, args, output)

    def _collect(self, layer: _Layer, args: Any, output: Any) -> None:
        """Record one layer's output: the general case (the class wrappers record a plain tensor output
        themselves). Outputs that are not floating point or empty are dropped at the end, and so is a
        container's output that is its last child's tensor (measured once, under the child)."""
        out = output if isinstance(output, torch.Tensor) else next(
            (t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)), None)
        if out is None:
            return
        inp = None
        if layer.kind == _SATURATES:
            inp = next((t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor) and t.is_floating_point()),
                       None)
        if layer.copy:  # the pass writes this output in place later (an in-place ReLU, `out += identity`)
            key = (id(out), out._version)
            if key in self._seen:
                return
            self._seen.add(key)
            with torch.no_grad():
                self._collected.append((layer, out.detach().clone(), inp, -1))
        else:
            self._collected.append((layer, out, inp, out._version))

    def detach(self) -> None:
        """Stop collecting: remove the hook, put back every class ``forward`` and every wrapped
        layer's own."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        installed, self._installed = self._installed, []
        for wrapper in reversed(installed):
            wrapper.layers.clear()
            if wrapper.owner.__dict__.get("forward") is wrapper.function:  # one the script set meanwhile stays
                type.__setattr__(wrapper.owner, "forward", wrapper.original)
        wrapped, self._wrapped = self._wrapped, []
        for layer, previous in reversed(wrapped):
            attrs = layer.module.__dict__
            if attrs.get("forward") is layer.wrapper:  # a forward the script set meanwhile stays
                if previous is _MISSING:
                    del attrs["forward"]
                else:
                    attrs["forward"] = previous

    def close(self) -> None:
        """Detach and forget the layers (the watch has ended)."""
        self.detach()
        self._plans.clear()
        self._classes.clear()
        self._by_module = {}
        self._layout = None

    @property
    def attached(self) -> bool:
        return self._handle is not None or bool(self._wrapped) or bool(self._installed)

    @staticmethod
    def _keep(collected: list[Any], seen: set[tuple[int, int]]) -> list[Any]:
        """The collected outputs to measure: floating point, not empty, as their layers returned them,
        each tensor once."""
        kept = []
        for c in collected:
            layer, out, _, version = c
            if version >= 0:
                if out._version != version:
                    # Written in place after the layer returned: what is here is not its output. The
                    # layer's output is copied when it returns from the next sample on.
                    layer.copy, layer.fast = True, False
                    continue
                ident = (id(out), version)
                if ident in seen:
                    continue  # a container returning a child's tensor: measured once, under the child
                seen.add(ident)
            if out.dtype.is_floating_point and out.numel():
                kept.append(c)
        return kept

    def take_activations(self) -> tuple[Layout | None, torch.Tensor | None]:
        """Statistics of the collected outputs: their :class:`Layout` and one (9, layers) float32
        tensor, a row per numeric field of ACTIVATION_RECORD (NaN: not measured)."""
        self.detach()
        collected = self._collected[:]
        self._collected.clear()
        seen, self._seen = self._seen, set()
        layout = self._layout
        if layout is not None and len(collected) == len(layout.key) and _same_outputs(collected, layout.key):
            kept = collected  # the layers and their outputs' shapes repeat: the layout holds
        else:
            kept = self._keep(collected, seen)
        if not kept:
            return None, None
        if layout is None or kept is not collected:
            key = [(layer, out.shape, out.dtype, out.device) for layer, out, _, _ in kept]
            if layout is None or layout.key != key:  # the layers or their outputs' shapes changed
                layout = self._layout = Layout(key)
        device = layout.device
        with torch.no_grad():
            table = torch.full((len(DEVICE_FIELDS), len(kept)), math.nan, device=device)
            for where, part, columns in layout.groups:
                stats = _group_stats([kept[i][1] for i in part], self._scratch)
                if where != device:
                    stats = stats.to(device)
                table[:stats.shape[0], columns] = stats  # absmax, rms (, zero_frac, below_normal_frac)
            for i in layout.saturating:
                inp = kept[i][2]
                if inp is not None:
                    table[4, i] = (inp.abs() > 5.0).float().mean().to(device)
            for i, dim in layout.rectifying:
                units = kept[i][1].movedim(dim, -1)
                table[5, i] = (units.reshape(-1, units.shape[-1]) == 0).all(dim=0).float().mean().to(device)
            absmax = table[0]
            # headroom: log2(format max / absmax); log2 of each, so a tiny absmax does not overflow the ratio.
            # An absmax of Inf gives -inf, of 0 or NaN no value (read back as None).
            headroom = layout.log2_max(device) - absmax.log2()
            record = torch.stack([absmax, table[1], table[2], absmax.isnan().float(), (absmax == math.inf).float(),
                                  table[3], table[4], table[5], headroom])
        return layout, record

    # ------------------------------------------------------------------ parameters
    def snapshot(self, params: list[torch.Tensor]) -> None:
        """Copy ``params`` before the optimizer step, for :meth:`after_step`'s update norms.

        On the CPU, when the parameters (at most ``_COPY_ELEMENTS`` elements in all) are mostly of a
        few shapes, each shape's parameters are stacked into one buffer kept from one sampling step to
        the next: one copy per shape now, and after the step one stack, one subtraction and one row
        norm per shape (a fresh allocation of a few megabytes page-faults, and each op call costs
        more than its arithmetic). Elsewhere (a GPU's caching allocator reuses memory, its foreach
        kernels are fused) the parameters are copied with one foreach op.
        """
        with torch.no_grad():  # no detach needed: nothing made under no_grad is tracked
            self._snapshot = None
            if not params:
                return
            if params[0].device.type == "cpu" and sum(p.numel() for p in params) <= _COPY_ELEMENTS:
                key = tuple((p.shape, p.dtype, p.device) for p in params)
                if self._copies is None or self._copies[0] != key:
                    self._copies = (key, _SnapshotPlan(params))
                plan = self._copies[1]
                plan.copy(params)
                self._snapshot = plan
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
        if snapshot is None:
            return None
        with torch.no_grad():
            if isinstance(snapshot, _SnapshotPlan):
                return snapshot.update_norms(params) if snapshot.size == len(params) else None
            if len(snapshot) != len(params):
                return None
            torch._foreach_sub_(snapshot, params)
            if all(s.dtype == torch.float32 for s in snapshot) and len({s.device for s in snapshot}) == 1:
                return l2_norms(snapshot, scratch=self._scratch)
            return None, torch.stack([n.float() for n in torch._foreach_norm(snapshot)])


class _SnapshotPlan:
    """Kept CPU buffers for the parameters' snapshot: one (k, *shape) block per shape and dtype held
    by several parameters, a copy of its own for each other parameter."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.size = len(params)
        by_kind: dict[tuple[torch.Size, torch.dtype], list[int]] = {}
        for i, p in enumerate(params):
            by_kind.setdefault((p.shape, p.dtype), []).append(i)
        self.blocks: list[tuple[list[int], torch.Tensor, list[torch.Tensor]]] = []  # (indices, block, its rows)
        self.single: list[int] = []
        for (shape, dtype), index in by_kind.items():
            if len(index) > 1:
                block = torch.empty((len(index), *shape), dtype=dtype)
                self.blocks.append((index, block, list(block.unbind(0))))
            else:
                self.single += index
        self.copies = [torch.empty_like(params[i], memory_format=torch.contiguous_format) for i in self.single]
        self.order = [i for index, _, _ in self.blocks for i in index] + self.single

    def copy(self, params: list[torch.Tensor]) -> None:
        for index, before, _ in self.blocks:
            torch.stack([params[i] for i in index], out=before)
        if self.single:
            torch._foreach_copy_(self.copies, [params[i] for i in self.single])

    def update_norms(self, params: list[torch.Tensor]) -> tuple[list[int], torch.Tensor]:
        parts = []
        for index, before, rows in self.blocks:
            torch._foreach_sub_(rows, [params[i] for i in index])  # before - after, row by row in place
            parts.append(torch.linalg.vector_norm(before.reshape(len(index), -1), dim=1, dtype=torch.float32))
        if self.single:
            singles = [params[i] for i in self.single]
            torch._foreach_sub_(self.copies, singles)
            parts.append(torch.stack([n.float() for n in torch._foreach_norm(self.copies)]))
        return self.order, torch.cat(parts) if len(parts) > 1 else parts[0]


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
