"""The step channel: the one transfer that brings a step's numbers from the device to the host.

Everything the watch needs to know about a step is queued here as device tensors: the tensors
whose finiteness must be checked (*subjects*: model outputs, values computed outside modules,
gradients, parameters) and the numbers to record (*payload*: the loss, the loss scale, health
statistics). :meth:`StepChannel.transfer` reduces every subject to its L2 norm with one
``torch._foreach_norm`` per (device, dtype) group and concatenates norms and payload into one
float32 vector per device, read with a single copy.

The L2 norm is NaN exactly when a tensor holds a NaN, and +inf when it holds an Inf *or* when
finite values beyond about 1.8e19 overflow the float32 sum of squares. A +inf norm is therefore
re-checked exactly (``isfinite(t).all()``) before anything is reported, as long as the tensor has
not changed since (its version counter says so); an overflowed norm of finite values never
becomes an incident.

Reading policy:

* ``"step"``: read at once (on CUDA this waits for the device at the step boundary);
* ``"lazy"``: start a non-blocking copy into pinned memory and read it when it has arrived, at the
  next boundary (one step late on a GPU, which then never waits for the host);
* ``"auto"``: CPU tensors are read at once (reading host memory is not a device sync), CUDA ones
  lazily.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

__all__ = ["Subject", "Payload", "Reading", "StepChannel", "SyncPolicy"]

SyncPolicy = Literal["auto", "step", "lazy"]
Role = Literal["output", "call", "loss", "grad", "param", "update", "checked", "grad-result", "initial"]
_HALF = (torch.float16, torch.bfloat16)
_F32_MAX = 3.4028234663852886e38


@dataclass(eq=False)
class Subject:
    """A tensor whose finiteness one transfer checks.

    ``event`` is the capture event that produced it (or None), ``order`` its position in its
    window's timeline (``window``); ``name`` a parameter's name; ``step`` the iteration it
    belongs to, for the record.
    """

    role: Role
    tensor: torch.Tensor
    event: Any = None
    order: int = 0
    name: str | None = None
    window: int = -1
    step: int = -1


@dataclass(eq=False)
class Payload:
    """Numbers to read with the transfer: ``tensor`` is flattened to float32; ``meta`` tells the reader."""

    kind: str
    tensor: torch.Tensor
    meta: Any = None


@dataclass(eq=False)
class Reading:
    """One completed transfer: the norm of each subject and the values of each payload."""

    subjects: list[Subject]
    norms: list[float]
    payload: list[tuple[Payload, list[float]]]
    unverified: list[Subject] = field(default_factory=list)  # +inf norms that could not be re-checked

    def bad(self) -> list[Subject]:
        """The subjects that really hold NaN or Inf (overflowed norms of finite values excluded)."""
        return [s for s, n in zip(self.subjects, self.norms, strict=True) if not math.isfinite(n)]


@dataclass(eq=False)
class _InFlight:
    subjects: list[Subject]
    payload: list[Payload]
    blocks: list[tuple[torch.device, torch.Tensor, Any]]  # (device, host buffer, event or None)
    layout: list[tuple[torch.device, int, int]]  # per subject/payload: device, start, length
    versions: list[int]
    deferred: bool = False  # lazy policy on the CPU: read at the next transfer, like a GPU copy one step late


class StepChannel:
    """Queue subjects and payload; read them with one transfer per device. See the module docstring.

    Args:
        policy: ``"auto"``, ``"step"`` or ``"lazy"``.
        on_transfer: Called once per transfer (tests count the host reads with it).

    Example:
        >>> channel = StepChannel()
        >>> channel.check(Subject("call", torch.tensor([1.0, float("nan")])))
        >>> [s.role for s in channel.transfer()[0].bad()]
        ['call']
    """

    def __init__(self, policy: SyncPolicy = "auto", on_transfer: Callable[[], None] | None = None) -> None:
        self.policy = policy
        self.subjects: list[Subject] = []
        self.payload: list[Payload] = []
        self.in_flight: list[_InFlight] = []
        self.on_transfer = on_transfer
        self.transfers = 0

    def check(self, subject: Subject) -> None:
        self.subjects.append(subject)

    def record(self, payload: Payload) -> None:
        self.payload.append(payload)

    @property
    def pending(self) -> bool:
        return bool(self.subjects or self.payload)

    # ------------------------------------------------------------------ the transfer
    def transfer(self, *, blocking: bool | None = None) -> list[Reading]:
        """Start the transfer of everything queued; return the readings that have arrived.

        ``blocking`` overrides the policy: True reads now (the end of a run), False never waits.
        """
        for flight in self.in_flight:
            flight.deferred = False
        if self.subjects or self.payload:
            self.in_flight.append(self._launch(blocking))
        return self.poll(wait=bool(blocking))

    def poll(self, *, wait: bool = False) -> list[Reading]:
        """The readings whose copies have completed (all of them with ``wait``), oldest first."""
        done: list[Reading] = []
        while self.in_flight:
            flight = self.in_flight[0]
            if not wait and (flight.deferred or
                             not all(event is None or event.query() for _, _, event in flight.blocks)):
                break
            for _, _, event in flight.blocks:
                if event is not None:
                    event.synchronize()
            self.in_flight.pop(0)
            done.append(self._decode(flight))
        return done

    def _lazy(self, device: torch.device, blocking: bool | None) -> bool:
        if blocking is not None:
            return not blocking
        if self.policy == "step":
            return False
        if self.policy == "lazy":
            return True
        return device.type != "cpu"

    def _launch(self, blocking: bool | None) -> _InFlight:
        subjects, payload = self.subjects, self.payload
        self.subjects, self.payload = [], []
        versions = [s.tensor._version for s in subjects]
        parts: dict[torch.device, list[torch.Tensor]] = {}
        sizes: dict[torch.device, int] = {}
        layout: list[tuple[torch.device, int, int]] = []

        def place(device: torch.device, block: torch.Tensor) -> None:
            start = sizes.get(device, 0)
            parts.setdefault(device, []).append(block)
            sizes[device] = start + block.numel()
            layout.append((device, start, block.numel()))

        with torch.no_grad():
            norms = _norms([s.tensor for s in subjects])
            for norm in norms:
                place(norm.device, norm.reshape(1))
            for p in payload:
                place(p.tensor.device, p.tensor.detach().reshape(-1).to(torch.float32))
        blocks = []
        for device, tensors in parts.items():
            flat = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
            if self._lazy(device, blocking) and device.type == "cuda":
                host = self._pinned_buffer(device, flat.numel())
                host.copy_(flat, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                blocks.append((device, host, event))
            else:
                blocks.append((device, flat, None))
        deferred = any(device.type == "cpu" for device, _, _ in blocks) and self._lazy(torch.device("cpu"), blocking)
        return _InFlight(subjects, payload, blocks, layout, versions, deferred)

    def _pinned_buffer(self, device: torch.device, n: int) -> torch.Tensor:
        # One pinned buffer per transfer in flight: a reused one could be overwritten before it is read.
        return torch.empty(n, dtype=torch.float32, pin_memory=True)

    def _decode(self, flight: _InFlight) -> Reading:
        self.transfers += 1
        if self.on_transfer is not None:
            self.on_transfer()
        values: dict[torch.device, list[float]] = {device: host.tolist() for device, host, _ in flight.blocks}
        n = len(flight.subjects)
        norms = []
        for i in range(n):
            device, start, _ = flight.layout[i]
            norms.append(values[device][start])
        payload = []
        for j, p in enumerate(flight.payload):
            device, start, length = flight.layout[n + j]
            payload.append((p, values[device][start:start + length]))
        reading = Reading(flight.subjects, norms, payload)
        for i, (s, norm) in enumerate(zip(flight.subjects, norms, strict=True)):
            if norm == math.inf:
                if s.tensor._version == flight.versions[i]:
                    if bool(torch.isfinite(s.tensor).all()):
                        reading.norms[i] = _F32_MAX  # finite values whose sum of squares overflowed
                else:
                    reading.unverified.append(s)
        return reading


def _norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor L2 norms as float32 0-d tensors (NaN and Inf propagate), grouped by device and dtype."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    for (_, dtype), index in groups.items():
        group = [tensors[i] for i in index]
        if dtype in _HALF:
            norms = torch._foreach_norm(group, 2, dtype=torch.float32)
        elif dtype == torch.float32:
            norms = torch._foreach_norm(group, 2)
        else:  # float64 and others: norm natively, saturate finite values into float32's range
            norms = []
            for t in group:
                n = torch.linalg.vector_norm(t.to(torch.float64) if not t.is_floating_point() else t)
                norms.append(torch.where(torch.isfinite(n), n.clamp(-_F32_MAX, _F32_MAX), n).to(torch.float32))
        for i, n in zip(index, norms, strict=True):
            out[i] = n
    return [n for n in out if n is not None]
