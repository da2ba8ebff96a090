"""XLoraDelta: at one site, the frozen LoRA experts mixed per token by the classifier's weights.

  out = base(x) + g * sum_i scaling_i * B_i A_i dropout_i(w_i * x)

w_i: expert i's weight for each token at this X-LoRA layer (top-k masked and re-normalised when asked),
g: `global_scaling_weight`, scaling_i: the expert's alpha/r. The delta at the first site is also the
adapter's model-level input side: before the model runs it runs the scaling pass (every w_i fixed to
`scaling_pass_value`, no gradient, hidden states returned), asks the classifier for this call's
weights from the last hidden state, and lets the real pass go on with them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.delta import Delta
from ...core.errors import ConfigError
from .config import XLoraConfig


class XLoraDelta(Delta):
    """`experts` (expert index -> frozen LoRA delta of this module); no parameter of its own."""

    identity_at_init = False  # the experts are trained LoRAs

    def __init__(self, base: nn.Module, config: XLoraConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        self.layer = bank.index[path]
        self.experts = nn.ModuleDict({str(i): d for i, d in sorted(bank.take_experts(path).items())})
        self.global_weight = float(config.global_scaling_weight)
        self.model_input = self.layer == 0  # one delta per adapter drives the scaling pass

    def requires_grad_(self, requires_grad: bool = True) -> "XLoraDelta":
        """The experts stay frozen whatever the adapter's training state (only the classifier trains)."""
        return super().requires_grad_(False)

    def export_state(self) -> dict[str, torch.Tensor]:
        """Nothing per site: the experts live in their own folders, the classifier in the bank."""
        return {}

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        s = self.bank.layer_scalings(self.layer, x, self.path)
        # Dropout follows the base model's mode: a freshly added delta is in training mode even when
        # the model it was added to is in eval mode.
        training = self.base.training
        out = base_out
        for key, e in self.experts.items():
            a, b = e.lora_A.weight, e.lora_B.weight
            h = x.to(a.dtype) * s[..., int(key)].unsqueeze(-1).to(a.dtype)
            out = out + (F.linear(F.linear(e.lora_dropout(h) if training else h, a), b) * e.scaling * self.global_weight).to(out.dtype)
        return out

    def prepare_inputs(self, model, kwargs: dict):
        """Run the scaling pass and predict this call's expert weights; the real pass then uses them."""
        if kwargs.get("past_key_values") is not None:
            raise ConfigError("X-LoRA runs a scaling pass over the whole input at every call, which a key/value cache "
                              "cannot serve: call with use_cache=False (generate(..., use_cache=False))")
        bank = self.bank
        run = {k: v for k, v in kwargs.items() if k != "labels"}
        run.update(output_hidden_states=True, return_dict=True, use_cache=False)
        bank.in_scaling_pass = True
        try:
            with torch.no_grad():
                out = model.base_model(**run)
        finally:
            bank.in_scaling_pass = False
        hidden = getattr(out, "hidden_states", None)
        if not hidden:
            raise ConfigError(f"X-LoRA needs the model's hidden states; {type(model.base_model).__name__} returned "
                              f"none with output_hidden_states=True")
        bank.train(model.base_model.training)  # the classifier's dropout follows the model's mode too
        bank.current = bank.latest = bank(hidden[-1])
        return kwargs, bank.release
