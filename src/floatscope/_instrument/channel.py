"""The step channel: the one transfer that brings a step's numbers from the device to the host.

Everything the watch needs to know about a step is queued here as device tensors: the tensors
whose finiteness must be checked (*subjects*: model outputs, values computed outside modules,
gradients, parameters) and the numbers to record (*payload*: the loss, the loss scale, health
statistics). :meth:`StepChannel.transfer` reduces every subject to its L2 norm with one
``torch._foreach_norm`` per (device, dtype) group (on the CPU, small tensors of one size are stacked
and reduced together instead) and concatenates norms and payload into one
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

from floatscope._numerics.stats import Scratch, l2_norms

__all__ = ["Subject", "Group", "Payload", "Reading", "StepChannel", "SyncPolicy"]

SyncPolicy = Literal["auto", "step", "lazy"]
Role = Literal["output", "call", "loss", "grad", "param", "update", "checked", "grad-result", "initial", "state"]
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
class Group:
    """Tensors of one role checked together (a model's gradients): their norms come back in order."""

    role: Role
    tensors: list[torch.Tensor]
    names: list[str] | None = None
    order: int = 0
    window: int = -1
    step: int = -1

    def subject(self, i: int) -> Subject:
        return Subject(self.role, self.tensors[i], None, self.order, self.names[i] if self.names else None,
                       self.window, self.step)


@dataclass(eq=False)
class Payload:
    """Numbers to read with the transfer: ``tensor`` is flattened to float32; ``meta`` tells the reader."""

    kind: str
    tensor: torch.Tensor
    meta: Any = None


@dataclass(eq=False)
class Reading:
    """One completed transfer: the norm of each tensor of each group, and the values of each payload."""

    groups: list[tuple[Group | Subject, list[float]]]
    payload: list[tuple[Payload, list[float]]]
    unverified: list[Subject] = field(default_factory=list)  # +inf norms that could not be re-checked

    def bad(self) -> list[Subject]:
        """The subjects that really hold NaN or Inf (overflowed norms of finite values excluded)."""
        found = []
        for entry, norms in self.groups:
            if math.isfinite(sum(norms)):  # norms are >= 0 (float32 values: the sum cannot overflow a double)
                continue
            for i, n in enumerate(norms):
                if not math.isfinite(n):
                    found.append(entry.subject(i) if isinstance(entry, Group) else entry)
        return found


@dataclass(eq=False)
class _InFlight:
    entries: list[Group | Subject]
    payload: list[Payload]
    blocks: dict[torch.device, tuple[torch.Tensor, Any]]  # device -> (host or device buffer, event or None)
    where: list[tuple[torch.device, int]]  # each checked tensor: its device and position there
    offsets: list[tuple[torch.device, int, int]]  # each payload: device, start, length
    tensors: list[torch.Tensor]
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
        self.entries: list[Group | Subject] = []
        self.payload: list[Payload] = []
        self.in_flight: list[_InFlight] = []
        self.on_transfer = on_transfer
        self.transfers = 0
        self._scratch = Scratch()

    def check(self, subject: Subject | Group) -> None:
        self.entries.append(subject)

    def record(self, payload: Payload) -> None:
        self.payload.append(payload)

    @property
    def pending(self) -> bool:
        return bool(self.entries or self.payload)

    # ------------------------------------------------------------------ the transfer
    def transfer(self, *, blocking: bool | None = None) -> list[Reading]:
        """Start the transfer of everything queued; return the readings that have arrived.

        ``blocking`` overrides the policy: True reads now (the end of a run), False never waits.
        """
        for flight in self.in_flight:
            flight.deferred = False
        if self.entries or self.payload:
            self.in_flight.append(self._launch(blocking))
        return self.poll(wait=bool(blocking))

    def poll(self, *, wait: bool = False) -> list[Reading]:
        """The readings whose copies have completed (all of them with ``wait``), oldest first."""
        done: list[Reading] = []
        while self.in_flight:
            flight = self.in_flight[0]
            if not wait and (flight.deferred or
                             not all(event is None or event.query() for _, event in flight.blocks.values())):
                break
            for _, event in flight.blocks.values():
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
        entries, payload = self.entries, self.payload
        self.entries, self.payload = [], []
        tensors = [t for e in entries for t in (e.tensors if isinstance(e, Group) else (e.tensor,))]
        versions = [t._version for t in tensors]
        parts: dict[torch.device, list[torch.Tensor]] = {}
        sizes: dict[torch.device, int] = {}
        where: list[tuple[torch.device, int]] = [(torch.device("cpu"), 0)] * len(tensors)
        offsets: list[tuple[torch.device, int, int]] = []
        with torch.no_grad():
            for device, index, norms in _norms(tensors, self._scratch):
                start = sizes.get(device, 0)
                parts.setdefault(device, []).append(norms)
                sizes[device] = start + len(index)
                for k, i in enumerate(index):
                    where[i] = (device, start + k)
            for p in payload:
                block = p.tensor.detach().reshape(-1).to(torch.float32)
                start = sizes.get(block.device, 0)
                parts.setdefault(block.device, []).append(block)
                sizes[block.device] = start + block.numel()
                offsets.append((block.device, start, block.numel()))
        blocks: dict[torch.device, tuple[torch.Tensor, Any]] = {}
        for device, pieces in parts.items():
            flat = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
            if self._lazy(device, blocking) and device.type == "cuda":
                host = torch.empty(flat.numel(), dtype=torch.float32, pin_memory=True)  # one per flight
                host.copy_(flat, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                blocks[device] = (host, event)
            else:
                blocks[device] = (flat, None)
        deferred = any(d.type == "cpu" for d in blocks) and self._lazy(torch.device("cpu"), blocking)
        return _InFlight(entries, payload, blocks, where, offsets, tensors, versions, deferred)

    def _decode(self, flight: _InFlight) -> Reading:
        self.transfers += 1
        if self.on_transfer is not None:
            self.on_transfer()
        values = {device: host.tolist() for device, (host, _) in flight.blocks.items()}
        norms = [values[device][k] for device, k in flight.where]
        unverified_at: list[int] = []
        for i, n in enumerate(norms):
            if n == math.inf:  # an Inf, or finite values whose sum of squares overflowed: check exactly
                t = flight.tensors[i]
                if t._version != flight.versions[i]:
                    unverified_at.append(i)
                elif bool(torch.isfinite(t).all()):
                    norms[i] = _F32_MAX
        groups: list[tuple[Group | Subject, list[float]]] = []
        position = 0
        for entry in flight.entries:
            n = len(entry.tensors) if isinstance(entry, Group) else 1
            groups.append((entry, norms[position:position + n]))
            position += n
        payload = [(p, values[device][start:start + length])
                   for p, (device, start, length) in zip(flight.payload, flight.offsets, strict=True)]
        reading = Reading(groups, payload)
        if unverified_at:
            flat = [(entry, i) for entry, _ in groups for i in range(len(entry.tensors) if isinstance(entry, Group) else 1)]
            for k in unverified_at:
                entry, i = flat[k]
                reading.unverified.append(entry.subject(i) if isinstance(entry, Group) else entry)
        return reading


def _norms(tensors: list[torch.Tensor], scratch: Scratch | None = None) -> list[tuple[torch.device, list[int],
                                                                                   torch.Tensor]]:
    """Per-tensor L2 norms (NaN and Inf propagate), float32 vectors per (device, dtype) group.

    Returns ``[(device, indices into tensors, norms)]``: ``norms[k]`` is the norm of ``tensors[indices[k]]``.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    out = []
    for (device, dtype), index in groups.items():
        group = [tensors[i] for i in index]
        if dtype in _HALF or dtype == torch.float32:
            order, norms = l2_norms(group, torch.float32 if dtype in _HALF else None, scratch)
            if order is not None:
                index = [index[k] for k in order]
        else:  # float64 and others: norm natively, saturate finite values into float32's range
            n = torch.stack([torch.linalg.vector_norm(t.to(torch.float64) if not t.is_floating_point() else t)
                             for t in group])
            norms = torch.where(torch.isfinite(n), n.clamp(-_F32_MAX, _F32_MAX), n).to(torch.float32)
        out.append((device, index, norms))
    return out
