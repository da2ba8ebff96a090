"""LoRA family: LoRA, rsLoRA, DoRA; on Linear, GPT-2 Conv1D, Embedding, Conv1d and Conv2d."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.errors import ConfigError, TargetError
from ..core.registry import Capabilities, register
from ..core.targets import pattern_key

_INITS = ("kaiming", "gaussian")


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA: out = base(x) + scaling * B(A(dropout(x))), scaling = alpha/r (alpha/sqrt(r) with rsLoRA)."""

    peft_type = "LORA"
    peft_names = {"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights"}
    peft_inert = {"megatron_config": None, "megatron_core": "megatron.core", "trainable_token_indices": None,
                  "loftq_config": {}, "eva_config": None, "corda_config": None, "lora_ga_config": None,
                  "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False,
                  "qalora_group_size": 16, "monteclora_config": None, "layer_replication": None,
                  "lora_bias": False, "target_parameters": None, "use_bdlora": None, "arrow_config": None,
                  "kasa_config": None, "ensure_weight_tying": False}

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "kaiming"
    fan_in_fan_out: bool = False
    bias: str = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        for key, r in {"r": self.r, **{f"rank_pattern[{k!r}]": v for k, v in self.rank_pattern.items()}}.items():
            if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
                raise ConfigError(f"LoraConfig.{key}: rank must be a positive integer, got {r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoraConfig.dropout: expected 0 <= dropout < 1, got {self.dropout!r}")
        if self.init not in _INITS:
            raise ConfigError(f"LoraConfig.init: expected one of {_INITS}, got {self.init!r}")
        if self.bias != "none":
            raise ConfigError(f"LoraConfig.bias: only 'none' is supported (use BitFitConfig to train biases), "
                              f"got {self.bias!r}")

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """The rank and alpha for the module at `path` (rank_pattern / alpha_pattern win)."""
        rk = pattern_key(self.rank_pattern, path)
        ak = pattern_key(self.alpha_pattern, path)
        return (self.rank_pattern[rk] if rk else self.r), (self.alpha_pattern[ak] if ak else self.alpha)

    def scaling(self, path: str) -> float:
        """alpha/r, or alpha/sqrt(r) with rsLoRA."""
        r, alpha = self.rank_and_alpha(path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @classmethod
    def _value_to_peft(cls, name: str, value: Any) -> Any:
        if name == "init":
            return True if value == "kaiming" else value
        return value

    @classmethod
    def _value_from_peft(cls, name: str, value: Any) -> Any:
        if name == "init":
            if value is True:
                return "kaiming"
            if value not in _INITS:
                raise ConfigError(f"LoraConfig: init_lora_weights={value!r} is not supported; "
                                  f"supported: true, 'gaussian'")
        return value


def _init_pair(a: torch.Tensor, b: torch.Tensor, how: str, r: int) -> None:
    if how == "kaiming":
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    else:
        nn.init.normal_(a, std=1 / r)
    nn.init.zeros_(b)


class LoraDelta(Delta):
    """Shared LoRA state: rank, scaling, dropout; `create` picks the layer-specific class."""

    def __init__(self, base: nn.Module, config: LoraConfig, path: str) -> None:
        super().__init__(base, config, path)
        self.r, _ = config.rank_and_alpha(path)
        self.scaling = config.scaling(path)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @classmethod
    def create(cls, base: nn.Module, config: LoraConfig, path: str) -> Delta:
        if isinstance(base, (nn.Linear, Conv1D)):
            # GPT-2's Conv1D stores W transposed; PEFT records that as fan_in_fan_out=True.
            config.fan_in_fan_out = isinstance(base, Conv1D)
            return LoraLinear(base, config, path)
        if isinstance(base, nn.Embedding):
            if config.use_dora:
                raise TargetError(f"LoraConfig.use_dora: DoRA is supported on Linear layers only, "
                                  f"'{path}' is an Embedding")
            return LoraEmbedding(base, config, path)
        if isinstance(base, (nn.Conv1d, nn.Conv2d)):
            if config.use_dora:
                raise TargetError(f"LoraConfig.use_dora: DoRA is supported on Linear layers only, "
                                  f"'{path}' is a {type(base).__name__}")
            return LoraConv(base, config, path)
        raise TargetError(f"LoRA does not support '{path}' of type {type(base).__name__}")


class LoraLinear(LoraDelta):
    """LoRA (optionally DoRA) on nn.Linear or GPT-2's Conv1D (weight stored transposed)."""

    def __init__(self, base: nn.Module, config: LoraConfig, path: str) -> None:
        super().__init__(base, config, path)
        self.transposed = isinstance(base, Conv1D)
        in_f, out_f = (base.weight.shape if self.transposed else base.weight.shape[::-1])
        self.lora_A = nn.Linear(in_f, self.r, bias=False)
        self.lora_B = nn.Linear(self.r, out_f, bias=False)
        _init_pair(self.lora_A.weight, self.lora_B.weight, config.init, self.r)
        self.use_dora = config.use_dora
        self.weight_dependent = config.use_dora
        if self.use_dora:
            with torch.no_grad():
                norm = self._weight_norm(self._lora_weight())
            self.lora_magnitude_vector = nn.Parameter(norm.clone())

    def _base_weight(self) -> torch.Tensor:
        w = self.base.weight
        return w.T if self.transposed else w  # (out, in)

    def _lora_weight(self) -> torch.Tensor:
        return self.lora_B.weight @ self.lora_A.weight

    def _weight_norm(self, lora_weight: torch.Tensor) -> torch.Tensor:
        w = self._base_weight().to(lora_weight.dtype)
        return torch.linalg.norm(w + self.scaling * lora_weight, dim=1)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A.weight, self.lora_B.weight
        h = self.lora_dropout(x if x.dtype == a.dtype else x.to(a.dtype))
        if not self.use_dora:
            if h.dtype == base_out.dtype:
                # One fused op for "B-projection, scale, add": addmm(base, hA, B^T, alpha=scaling).
                out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), F.linear(h, a).reshape(-1, self.r),
                                  b.t(), alpha=self.scaling)
                return out.view(base_out.shape)
            return base_out + (F.linear(F.linear(h, a), b) * self.scaling).to(base_out.dtype)
        lora_out = F.linear(F.linear(h, a), b)
        # DoRA: the column norm is detached (DoRA paper, sec. 4.3), as PEFT does.
        norm = self._weight_norm(self._lora_weight().detach()).detach()
        scale = self.lora_magnitude_vector / norm
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            plain = base_out if self.base.bias is None else base_out - self.base.bias
        else:
            plain = F.linear(h, self._base_weight().to(h.dtype))
        return base_out + ((scale - 1) * plain + scale * lora_out * self.scaling).to(base_out.dtype)

    @classmethod
    def forward_grouped(cls, deltas, x, base_out, row_group):
        """Plain LoRA of equal rank in every group: two batched matmuls with per-row A and B."""
        live = [d for d in deltas if d is not None]
        r = live[0].r
        if any(d.use_dora or d.r != r or (d.training and not isinstance(d.lora_dropout, nn.Identity))
               for d in live) or x.dtype != live[0].lora_A.weight.dtype:
            return None
        a0, b0 = live[0].lora_A.weight, live[0].lora_B.weight
        a = torch.stack([torch.zeros_like(a0) if d is None else d.lora_A.weight for d in deltas])
        b = torch.stack([torch.zeros_like(b0) if d is None else d.lora_B.weight * d.scaling for d in deltas])
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        h = torch.bmm(x3, a[row_group].transpose(1, 2))
        y = torch.bmm(h, b[row_group].transpose(1, 2)).reshape(base_out.shape)
        return base_out + y.to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        lora_w = self._lora_weight() * self.scaling
        if self.use_dora:
            w = self._base_weight().to(lora_w.dtype)
            scale = self.lora_magnitude_vector / self._weight_norm(self._lora_weight())
            lora_w = scale[:, None] * (w + lora_w) - w
        return {"weight": lora_w.T if self.transposed else lora_w}


