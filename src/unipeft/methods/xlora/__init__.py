"""X-LoRA (Buehler & Buehler 2024, PEFT's "XLORA"): a mixture of frozen LoRA experts with per-token
weights from a classifier over the hidden states of a first pass.

Each call runs the model twice: a scaling pass (experts at `scaling_pass_value`, 0 by default: the base
model alone; no gradient) whose last hidden state the classifier maps to per-token, softmax-normalised
expert weights, then the real pass with every site adding its experts' LoRA outputs at those weights.
Only the classifier trains; it is saved in PEFT's layout (adapter_config.json with the expert folders
under `adapters`, the classifier under `base_model.internal_xlora_classifier.*`), the experts stay in
their LoRA folders.

Registered as an internal method: it needs LoRA expert folders and a transformers model that returns
hidden states, which the method-independent invariant suite cannot build from `example_fields`.
Import it as `from unipeft.methods.xlora import XLoraConfig`; folders of peft_type "XLORA" load with
`AdaptedModel.from_pretrained` as any other.
"""
from __future__ import annotations

from ...core import layers
from ...core.registry import Capabilities, register
from .classifier import XLoraClassifier
from .config import XLoraConfig
from .delta import XLoraDelta

__all__ = ["XLoraClassifier", "XLoraConfig", "XLoraDelta", "latest_scalings"]


def latest_scalings(model, adapter_name: str = "default"):
    """The expert weights of the last call, (batch, tokens, n_layers, n_experts) (PEFT's get_latest_scalings)."""
    return model.banks[adapter_name].latest


register("xlora", XLoraConfig, XLoraDelta,
         Capabilities(mergeable=False, mixed_batch=False, layer_types=layers.MATRIX_LAYERS, peft_compatible=True))
