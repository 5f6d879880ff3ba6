"""The run recorder: the only code that writes a watched run into the run store.

It turns what the watch read from the device (step numbers, fingerprints, health statistics) and
what it saw on the host (the model, the optimizers, the precision settings) into store rows.
Per-step rows of one iteration are assembled here before they are written, so an iteration with
several optimizers or accumulated micro-batches is one row.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import torch

from floatscope._engines.repro import last_seeding
from floatscope._instrument.autocast import autocast_state
from floatscope._instrument.channel import Payload
from floatscope._instrument.health import ACTIVATION_RECORD, FLUSH_SCALES, PARAM_FIELDS, Layout
from floatscope._numerics.formats import dtype_name
from floatscope._store.env import environment
from floatscope._store.schema import ModelInfo, PackedLayout, PrecisionInfo, RunConfig
from floatscope._store.sqlite import RunStore

__all__ = ["RunRecorder"]

_INPUT_BATCHES = 3
_NUMERIC = len(ACTIVATION_RECORD) - 2  # the record's numbers; then dtype and type


class RunRecorder:
    """Writes one run. ``store=None`` records nothing (every method is then a no-op)."""

    def __init__(self, store: RunStore | None, *, name: str | None, command: str,
                 config: dict[str, Any]) -> None:
        self.store = store
        self.run_id = ""
        self.fp_names: list[str] = []
        self._fp_index: dict[str, int] = {}
        self._open_step: int | None = None
        self._steps: dict[int, dict[str, Any]] = {}
        self._fingerprints: dict[tuple[int, str], dict[str, float]] = {}
        # Parameter samples of a step, by field: {step: {field: {name: value}}} (names in first-seen order).
        self._params: dict[int, dict[str, dict[str, Any]]] = {}
        self._optimizers: list[dict[str, Any]] = []
        self._data: dict[str, Any] = {}
        self._inputs_seen = 0
        self._models_seen: set[int] = set()
        self._precision_recorded = False
        self._fp_written = 0
        # the last activation Layout and its packed form (the layers repeat from one sample to the next)
        self._activation_layout: tuple[Layout, PackedLayout] | None = None
        if store is not None:
            seeding = last_seeding()
            if seeding is not None:
                config = {**config, "seeds": asdict(seeding)}
            self.run_id = store.new_run(name=name, command=command, env=environment(), config=config)

    @property
    def enabled(self) -> bool:
        return self.store is not None

    # ------------------------------------------------------------------ what the host sees
    def model(self, module: torch.nn.Module) -> Payload | None:
        """Record the model's structure; returns the payload of its initialisation statistics."""
        if self.store is None or id(module) in self._models_seen:
            return None
        first = not self._models_seen
        self._models_seen.add(id(module))
        params = [(n, p) for n, p in module.named_parameters() if p.is_floating_point() and p.numel() > 0]
        if first:
            info = ModelInfo(type=type(module).__name__,
                             structure=[(name, type(m).__name__) for name, m in module.named_modules()],
                             parameters={n: (list(p.shape), dtype_name(p.dtype)) for n, p in params})
            self.store.update_config(self.run_id, RunConfig.patch(model=info))
        if not params or not first:
            return None
        with torch.no_grad():
            stats = torch.stack([torch.stack([p.detach().float().mean(),
                                              p.detach().float().std() if p.numel() > 1 else torch.zeros(()),
                                              p.detach().float().abs().max(),
                                              torch.linalg.vector_norm(p.detach().float())]).to(params[0][1].device)
                                 for _, p in params])
        return Payload("init", stats, [n for n, _ in params])

    def precision(self, module: torch.nn.Module, scaler: Any) -> None:
        """Environment, seeds and precision settings as of the first model call."""
        if self.store is None or self._precision_recorded:
            return
        self._precision_recorded = True
        # Scripts seed and set flags after the watch starts (floatscope run): record them as of now.
        self.store.update_env(self.run_id, environment())
        seeding = last_seeding()
        if seeding is not None:
            self.store.update_config(self.run_id, RunConfig.patch(seeds=asdict(seeding)))
        autocast = [{"device": d, "enabled": e, "dtype": dtype_name(t)} for d, e, t in autocast_state() if e]
        dtypes = sorted({dtype_name(p.dtype) for p in module.parameters()})
        self.store.update_config(self.run_id, RunConfig.patch(precision=PrecisionInfo(
            autocast=autocast, param_dtypes=dtypes, default_dtype=dtype_name(torch.get_default_dtype()),
            grad_scaler=bool(scaler is not None and scaler.is_enabled()))))

    def inputs(self, args: Any) -> Payload | None:
        """Statistics of the first batches a model received (compared by ``diff``)."""
        if self.store is None or self._inputs_seen >= _INPUT_BATCHES:
            return None
        from floatscope._instrument.modules import float_leaves

        leaves = [t for t in float_leaves(args) if t.numel() > 0]
        index = self._inputs_seen
        self._inputs_seen += 1
        if not leaves:
            return None
        with torch.no_grad():
            stats = torch.stack([torch.stack([t.detach().float().mean(),
                                              t.detach().float().std() if t.numel() > 1
                                              else torch.zeros((), device=t.device),
                                              t.detach().float().min(), t.detach().float().max()]).to(leaves[0].device)
                                 for t in leaves])
        return Payload("input", stats, index)

    def optimizer(self, optimizer: torch.optim.Optimizer, scaler: Any) -> None:
        if self.store is None:
            return
        groups = []
        for group in optimizer.param_groups:
            groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()
                           if k != "params" and isinstance(v, (int, float, bool, str, tuple, type(None)))})
        self._optimizers.append({"type": type(optimizer).__name__, "param_groups": groups})
        if scaler is not None and scaler.is_enabled():
            patch = RunConfig.patch(optimizers=self._optimizers, grad_scaler={
                "init_scale": float(scaler._init_scale), "growth_interval": int(scaler._growth_interval)})
        else:
            patch = RunConfig.patch(optimizers=self._optimizers)
        self.store.update_config(self.run_id, patch)

    # ------------------------------------------------------------------ what the device said
    def payload(self, payload: Payload, values: list[float]) -> None:
        """Decode one payload read by a transfer."""
        if self.store is None:
            return
        kind, meta = payload.kind, payload.meta
        if kind == "init":
            init = {name: dict(zip(("mean", "std", "absmax", "norm"), values[4 * i:4 * i + 4], strict=True))
                    for i, name in enumerate(meta)}
            self.store.update_config(self.run_id, RunConfig.patch(init=init))
        elif kind == "input":
            self._data[f"batch{meta}"] = [dict(zip(("mean", "std", "min", "max"), values[4 * i:4 * i + 4],
                                                   strict=True)) for i in range(len(values) // 4)]
            self.store.update_config(self.run_id, RunConfig.patch(data=self._data))
        elif kind == "flush":
            step, names, scale = meta
            width = len(FLUSH_SCALES) + 2
            rows = [values[width * i:width * (i + 1)] for i in range(len(names))]
            self._param_field(step, "grad_nonzero", names, [r[0] for r in rows])
            self._param_field(step, "grad_absmax", names, [r[-1] for r in rows])
            self._param_field(step, "loss_scale", names, [scale] * len(names))
            self._param_field(step, "grad_flush_frac", names, [
                {f"{k:g}": v for k, v in zip(FLUSH_SCALES, r[1:-1], strict=True)} for r in rows])
        elif kind == "update":
            step, names = meta
            self._param_field(step, "update_norm", names, values)
        elif kind == "activations":
            step, layout = meta  # values: the numeric fields of ACTIVATION_RECORD, a row of layers each
            if self._activation_layout is None or self._activation_layout[0] is not layout:
                self._activation_layout = (layout, PackedLayout(list(ACTIVATION_RECORD), layout.names, _NUMERIC,
                                                                [layout.dtypes, layout.types]))
            self.store.add_packed_health(self.run_id, step, "activation", self._activation_layout[1], values)

    def retract_activations(self, steps: list[int]) -> None:
        """Delete the activation samples stored for ``steps`` (iterations that turned out not to be steps)."""
        if self.store is not None:
            self.store.delete_health(self.run_id, "activation", steps)

    def _param_field(self, step: int, field: str, names: list[str], values: list[Any]) -> None:
        self._params.setdefault(step, {}).setdefault(field, {}).update(zip(names, values, strict=True))

    def fingerprint(self, step: int, kind: str, names: list[str], values: list[float], *, health: bool) -> None:
        """Per-parameter norms: ``kind`` "grad" (of step ``step``) or "weight" (after its update)."""
        if self.store is None:
            return
        self._fingerprints.setdefault((step, kind), {}).update(zip(names, values, strict=True))
        index = self._fp_index
        if not index.keys() >= set(names):  # a parameter seen for the first time
            for name in names:
                if name not in index:
                    index[name] = len(self.fp_names)
                    self.fp_names.append(name)
        if health:
            self._param_field(step, "grad_norm" if kind == "grad" else "weight_norm", names, values)

    def step(self, step: int, *, loss: float | None, grad_norm: float | None, loss_scale: float | None,
             skipped: bool) -> None:
        """One iteration's numbers (several calls for one step merge: several optimizers)."""
        if self.store is None:
            return
        row = self._steps.setdefault(step, {"loss": None, "grad_norm": None, "loss_scale": None, "skipped": False})
        if loss is not None:
            row["loss"] = loss
        if grad_norm is not None:
            row["grad_norm"] = grad_norm if row["grad_norm"] is None else math.hypot(row["grad_norm"], grad_norm)
        if loss_scale is not None:
            row["loss_scale"] = loss_scale
        row["skipped"] = row["skipped"] or skipped

    def set_scale(self, step: int, scale: float) -> None:
        if self.store is not None:
            if step in self._steps:
                self._steps[step]["loss_scale"] = scale
            else:
                self.store.set_step_scale(self.run_id, step, scale)

    def event(self, step: int, kind: str, data: dict[str, Any]) -> None:
        if self.store is not None:
            self.store.add_event(self.run_id, step, kind, data)

    def flush(self, before: int | None, *, steps: int, skipped: int) -> None:
        """Write every step below ``before`` (all of them with None); update the run's progress."""
        if self.store is None:
            return
        store, run_id = self.store, self.run_id
        for step in sorted(s for s in self._steps if before is None or s < before):
            row = self._steps.pop(step)
            store.add_step(run_id, step, loss=row["loss"], grad_norm=row["grad_norm"], loss_scale=row["loss_scale"],
                           skipped=row["skipped"])
            if row["skipped"]:
                store.add_event(run_id, step, "skipped-step", {"loss_scale": row["loss_scale"]})
        for key in sorted(k for k in self._fingerprints if before is None or k[0] < before):
            values = self._fingerprints.pop(key)
            step, kind = key
            if self._fp_written != len(self.fp_names):
                store.update_config(run_id, RunConfig.patch(fingerprint_params=list(self.fp_names)))
                self._fp_written = len(self.fp_names)
            store.add_fingerprint(run_id, step, kind, [values.get(n, math.nan) for n in self.fp_names])
        fields = (*PARAM_FIELDS, "update_ratio")
        for step in sorted(s for s in self._params if before is None or s < before):
            by_field = self._params.pop(step)
            names = list(dict.fromkeys(n for values in by_field.values() for n in values))
            if not names:
                continue
            columns = {k: [by_field[k].get(n) for n in names] if k in by_field else [None] * len(names)
                       for k in PARAM_FIELDS}
            columns["update_ratio"] = [u / w if u is not None and w else None
                                       for u, w in zip(columns["update_norm"], columns["weight_norm"], strict=True)]
            store.add_health(run_id, step, "param", list(fields), names, [columns[k] for k in fields])
        store.update_progress(run_id, steps=steps, skipped_steps=skipped)

    def finish(self, *, status: str, steps: int, skipped: int, result: dict[str, Any]) -> None:
        if self.store is None:
            return
        self.flush(None, steps=steps, skipped=skipped)
        self.store.finish_run(self.run_id, status=status, steps=steps, skipped_steps=skipped, result=result)
