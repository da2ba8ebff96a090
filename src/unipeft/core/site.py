"""AdaptedSite: one frozen base module plus its deltas by adapter name; compose, merge, unmerge."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from . import compose, layers
from .delta import Delta
from .edits import BaseEdits
from .errors import MergeError

BASE_NAME = "__base__"


@dataclass
class Grouping:
    """Rows of a mixed batch sorted by adapter: built once per model call, shared by all sites."""

    names: list[str]             # adapter name per group (BASE_NAME = no adapter)
    bounds: list[tuple[int, int]]  # row range of each group in sorted order
    perm: torch.Tensor | None    # sorted row -> original row (None: already sorted)
    inverse: torch.Tensor | None
    batch: int
    row_group: torch.Tensor      # group index of each row, in the original order

    @classmethod
    def build(cls, adapter_names: list[str]) -> "Grouping":
        """Group row indices by adapter name with one stable sort."""
        order = sorted(range(len(adapter_names)), key=lambda i: adapter_names[i])
        names, bounds = [], []
        for pos, row in enumerate(order):
            name = adapter_names[row]
            if not names or names[-1] != name:
                names.append(name)
                bounds.append((pos, pos + 1))
            else:
                bounds[-1] = (bounds[-1][0], pos + 1)
        index = {n: g for g, n in enumerate(names)}
        row_group = torch.tensor([index[n] for n in adapter_names])
        if order == list(range(len(order))):
            return cls(names, bounds, None, None, len(order), row_group)
        perm = torch.tensor(order)
        return cls(names, bounds, perm, torch.argsort(perm), len(order), row_group)


@dataclass
class ForwardContext:
    """State shared by every site of one AdaptedModel (one object, referenced, never re-hooked)."""

    active: list[str] = field(default_factory=list)
    disabled: bool = False
    grouping: Grouping | None = None
    version: int = 0  # bumped whenever the active set or any site's adapters change
    inputs: dict = field(default_factory=dict)  # this call's declared per-call inputs (e.g. task_ids)
    scratch: dict = field(default_factory=dict)  # per-model caches of methods (e.g. LoRA's input groups)
    calls: int = 0  # top-level model calls so far (a checkpointed layer's recomputation is not one)
    composition: object | None = None  # the active composition block (compose.py), None for a plain set
    rows: object | None = None  # this call's row ranges under a Parallel/BatchSplit block
    # Servers running on the model (each adds 1 while it runs): while > 0, adapter weights change only between
    # calls that bump `version`, so mixed-batch caches are keyed on it instead of each weight's version counter
    # (reading those touches every adapter's tensors per site per call: slow with weights out of the CPU caches).
    static_weights: int = 0


def run_with_params(module: nn.Module, params: dict[str, torch.Tensor], x, *args, **kwargs):
    """Run `module` with some parameters replaced; direct calls for common layers, else functional_call."""
    if not args and not kwargs:
        if type(module) is nn.Linear:
            return F.linear(x, params.get("weight", module.weight), params.get("bias", module.bias))
        if type(module) is nn.LayerNorm:
            return F.layer_norm(x, module.normalized_shape, params.get("weight", module.weight),
                                params.get("bias", module.bias), module.eps)
        if type(module) in (nn.Conv1d, nn.Conv2d) and module.padding_mode == "zeros":
            return module._conv_forward(x, params.get("weight", module.weight), params.get("bias", module.bias))
    return functional_call(module, params, (x, *args), kwargs, strict=False)


class AdaptedSite(nn.Module):
    """Wraps a base module; forward = compose(base(x), active deltas)."""

    def __init__(self, base_layer: nn.Module, path: str, ctx: ForwardContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.deltas = nn.ModuleDict()
        self.path = path
        self.merged: list[str] = []
        self._merge_cache: dict[str, dict[str, torch.Tensor]] = {}
        # Exact copies of quantized weights before each merge (requantizing is lossy, restoring is not).
        self._merge_snapshots: dict[str, dict[str, tuple]] = {}
        # Base-weight edits of inits, per adapter, held while their adapter is active (edits.py).
        self.edits = BaseEdits(base_layer, path)
        object.__setattr__(self, "_ctx", ctx)
        # The deltas to apply, resolved once per change of the active set (not per call).
        self._seen_version = -1
        self._inputs: list[Delta] = []
        self._weights: list[Delta] = []
        self._outputs: list[Delta] = []
        self._fused: Delta | None = None  # the one delta that computes the whole output (Delta.fused_call)

    # ---- forward -----------------------------------------------------------------------
    def forward(self, x, *args, **kwargs):
        ctx = self._ctx
        if ctx.disabled or not self.deltas:
            return self.base_layer(x, *args, **kwargs)
        if ctx.composition is not None:
            return compose.site_forward(self, ctx.composition, ctx.rows, x, *args, **kwargs)
        if ctx.grouping is not None:
            return self._forward_mixed(ctx.grouping, x, *args, **kwargs)
        if torch.compiler.is_compiling():
            # Traced: neither read nor write the resolved cache, or its state becomes guards (one
            # more compile after the first call, and after any eager call that refreshes it).
            return self._compose(self._active(), x, *args, **kwargs)
        if self._seen_version != ctx.version:
            self._resolve()
        fused = self._fused
        if fused is not None and not args and not kwargs:
            out = fused.fused_call(x)
            if out is not None:
                return out
        return self._run(self._inputs, self._weights, self._outputs, x, *args, **kwargs)

    def _active(self) -> list[Delta]:
        return [self.deltas[n] for n in self._ctx.active if n in self.deltas and n not in self.merged]

    def _resolve(self) -> None:
        active = self._active()
        self._inputs, self._weights, self._outputs = self._by_kind(active)
        only = active[0] if len(active) == 1 else None
        # A plain attribute: assigned normally, the delta would become a second child module
        # (twice in state_dict, and a change of the module tree that compiled guards check).
        object.__setattr__(self, "_fused", only if only is not None and type(only).fuses_base else None)
        self._seen_version = self._ctx.version

    @staticmethod
    def _by_kind(deltas: list[Delta]) -> tuple[list[Delta], list[Delta], list[Delta]]:
        return ([d for d in deltas if d.kind == "input"], [d for d in deltas if d.kind == "weight"],
                [d for d in deltas if d.kind == "output"])

    def _compose(self, deltas: list[Delta], x, *args, **kwargs):
        return self._run(*self._by_kind(deltas), x, *args, **kwargs)

    def _run(self, inputs: list[Delta], weights: list[Delta], outputs: list[Delta], x, *args, **kwargs):
        """Input-side deltas, then the base (with weight-side overrides), then output-side deltas."""
        h = x
        for d in inputs:
            h = d.pre(h)
        if weights:
            params = dict(self.base_layer.named_parameters())
            for d in weights:
                params.update(d.weight_overrides(params))
            out = run_with_params(self.base_layer, params, h, *args, **kwargs)
        else:
            out = self.base_layer(h, *args, **kwargs)
        for d in outputs:
            out = d(x, out)
        return out

    def _forward_mixed(self, grouping: Grouping, x, *args, **kwargs):
        per_group, present, outputs_only, kind = self._mixed_plan(grouping)
        if not present:
            return self.base_layer(x, *args, **kwargs)
        if x.shape[0] == 1 and grouping.batch > 1:
            # An input shared by all rows (position ids of shape (1, T)): each row needs its own
            # adapter, so give every row a copy; the (batch, ...) output broadcasts like (1, ...) did.
            x = x.expand(grouping.batch, *x.shape[1:])
        if x.shape[0] != grouping.batch:
            raise ValueError(f"adapter_names has {grouping.batch} entries but site '{self.path}' sees a batch "
                             f"of {x.shape[0]} rows; give one adapter name per input row")
        if not outputs_only:
            # Input- or weight-side deltas change the base computation: run each group on its rows.
            xs = x if grouping.perm is None else x.index_select(0, grouping.perm.to(x.device))
            pieces = [self._compose([] if d is None else [d], xs[a:b], *args, **kwargs)
                      for d, (a, b) in zip(per_group, grouping.bounds)]
            return self._unsort(torch.cat(pieces, 0), grouping)
        out = self.base_layer(x, *args, **kwargs)  # the base runs once on the whole batch
        if kind is not None:
            fused = kind.forward_grouped(per_group, x, out, grouping.row_group.to(x.device))
            if fused is not None:
                return fused
        if grouping.perm is not None:
            perm = grouping.perm.to(x.device)
            x, out = x.index_select(0, perm), out.index_select(0, perm)
        pieces = [out[a:b] if d is None else d(x[a:b], out[a:b]) for d, (a, b) in zip(per_group, grouping.bounds)]
        return self._unsort(torch.cat(pieces, 0), grouping)

    def _mixed_plan(self, grouping: Grouping) -> tuple[list, list, bool, type | None]:
        """(delta or None per group, the deltas present, whether all act on the output, their one type or None),
        kept while the grouping object and the adapters stay the same (a server's steps repeat one grouping)."""
        plan = self.__dict__.get("_plan")
        if plan is None or plan[0] is not grouping or plan[1] != self._ctx.version:
            mods = self.deltas._modules
            per_group = [mods.get(n) for n in grouping.names]
            present = [d for d in per_group if d is not None]
            kinds = {type(d) for d in present}
            plan = (grouping, self._ctx.version, per_group, present, all(d.kind == "output" for d in present),
                    kinds.pop() if len(kinds) == 1 else None)
            object.__setattr__(self, "_plan", plan)
        return plan[2:]

    @staticmethod
    def _unsort(out: torch.Tensor, grouping: Grouping) -> torch.Tensor:
        return out if grouping.inverse is None else out.index_select(0, grouping.inverse.to(out.device))

    # ---- merge -------------------------------------------------------------------------
    def merged_params(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(delta, new value) per base parameter for merging adapter `name`; nothing is written."""
        delta = self.deltas[name]
        params = dict(self.base_layer.named_parameters())
        with torch.no_grad():
            dw = {k: v.detach() for k, v in delta.delta_weight().items()}
            missing = sorted(set(dw) - set(params))
            if missing:
                raise MergeError(f"adapter '{name}' at '{self.path}' changes {missing}, which "
                                 f"{type(self.base_layer).__name__} does not have")
            current = {k: layers.param_value(self.base_layer, k) for k in dw}
            new = {k: current[k] + v.to(current[k].dtype) for k, v in dw.items()}
        return dw, new

    def check_finite_merge(self, name: str) -> None:
        """MergeError if merging adapter `name` here (if held and not merged) gives non-finite weights."""
        if name in self.deltas and name not in self.merged:
            self._refuse_nonfinite(name, self.merged_params(name)[1])

    def _refuse_nonfinite(self, name: str, new: dict[str, torch.Tensor]) -> None:
        bad = [k for k, t in new.items() if not torch.isfinite(t).all()]
        if bad:
            raise MergeError(f"merging adapter '{name}' into '{self.path}' gives non-finite values in "
                             f"{bad}; the base weights were left unchanged")

    def merge_order(self, names: list[str]) -> list[str]:
        """Those of `names` held here, in the order whose merges reproduce forward: weight-side
        deltas first (forward runs the base with them), then input-side, then output-side (forward
        applies them to the base's result); list order within a kind. Weight-dependent deltas
        merge against the weights merged so far, so the order changes the result."""
        rank = {"weight": 0, "input": 1, "output": 2}
        return sorted((n for n in names if n in self.deltas), key=lambda n: rank.get(self.deltas[n].kind, 2))

    def merge(self, name: str, safe: bool = False) -> dict[str, tuple[float, float]]:
        """Add adapter `name`'s delta into the base weights (safe: refuse non-finite results first).

        Returns {param: (max |stored - exact|, ||stored - exact||_F / ||exact||_F)} for each packed
        (quantized) weight written; empty for float layers, which store the sum as computed."""
        if name in self.merged or name not in self.deltas:
            return {}
        dw, new = self.merged_params(name)
        if safe:
            self._refuse_nonfinite(name, new)
        base = self.base_layer
        snaps = {k: layers.snapshot_param(base, k) for k in new if layers.is_packed(base, k)}
        if snaps:
            self._merge_snapshots[name] = snaps
        errors = {}
        for k, t in new.items():
            if not self.deltas[name].merged_write(k, t):
                layers.write_param(base, k, t)
            if k in snaps:
                diff = layers.param_value(base, k) - t
                errors[k] = (float(diff.abs().max()), float(diff.norm() / t.norm().clamp_min(1e-30)))
        if self.deltas[name].weight_dependent:
            self._merge_cache[name] = dw
        self.merged.append(name)
        self._seen_version = -1
        return errors

    def unmerge(self, keep: int = 0) -> None:
        """Subtract merged deltas again, most recent first, until `keep` remain (quantized weights:
        restored exactly)."""
        base = self.base_layer
        self._seen_version = -1
        while len(self.merged) > keep:
            name = self.merged.pop()
            dw = self._merge_cache.pop(name, None)
            snaps = self._merge_snapshots.pop(name, {})
            if dw is None:
                with torch.no_grad():
                    dw = self.deltas[name].delta_weight()
            with torch.no_grad():
                for k, v in dw.items():
                    if k in snaps:
                        layers.restore_param(base, k, snaps[k])
                    else:
                        param = dict(base.named_parameters())[k]
                        param.sub_(v.to(param.dtype))

