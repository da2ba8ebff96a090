"""LoRA's layer deltas: Linear / GPT-2 Conv1D / quantized linears, Embedding, Conv1d/2d.

Geometry (in/out features, transposed storage, dequantized weights) comes from core/layers.py;
the computation of linear deltas from the config's variant (variants.py); the initial A and B
(and an optional base-weight edit) from the init registry (inits.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core import layers
from ...core.delta import Delta
from ...core.errors import TargetError
from ...core.targets import matched_parameters
from . import fused
from .config import LoraConfig
from .inits import InitContext, get_init
from .variants import VARIANTS


class LoraDelta(Delta):
    """Shared LoRA state: rank, scaling, dropout; `create` picks the layer-specific class."""

    commutes = True  # out = base + BA x: stacked LoRAs add (DoRA says otherwise, per delta)

    def __init__(self, base: nn.Module, config: LoraConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        self.r, _ = config.rank_and_alpha(path)
        self.scaling = config.scaling(path)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self._base_edit: dict[str, torch.Tensor] = {}

    @classmethod
    def create(cls, base: nn.Module, config: LoraConfig, path: str, bank=None, calibration=None) -> Delta:
        if matched_parameters(path, base, config.parameter_targets()):  # owns a target_parameters entry
            from .params import LoraParams
            return LoraParams(base, config, path, bank)
        geo = layers.geometry(base) if isinstance(base, LAYERS) else None
        if geo is None:
            raise TargetError(f"LoRA does not support '{path}' of type {type(base).__name__}")
        if geo.is_matrix:
            return LoraLinear(base, config, path, bank, calibration)
        if config.use_dora:
            what = "an Embedding" if geo.kind == "embedding" else f"a {type(base).__name__}"
            raise TargetError(f"LoraConfig.use_dora: DoRA is supported on Linear layers only, '{path}' is {what}")
        if geo.kind == "embedding":
            return LoraEmbedding(base, config, path, bank)
        return LoraConv(base, config, path, bank, calibration)

    def init_pair(self, config: LoraConfig, a: torch.Tensor, b: torch.Tensor, calibration) -> None:
        """Fill A and B (in place) by the config's registered init; keep any base edit it returns."""
        ctx = InitContext(layers.dense_weight(self.base).detach(), self.r, tuple(a.shape), tuple(b.shape),
                          self.path, config, calibration)
        result = get_init(config.init).fn(ctx)
        with torch.no_grad():
            a.copy_(result.a.reshape(a.shape))
            b.copy_(result.b.reshape(b.shape))
        if result.base_weight is not None:
            self._base_edit = {"weight": layers.to_param_layout(self.base, result.base_weight)}

    def base_edits(self) -> dict[str, torch.Tensor]:
        return dict(self._base_edit)


