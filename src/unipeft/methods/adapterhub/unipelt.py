"""UniPELT (Mao et al., 2022): LoRA, a bottleneck adapter and prefix tuning, each scaled by a learned
input-dependent gate.

    gate(x) = mean over the sequence of sigmoid(W_g x + b_g)          (one scalar per example)
    gated LoRA at the attention projections:     out = base(x) + gate(x) * (x A^T B^T)
    gated adapter after the feed-forward block:  out = h + gate(h) * up(act(down(h)))
    gated prefix (with `prefix_length`):         layer l attends to gate(h_l) * prefix keys/values of layer l

As in AdapterHub, the gated LoRA has no alpha / r factor (the gate replaces it); gate weights start as
N(0, 0.02). A site is an adapter site when `adapter_modules` names it (by default: feed-forward output
projections) and a LoRA site otherwise; `target_modules` None selects the attention query/value
projections and the feed-forward outputs. Identity at init: B = 0 and, with init_weights="identity"
(default), the adapter's up projection = 0 ("bert": AdapterHub's N(0, 0.02) for both projections).

The gated prefix (off unless `prefix_length` is set; AdapterHub's UniPELTConfig uses 10) is unipeft's
prefix tuning (MLP-reparametrised with hidden width `prefix_bottleneck_size`, or a plain table with
`prefix_flat`) with one gate per layer computed from that layer's attention input (see _gated_prefix.py);
it lives in the adapter's bank and the first site's delta applies it for each model call. It is not the
identity at init (the gates start near 0.5) and it cannot run in mixed batches (adapter_names). Not
mergeable (the gates are input-dependent).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...core import layers
from ...core.config import AdapterConfig
from ...core.delta import Delta
from ...core.errors import ConfigError
from ...core.fields import choice, fraction, name_spec, positive_int
from ...core.registry import Capabilities, register
from ...core.targets import name_matches
from ._common import (ACTIVATIONS, bottleneck_width, check_reduction_factor, flag, in_width, is_ffn_output,
                      mean_gate, out_width)
from ._gated_prefix import GatedPrefixBank

LORA_DEFAULTS = ("query", "value", "q_proj", "v_proj", "c_attn")


def is_lora_default(path: str, module: nn.Module) -> bool:
    """Default LoRA sites: attention query and value projections (GPT-2: the fused c_attn)."""
    return layers.is_matrix_layer(module) and any(path.endswith("." + n) for n in LORA_DEFAULTS) \
        and "crossattention" not in path


def is_unipelt_default(path: str, module: nn.Module) -> bool:
    """Default sites: LoRA's attention projections and the adapter's feed-forward outputs."""
    return is_lora_default(path, module) or is_ffn_output(path, module)


@dataclass
class UniPELTConfig(AdapterConfig):
    """Gated LoRA (rank `r`) + gated sequential bottleneck adapter (hidden // `reduction_factor`) + with
    `prefix_length`, a gated prefix of that many positions per layer (AdapterHub's PrefixTuningConfig fields:
    `prefix_bottleneck_size` its bottleneck_size, `prefix_flat` its flat, `prefix_shared_gating` its
    shared_gating: one gate for keys and values, else one each)."""

    peft_type = "UNIPELT"
    r: int = positive_int(8)
    lora_dropout: float = fraction(0.0)
    reduction_factor: float = 16
    non_linearity: str = choice("relu", sorted(ACTIVATIONS))
    adapter_modules: list[str] | str | None = name_spec()
    init_weights: str = choice("identity", ["identity", "bert"])
    prefix_length: int | None = positive_int(None, optional=True)
    prefix_bottleneck_size: int = positive_int(512)
    prefix_flat: bool = flag(False)
    prefix_shared_gating: bool = flag(True)

    def validate(self) -> None:
        super().validate()
        check_reduction_factor(type(self).__name__, self.reduction_factor)

    def is_adapter_site(self, path: str, module: nn.Module) -> bool:
        """Whether the site at `path` holds the gated adapter (else the gated LoRA)."""
        if self.adapter_modules is not None:
            return name_matches(path, self.adapter_modules)
        return is_ffn_output(path, module)

    def make_bank(self, model: nn.Module, targets: list[tuple[str, nn.Module]]) -> GatedPrefixBank | None:
        """The gated prefix (prefix encoder and per-layer gates) when `prefix_length` is set."""
        if self.prefix_length is None:
            return None
        return GatedPrefixBank(model, self, targets[0][0])

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict:
        """Toy widths are 16: rank 2, bottleneck 4."""
        return {"r": 2, "reduction_factor": 4}


def _gate(d: int) -> nn.Linear:
    gate = nn.Linear(d, 1)
    nn.init.normal_(gate.weight, std=0.02)
    return gate


class UniPELTDelta(Delta):
    """Dispatches each site to its gated part (`create`)."""

    @classmethod
    def create(cls, base, config: UniPELTConfig, path: str, bank=None, calibration=None) -> Delta:
        part = GatedAdapterDelta if config.is_adapter_site(path, base) else GatedLoraDelta
        return part(base, config, path, bank)

    def _join_prefix(self) -> None:
        """The first site's delta applies the adapter's gated prefix (a model-level input side)."""
        bank = self.bank
        if isinstance(bank, GatedPrefixBank) and bank.driver == self.path:
            self.model_input = True
            self.identity_at_init = False

    def _check_rows(self) -> None:
        if self.model_input and self._ctx is not None and self._ctx.grouping is not None:
            raise ConfigError("UniPELT with a gated prefix acts on the model's inputs (past_key_values), so it "
                              "cannot run in a mixed batch (adapter_names); use set_adapter")

    def prepare_inputs(self, model, kwargs: dict):
        return self.bank.prepare_inputs(model, kwargs)


class GatedLoraDelta(UniPELTDelta):
    """out = base(x) + gate(x) * (dropout(x) A^T B^T); A Kaiming-uniform, B zero."""

    def __init__(self, base: nn.Module, config: UniPELTConfig, path: str, bank=None) -> None:
        Delta.__init__(self, base, config, path, bank)
        d_in, d_out = in_width(base), out_width(base)
        self.lora_A = nn.Parameter(torch.empty(config.r, d_in))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(d_out, config.r))
        self.gate = _gate(d_in)
        self.dropout = nn.Dropout(config.lora_dropout)
        self.train(base.training)  # dropout / stochastic depth follow the base's train/eval mode
        self._join_prefix()

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        self._check_rows()
        h = x.to(self.lora_A.dtype)
        update = F.linear(F.linear(self.dropout(h), self.lora_A), self.lora_B)
        return base_out + (mean_gate(self.gate, h) * update).to(base_out.dtype)


class GatedAdapterDelta(UniPELTDelta):
    """out = h + gate(h) * up(act(down(h))) on the site's output h."""

    def __init__(self, base: nn.Module, config: UniPELTConfig, path: str, bank=None) -> None:
        Delta.__init__(self, base, config, path, bank)
        d = out_width(base)
        width = bottleneck_width(type(config).__name__, path, d, config.reduction_factor)
        self.adapter_down = nn.Linear(d, width)
        self.act = ACTIVATIONS[config.non_linearity]()
        self.adapter_up = nn.Linear(width, d)
        for linear in (self.adapter_down, self.adapter_up):  # AdapterHub's "bert" init
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        if config.init_weights == "identity":
            nn.init.zeros_(self.adapter_up.weight)
        self.identity_at_init = config.init_weights == "identity"
        self.gate = _gate(d)
        nn.init.zeros_(self.gate.bias)
        self._join_prefix()

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        self._check_rows()
        h = base_out.to(self.adapter_down.weight.dtype)
        up = self.adapter_up(self.act(self.adapter_down(h)))
        return base_out + (mean_gate(self.gate, h) * up).to(base_out.dtype)


register("unipelt", UniPELTConfig, UniPELTDelta,
         Capabilities(mergeable=False, mixed_batch=True, layer_types=layers.MATRIX_LAYERS),
         default_targets=is_unipelt_default)
