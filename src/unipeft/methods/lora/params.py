"""LoRA on bare parameters (`LoraConfig.target_parameters`, PEFT's ParamWrapper): e.g. the fused expert
weights of mixture-of-experts layers, `experts.gate_up_proj` of shape (experts, 2*inter, hidden).

The module owning the parameter becomes a site with one weight-kind delta, which runs the module
with `param + delta` for each targeted parameter it owns (and merges that delta like any other).
Layout, as PEFT stores it:

  * 2-D parameter (out, in): lora_A (r, in), lora_B (out, r), delta = s B A.
  * 3-D parameter (E, out, in) (E, in, out when the module says `is_transposed`): one rank-r pair
    per expert, kept as lora_A (r*E, in) whose rows are expert-major (A.view(E, r, in)[e] is expert
    e's A) and lora_B (out, r*E) whose columns are rank-major (B.view(out, r, E)[..., e] is expert
    e's B); delta[e] = s B_e A_e.
  * Keys: PEFT nests one wrapper per targeted parameter, the module's first parameter innermost,
    so the last one's pair is `<module>.lora_A.weight` and each earlier one adds a `base_layer.`
    (`<module>.base_layer.lora_A.weight` for gate_up_proj next to down_proj).

As in PEFT, dropout, DoRA and other variants are refused (x cannot be factored out of W + dW).
"""
from __future__ import annotations

import torch
from torch import nn

from ...core.delta import Delta
from ...core.errors import ConfigError
from ...core.targets import matched_parameters
from .config import LoraConfig
from .inits import InitContext, get_init

PLAIN_INITS = ("kaiming", "gaussian")  # inits that do not read a (out, in) base weight


class LoraParams(Delta):
    """LoRA deltas of the targeted parameters of one module (see the module docstring)."""

    kind = "weight"
    commutes = True

    def __init__(self, base: nn.Module, config: LoraConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        _check(config)
        self.r, _ = config.rank_and_alpha(path)
        self.scaling = config.scaling(path)
        self.names = matched_parameters(path, base, config.target_parameters)
        own = dict(base.named_parameters(recurse=False))
        transposed = bool(getattr(base, "is_transposed", False))  # a model's own flag for (E, in, out) experts
        self.parts = nn.ModuleDict()
        self.layout: dict[str, tuple[int, bool]] = {}  # name -> (experts, stored (E, in, out))
        for name in self.names:
            shape = own[name].shape
            if len(shape) == 2:
                experts, in_f, out_f, flip = 1, shape[1], shape[0], False
            elif len(shape) == 3:
                experts, flip = shape[0], transposed
                in_f, out_f = (shape[1], shape[2]) if flip else (shape[2], shape[1])
            else:
                raise ConfigError(f"LoraConfig.target_parameters: '{path}.{name}' has shape {tuple(shape)}; "
                                  f"only 2-D (out, in) and 3-D (experts, out, in) parameters can be adapted")
            part = nn.Module()
            part.lora_A = nn.Linear(in_f, self.r * experts, bias=False)
            part.lora_B = nn.Linear(self.r * experts, out_f, bias=False)
            ctx = InitContext(own[name].detach(), self.r, tuple(part.lora_A.weight.shape),
                              tuple(part.lora_B.weight.shape), f"{path}.{name}", config)
            result = get_init(config.init).fn(ctx)
            with torch.no_grad():
                part.lora_A.weight.copy_(result.a)
                part.lora_B.weight.copy_(result.b)
            self.parts[name] = part
            self.layout[name] = (experts, flip)

    def param_delta(self, name: str) -> torch.Tensor:
        """s * B A for parameter `name`, in its stored shape."""
        part, (experts, flip) = self.parts[name], self.layout[name]
        a, b = part.lora_A.weight, part.lora_B.weight
        if experts == 1:
            return (b @ a) * self.scaling
        a3 = a.reshape(experts, self.r, a.shape[-1])  # (E, r, in)
        b3 = b.reshape(b.shape[0], self.r, experts)  # (out, r, E)
        return torch.einsum("ore,eri->eio" if flip else "ore,eri->eoi", b3, a3) * self.scaling

    def weight_overrides(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: params[n] + self.param_delta(n).to(params[n].dtype) for n in self.names}

    def delta_weight(self) -> dict[str, torch.Tensor]:
        return {n: self.param_delta(n) for n in self.names}

    def saved_key(self, key: str) -> str:
        # "parts.<param>.lora_A.weight" -> PEFT's nesting: one "base_layer." per later targeted parameter.
        _, name, rest = key.split(".", 2)
        return "base_layer." * (len(self.names) - 1 - self.names.index(name)) + rest


def _check(config: LoraConfig) -> None:
    """ConfigError for LoRA options that cannot act on a bare parameter (PEFT refuses the same)."""
    owner = type(config).__name__
    if config.dropout:
        raise ConfigError(f"{owner}.dropout: target_parameters need dropout=0 (x cannot be factored out of "
                          f"W + dW), got {config.dropout!r}")
    if config.variant != "lora":
        raise ConfigError(f"{owner}: target_parameters support plain LoRA only, not the {config.variant!r} variant "
                          f"(use_dora / kasa_config / init={config.init!r})")
    if config.init not in PLAIN_INITS:
        raise ConfigError(f"{owner}.init: target_parameters support init in {list(PLAIN_INITS)}, got {config.init!r}")
