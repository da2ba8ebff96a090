"""Compacter and Compacter++ (Mahabadi et al., 2021): bottleneck adapters whose projections are PHM layers.

A PHM (parameterized hypercomplex multiplication) layer of n = `phm_dim` computes y = x W + b with

    W = sum_i A_i (x) B_i,     A_i: n x n (the "rule"),  B_i: (in/n) x (out/n),  (x) = Kronecker product

The rules A are shared by every PHM layer of one adapter (`shared_phm_rule`, held in the adapter's bank)
and may be factorised as A_i = a_i b_i^T (`factorized_phm_rule`); each B_i is low rank,
B_i = L_i R_i with rank `phm_rank` (`factorized_phm_W`). Compacter puts a sequential adapter
out = h + up(act(down(h))) after the attention and after the feed-forward output projection (Houlsby
placement); Compacter++ only after the feed-forward one. Widths follow AdapterHub: the bottleneck is
hidden // `reduction_factor` and phm_dim must divide both widths.

Init: AdapterHub's PHM inits (rules: see `_RuleHolder`; the B factors by the named
`hypercomplex_nonlinearity`, as in the original Compacter code; AdapterHub's own init_W draws Glorot-normal
whatever the name), except that with `init_weights="identity"` (default) the up projection's last factor
starts at zero, so a fresh adapter is exactly the identity; `init_weights="bert"` keeps the all-random init.
The non-linearity makes neither form mergeable.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...core import layers
from ...core.bank import Bank
from ...core.config import AdapterConfig
from ...core.delta import Delta
from ...core.errors import ConfigError
from ...core.fields import choice, positive_int, positive_number
from ...core.registry import Capabilities, register
from ._common import (ACTIVATIONS, bottleneck_width, check_reduction_factor, flag, is_ffn_output, is_houlsby_site,
                      out_width)


@dataclass
class CompacterConfig(AdapterConfig):
    """Compacter: PHM bottleneck adapters after attention and feed-forward outputs (AdapterHub's field names)."""

    peft_type = "COMPACTER"
    reduction_factor: float = 32
    non_linearity: str = choice("gelu", sorted(ACTIVATIONS))
    phm_dim: int = positive_int(4)
    phm_rank: int = positive_int(1)
    shared_phm_rule: bool = flag(True)
    factorized_phm_rule: bool = flag(False)
    factorized_phm_W: bool = flag(True)
    shared_W_phm: bool = flag(False)
    learn_phm: bool = flag(True)
    phm_bias: bool = flag(True)
    phm_c_init: str = choice("normal", ["normal", "uniform"])
    phm_init_range: float = positive_number(0.0001)
    hypercomplex_nonlinearity: str = choice("glorot-uniform", ["glorot-uniform", "glorot-normal", "normal"])
    init_weights: str = choice("identity", ["identity", "bert"])

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        check_reduction_factor(owner, self.reduction_factor)
        if self.shared_W_phm:
            raise ConfigError(f"{owner}.shared_W_phm=True is not supported: one B matrix for every layer needs "
                              f"equal widths at every site; use shared_phm_rule to share the rules")

    def make_bank(self, model, targets) -> "PhmRuleBank | None":
        """The rules A shared by all PHM layers of the adapter (None when every layer owns its rules)."""
        return PhmRuleBank(self) if self.shared_phm_rule else None

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict:
        """Toy widths are 16: bottleneck 4, two 2x2 rules; a wider rule init so training moves outputs."""
        return {"reduction_factor": 4, "phm_dim": 2, "phm_init_range": 0.1}


@dataclass
class CompacterPlusPlusConfig(CompacterConfig):
    """Compacter++: one PHM adapter per layer, after the feed-forward output only."""

    peft_type = "COMPACTER_PLUS_PLUS"


class _RuleHolder(nn.Module):
    """The rules A (n, n, n) of PHM layers: full, or factorised A_i = left_i @ right_i.

    Init as AdapterHub: shared rules N(0, phm_init_range) or U(-1, 1); a layer's own rules N(0, 0.01) or
    U(-0.01, 0.01)."""

    shared: bool = False

    def __init__(self, config: CompacterConfig) -> None:
        super().__init__()
        n = config.phm_dim
        shapes = {"phm_rule_left": (n, n, 1), "phm_rule_right": (n, 1, n)} if config.factorized_phm_rule \
            else {"phm_rule": (n, n, n)}
        for name, shape in shapes.items():
            t = torch.empty(shape)
            if config.phm_c_init == "normal":
                t.normal_(0.0, config.phm_init_range if self.shared else 0.01)
            else:
                bound = 1.0 if self.shared else 0.01
                t.uniform_(-bound, bound)
            if config.learn_phm:
                self.register_parameter(name, nn.Parameter(t))
            else:  # fixed rules: saved with the adapter, never trained
                self.register_buffer(name, t)
        self.factorized = config.factorized_phm_rule

    def rule(self) -> torch.Tensor:
        """A as (n, n, n)."""
        if self.factorized:
            return self.phm_rule_left @ self.phm_rule_right
        return self.phm_rule


class PhmRuleBank(_RuleHolder, Bank):
    """The adapter's shared rules, saved once under `bank.` keys."""

    shared = True


def kron_sum(rule: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_i A_i (x) B_i for A (n, a, b) and B (n, c, d): the (a*c, b*d) matrix."""
    n, a, b = rule.shape
    _, c, d = w.shape
    return torch.einsum("iab,icd->acbd", rule, w).reshape(a * c, b * d)


class PHMLinear(nn.Module):
    """y = x W + b with W = sum_i A_i (x) B_i; B_i = W_left_i @ W_right_i when factorised."""

    def __init__(self, d_in: int, d_out: int, config: CompacterConfig, shared: PhmRuleBank | None,
                 zero_last: bool) -> None:
        super().__init__()
        n, k = config.phm_dim, config.phm_rank
        p, q = d_in // n, d_out // n
        self.factorized = config.factorized_phm_W
        mats = {"W_left": (n, p, k), "W_right": (n, k, q)} if self.factorized else {"W": (n, p, q)}
        for name, shape in mats.items():
            t = torch.empty(shape)
            for i in range(n):
                if config.hypercomplex_nonlinearity == "glorot-uniform":
                    nn.init.xavier_uniform_(t[i])
                elif config.hypercomplex_nonlinearity == "glorot-normal":
                    nn.init.xavier_normal_(t[i])
                else:
                    t[i].normal_(0.0, config.phm_init_range)
            self.register_parameter(name, nn.Parameter(t))
        if zero_last:  # the factor nearest the output: W == 0, gradients still reach it
            nn.init.zeros_(self.W_right if self.factorized else self.W)
        self.b = nn.Parameter(torch.zeros(d_out)) if config.phm_bias else None
        if shared is None:
            self.rules = _RuleHolder(config)
        object.__setattr__(self, "_shared", shared)  # the bank is not this layer's state

    def factors(self) -> torch.Tensor:
        """B as (n, in/n, out/n)."""
        return self.W_left @ self.W_right if self.factorized else self.W

    def rule(self) -> torch.Tensor:
        """A as (n, n, n): the adapter's shared rules or this layer's own."""
        return (self._shared if self._shared is not None else self.rules).rule()

    def weight(self) -> torch.Tensor:
        """The dense (in, out) matrix."""
        return kron_sum(self.rule(), self.factors())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().t(), self.b)  # one kernel whatever requires grad


class CompacterDelta(Delta):
    """Sequential PHM adapter on the site's output h: h + up(act(down(h)))."""

    def __init__(self, base: nn.Module, config: CompacterConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        d = out_width(base)
        width = bottleneck_width(type(config).__name__, path, d, config.reduction_factor, config.phm_dim)
        identity = config.init_weights == "identity"
        self.adapter_down = PHMLinear(d, width, config, bank, zero_last=False)
        self.act = ACTIVATIONS[config.non_linearity]()
        self.adapter_up = PHMLinear(width, d, config, bank, zero_last=identity)
        self.identity_at_init = identity

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        h = base_out.to(self.adapter_up.W_right.dtype if self.adapter_up.factorized else self.adapter_up.W.dtype)
        return base_out + self.adapter_up(self.act(self.adapter_down(h))).to(base_out.dtype)


_CAPS = Capabilities(mergeable=False, mixed_batch=True, layer_types=layers.MATRIX_LAYERS)
register("compacter", CompacterConfig, CompacterDelta, _CAPS, default_targets=is_houlsby_site)
register("compacter_pp", CompacterPlusPlusConfig, CompacterDelta, _CAPS, default_targets=is_ffn_output)