class LoraEmbedding(LoraDelta):
    """LoRA on nn.Embedding: A (r x vocab) is looked up, B (dim x r) projects; A starts at zero."""

    def __init__(self, base: nn.Embedding, config: LoraConfig, path: str) -> None:
        super().__init__(base, config, path)
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

    def __init__(self, base: nn.Conv1d | nn.Conv2d, config: LoraConfig, path: str) -> None:
        super().__init__(base, config, path)
        if base.groups != 1:
            raise TargetError(f"LoRA on '{path}': grouped convolutions (groups={base.groups}) are not supported")
        conv = type(base)
        self.lora_A = conv(base.in_channels, self.r, base.kernel_size, base.stride, base.padding,
                           base.dilation, bias=False)
        self.lora_B = conv(self.r, base.out_channels, 1, 1, bias=False)
        _init_pair(self.lora_A.weight, self.lora_B.weight, config.init, self.r)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return base_out + (self.lora_B(self.lora_A(h)) * self.scaling).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        a = self.lora_A.weight.flatten(1)
        b = self.lora_B.weight.flatten(1)
        return {"weight": (b @ a).view(self.base.weight.shape) * self.scaling}


_LAYERS = (nn.Linear, Conv1D, nn.Embedding, nn.Conv1d, nn.Conv2d)
register("lora", LoraConfig, Capabilities(mergeable=True, mixed_batch=True, layer_types=_LAYERS,
                                          peft_compatible=True))(LoraDelta)