class LoraLinear(LoraDelta):
    """LoRA on a matrix layer (nn.Linear, GPT-2's transposed Conv1D, bitsandbytes 4/8-bit linears)."""

    def __init__(self, base: nn.Module, config: LoraConfig, path: str, bank=None, calibration=None) -> None:
        super().__init__(base, config, path, bank)
        geo = layers.geometry(base)
        self.lora_A = nn.Linear(geo.in_features, self.r, bias=False)
        self.lora_B = nn.Linear(self.r, geo.out_features, bias=False)
        self.init_pair(config, self.lora_A.weight, self.lora_B.weight, calibration)
        self.variant = VARIANTS[config.variant]
        self.weight_dependent = self.variant.weight_dependent
        self.commutes = self.variant.commutes
        self.identity_at_init = self.variant.identity_at_init
        self.variant.setup(self)
        # The fused function handles plain LoRA on dense Linear / transposed Conv1D weights.
        self.fuses = self.variant.fusable and geo.kind in ("linear", "transposed")
        object.__setattr__(self, "_alone", [fused.Member(self)] if self.fuses else [])

    fuses_base = True

    def fused_call(self, x: torch.Tensor) -> torch.Tensor | None:
        """Base + LoRA through fused.py (one function per group of sites sharing `x`), or None."""
        base = self.base
        if (not self.fuses or x.dtype != self.lora_A.weight.dtype or base.weight.dtype != x.dtype
                or base._forward_hooks or base._forward_pre_hooks or torch.compiler.is_compiling()
                or torch.is_autocast_enabled(x.device.type)):  # autocast picks its own dtypes per op
            return None
        ctx = self._ctx
        groups = ctx.scratch.get("lora.groups")
        if groups is None:
            groups = ctx.scratch["lora.groups"] = fused.Groups()
        # Inference tensors keep no version counter, so a group could not tell an in-place change.
        group = None if x.is_inference() else groups.lookup(self, x, ctx)
        if group is not None:
            return group.output(self, x)
        return fused.run_members(self._alone, x)[0]

    def lora_weight(self) -> torch.Tensor:
        """B @ A, (out, in)."""
        return self.lora_B.weight @ self.lora_A.weight

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return self.variant.forward(self, x, base_out)

    @classmethod
    def forward_grouped(cls, deltas, x, base_out, row_group):
        """Plain LoRA of equal rank and dropout in every group: per-row A and B gathered from one
        stack, one dropout mask for the batch, two batched matmuls, the expand accumulated into the
        base output (in place without autograd)."""
        first = next(d for d in deltas if d is not None)
        if x.dtype != first.lora_A.weight.dtype:
            return None
        if torch.is_grad_enabled() and any(d is not None and d.lora_A.weight.requires_grad for d in deltas):
            if not cls._groupable(deltas, first):
                return None
            a, bt = cls._stack(deltas, first)
            return cls._grouped_update(x, base_out, a.index_select(0, row_group), bt.index_select(0, row_group),
                              fused.dropout_p(first), grad=True)
        rows = cls._rows(deltas, first, row_group)
        return None if rows is None else cls._grouped_update(x, base_out, *rows, fused.dropout_p(first), grad=False)

    @staticmethod
    def _groupable(deltas, first) -> bool:
        r, p = first.r, fused.dropout_p(first)
        return all(d is None or (d.variant.groupable and d.r == r and fused.dropout_p(d) == p) for d in deltas)

    @staticmethod
    def _grouped_update(x, base_out, a_rows, bt_rows, p: float, grad: bool):
        if p > 0:  # one mask for the batch, drawn as the fused path draws it (rows with no adapter ignore it)
            x = x * fused.keep_mask(x.shape, p, x.device) * (1.0 / (1.0 - p))
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        h = torch.bmm(x3, a_rows.transpose(1, 2))
        out3 = base_out.view(x.shape[0], -1, base_out.shape[-1])
        bt_rows = bt_rows.to(h.dtype)
        if grad or base_out.dtype != h.dtype:
            return (out3 + torch.bmm(h, bt_rows).to(base_out.dtype)).view(base_out.shape)
        return out3.baddbmm_(h, bt_rows).view(base_out.shape)

    @staticmethod
    def _stack(deltas, first) -> tuple[torch.Tensor, torch.Tensor]:
        """(groups, r, in) A and (groups, r, out) scaled B^T; zeros for rows with no delta."""
        a0, b0 = first.lora_A.weight, first.lora_B.weight
        a = torch.stack([torch.zeros_like(a0) if d is None else d.lora_A.weight for d in deltas])
        bt = torch.stack([torch.zeros_like(b0.t()) if d is None else (d.lora_B.weight * d.scaling).t() for d in deltas])
        return a, bt

    @classmethod
    def _rows(cls, deltas, first, row_group) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-row A and scaled B^T without autograd (None: the groups cannot share the batched path), kept
        on `first` until a weight, the grouping, the rows or the mode change: a server's decode steps repeat
        one grouping, so a step only compares this key (the checks over every group run once)."""
        ctx = first._ctx
        if ctx.static_weights:  # weights change only with ctx.version; `deltas` is the site's cached plan
            key = (first.training, ctx.version, deltas)
        else:
            key = (first.training, *(None if d is None else (id(d), *_versions(d), d.scaling) for d in deltas))
        cached = first.__dict__.get("_grouped_rows")
        if cached is None or cached[0] != key:
            if not cls._groupable(deltas, first):
                object.__setattr__(first, "_grouped_rows", (key, None, None, None, None, None))
                return None
            with torch.no_grad():
                cached = (key, *cls._stack(deltas, first), None, None, None)
        if cached[1] is None:
            return None
        if cached[3] is not row_group:
            with torch.no_grad():
                cached = (*cached[:3], row_group, cached[1].index_select(0, row_group),
                          cached[2].index_select(0, row_group))
        object.__setattr__(first, "_grouped_rows", cached)
        return cached[4], cached[5]

    def delta_weight(self) -> dict[str, torch.Tensor]:
        return {"weight": layers.to_param_layout(self.base, self.variant.delta_weight(self))}


class LoraEmbedding(LoraDelta):
    """LoRA on nn.Embedding: A (r x vocab) is looked up, B (dim x r) projects; A starts at zero."""

    def __init__(self, base: nn.Embedding, config: LoraConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        self.lora_embedding_A = nn.Parameter(torch.zeros(self.r, base.num_embeddings))
        # As nn.Embedding initialises its weight, whatever `init` says (PEFT does the same).
        self.lora_embedding_B = nn.Parameter(torch.randn(base.embedding_dim, self.r))

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        b = self.base
        after_a = F.embedding(x, self.lora_embedding_A.T, b.padding_idx, b.max_norm, b.norm_type,
                              b.scale_grad_by_freq, b.sparse)
        return base_out + (after_a @ self.lora_embedding_B.T * self.scaling).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        return {"weight": (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling}


class LoraConv(LoraDelta):
    """LoRA on Conv1d/Conv2d: A has the base kernel (in -> r), B is a 1x1 conv (r -> out)."""

    def __init__(self, base: nn.Conv1d | nn.Conv2d, config: LoraConfig, path: str, bank=None,
                 calibration=None) -> None:
        super().__init__(base, config, path, bank)
        if base.groups != 1:
            raise TargetError(f"LoRA on '{path}': grouped convolutions (groups={base.groups}) are not supported")
        conv = type(base)
        self.lora_A = conv(base.in_channels, self.r, base.kernel_size, base.stride, base.padding,
                           base.dilation, bias=False)
        self.lora_B = conv(self.r, base.out_channels, 1, 1, bias=False)
        self.init_pair(config, self.lora_A.weight, self.lora_B.weight, calibration)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return base_out + (self.lora_B(self.lora_A(h)) * self.scaling).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        a = self.lora_A.weight.flatten(1)
        b = self.lora_B.weight.flatten(1)
        return {"weight": (b @ a).view(self.base.weight.shape) * self.scaling}


LAYERS = layers.MATRIX_LAYERS + (nn.Embedding, nn.Conv1d, nn.Conv2d)


def _versions(delta) -> tuple[int, int, int, int]:
    """Identity and version counter of a LoRA delta's A and B weights (plain dict lookups: this runs per
    row group per call)."""
    a, b = (_weight(delta._modules[k]) for k in ("lora_A", "lora_B"))
    return id(a), a._version, id(b), b._version


def _weight(module) -> torch.Tensor:
    """A factor's weight: its parameter, or the frozen tensor a variant keeps in its place (LoRA-FA's A)."""
    w = module._parameters.get("weight")
    return module.weight if w is None else w
