"""Where does non-determinism enter? The same forward (and backward), run under different settings.

Each run records, op by op, the first floating output of every aten op (a ``TorchDispatchMode``)
and the module it ran in. Runs are aligned by op sequence and compared bitwise. The settings:

* ``repeat``: the same run twice, same seed, same threads;
* ``threads``: 1 intra-op thread against the current count (or 2 when it is 1);
* ``reduction-order``: the batch permuted, so sums over the batch add in another order; outputs
  whose first dim is the batch are un-permuted before comparison.

For the first op that differs, the report gives its module and how far apart the values are, in
ULPs of the output dtype. It also says whether the op is on PyTorch's list of non-deterministic ops
(those ``torch.use_deterministic_algorithms`` guards, per its documentation), and whether the
difference survives ``floatscope.seed_everything(0, deterministic=True)``.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from floatscope._errors import UsageError
from floatscope._events import op_base
from floatscope._instrument import ops
from floatscope._instrument.modules import ModuleTracker
from floatscope._numerics.errors import ulp
from floatscope._numerics.formats import format_of
from floatscope._results import to_json_value
from floatscope._engines.repro import seed_everything

__all__ = ["DeterminismResult", "SettingResult", "check_determinism", "NONDETERMINISTIC_OPS"]

# Ops that torch.use_deterministic_algorithms(True) makes deterministic or rejects (its documentation
# lists them; most only on CUDA): the op taxonomy's NONDETERMINISTIC kind.
NONDETERMINISTIC_OPS = frozenset(name for name, kind in ops._TABLE.items() if kind & ops.NONDETERMINISTIC)


@dataclass(frozen=True)
class SettingResult:
    setting: str
    identical: bool
    ops_compared: int
    first_op: str | None
    first_op_index: int | None
    module: str | None
    phase: str | None
    max_ulp: float | None
    max_abs: float | None
    on_nondeterministic_list: bool | None
    fixed_by_seed_everything: bool | None
    note: str = ""


@dataclass(frozen=True)
class DeterminismResult:
    settings: list[SettingResult]

    def to_dict(self) -> dict[str, Any]:
        return to_json_value(asdict(self))


class _Recorder(TorchDispatchMode):
    def __init__(self, module_of: Callable[[], str | None]) -> None:
        super().__init__()
        self.module_of = module_of
        self.ops: list[tuple[str, str | None, str, torch.Tensor]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if ops.is_(name, ops.NOT_COMPUTE):
            return out
        leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if leaves:
            phase = "backward" if torch._C._current_autograd_node() is not None else "forward"
            self.ops.append((name, self.module_of(), phase, leaves[0].detach().clone()))
        return out


_RANDOM_OPS = {"bernoulli", "native_dropout", "dropout", "rand", "randn", "rand_like", "randn_like", "randint",
               "normal", "uniform", "multinomial", "exponential", "randperm", "random"}


def _run(model: torch.nn.Module, inputs: tuple[Any, ...], backward: bool, threads: int | None = None,
         perm: torch.Tensor | None = None) -> list[tuple[str, str | None, str, torch.Tensor]]:
    tracker = ModuleTracker(model)
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    rng = torch.get_rng_state()
    torch.manual_seed(0)
    recorder = _Recorder(tracker.current_path)
    try:
        if perm is not None:
            inputs = tuple(x[perm] if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in inputs)
        inputs = tuple(x.detach().clone().requires_grad_(backward) if isinstance(x, torch.Tensor) and
                       x.is_floating_point() else x for x in inputs)
        with tracker, recorder, torch.set_grad_enabled(backward):
            out = model(*inputs)
            if backward:
                leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
                grads = torch.autograd.grad([t.float().sum() for t in leaves],
                                            [p for p in model.parameters() if p.requires_grad], allow_unused=True)
                del grads
    finally:
        torch.set_rng_state(rng)
        torch.set_num_threads(saved_threads)
    return recorder.ops


def _unpermute(t: torch.Tensor, perm: torch.Tensor | None, batch: int) -> torch.Tensor:
    if perm is None or t.dim() == 0 or t.shape[0] != batch:
        return t
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm))
    return t[inverse]


def _compare(a: list[Any], b: list[Any], perm: torch.Tensor | None, batch: int) -> tuple[int, int | None, float, float]:
    n = min(len(a), len(b))
    for i in range(n):
        ta, tb = a[i][3], _unpermute(b[i][3], perm, batch)
        if ta.shape != tb.shape or a[i][0] != b[i][0]:
            return n, i, float("nan"), float("nan")
        if not torch.equal(ta, tb):
            both_nan = torch.isnan(ta) & torch.isnan(tb)
            diff = (ta.double() - tb.double()).abs().masked_fill(both_nan, 0.0)
            if float(diff.max()) == 0.0:
                continue
            return n, i, float((diff / ulp(ta.double(), format_of(ta.dtype))).max()), float(diff.max())
    return n, None, 0.0, 0.0


@contextlib.contextmanager
def _deterministic_flags() -> Iterator[None]:
    import os

    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    try:
        seed_everything(0, deterministic=True)
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[4]


def check_determinism(model: torch.nn.Module, inputs: tuple[Any, ...] | Any, *,
                      backward: bool = False) -> DeterminismResult:
    """Run ``model`` under each setting and report where results first differ bitwise.

    Example:
        >>> r = check_determinism(torch.nn.Linear(4, 2), (torch.randn(8, 4),))
        >>> r.settings[0].identical
        True
    """
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"check_determinism() expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inputs, tuple):
        inputs = (inputs,)
    batch = next((x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0), 0)
    threads = torch.get_num_threads()
    other_threads = 1 if threads > 1 else 2
    g = torch.Generator().manual_seed(1234)
    perm = torch.randperm(batch, generator=g) if batch > 1 else None
    plans: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("repeat", {}, {}),
        (f"threads {threads} vs {other_threads}", {"threads": threads}, {"threads": other_threads}),
    ]
    if perm is not None:
        plans.append(("reduction-order (batch permuted)", {}, {"perm": perm}))
    results = []
    for label, first_kwargs, second_kwargs in plans:
        a = _run(model, inputs, backward, **first_kwargs)
        b = _run(model, inputs, backward, **second_kwargs)
        n, index, max_ulp, max_abs = _compare(a, b, second_kwargs.get("perm"), batch)
        if index is None:
            results.append(SettingResult(label, True, n, None, None, None, None, 0.0, 0.0, None, None))
            continue
        op, module, phase, _ = a[index]
        base = op_base(op)
        with _deterministic_flags():
            a2 = _run(model, inputs, backward, **first_kwargs)
            b2 = _run(model, inputs, backward, **second_kwargs)
        fixed = _compare(a2, b2, second_kwargs.get("perm"), batch)[1] is None
        note = ""
        random = base.rstrip("_") in _RANDOM_OPS
        if random:
            # A random op's output differs because the RNG stream met it in another order or layout (a
            # permuted batch draws each row's mask from other numbers): not rounding.
            note = (f"{base} draws random numbers: its output differs because the RNG stream is consumed in another "
                    f"order or layout, not because of rounding (a ULP count means nothing for a 0/1 mask); seed "
                    f"and keep the batch layout to compare, or compare in eval mode")
        elif "reduction-order" in label or "threads" in label:
            note = ("floating-point addition is not associative: summing in another order (other thread blocking, "
                    "other batch order) rounds differently; this is expected and bounded, not a bug")
        if label == "repeat" and not random:
            note = "the same run, repeated, differs: something in it is non-deterministic"
        results.append(SettingResult(label, False, n, op, index, module, phase, None if random else max_ulp, max_abs,
                                     ops.is_(base, ops.NONDETERMINISTIC), fixed, note))
    return DeterminismResult(results)
