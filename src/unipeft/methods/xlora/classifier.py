"""The X-LoRA classifier: the adapter's bank (one per adapter), saved under PEFT's keys
`base_model.internal_xlora_classifier.layers.<i>.*`.

It maps the last hidden state of the scaling pass, (batch, tokens, hidden), to per-token expert
weights (batch, tokens, n_layers, n_experts), softmax-normalised over the experts; with
`layerwise_scalings` every X-LoRA layer gets its own weights, otherwise one set is shared by all.
It also builds the experts' frozen LoRA deltas from their folders at injection; each site takes
its own (they are saved by no one: the folders stay the experts' source).
"""
from __future__ import annotations

import torch
from torch import nn

from ...core.bank import Bank
from ...core.errors import AdapterLoadError, ConfigError
from ...core.registry import get_method
from ...core.state import read_adapter
from .config import EXPERT_METHOD, XLoraConfig

FILE_PREFIX = "base_model.internal_xlora_classifier."


def _layers(config: XLoraConfig, n_out: int) -> list[nn.Module]:
    """PEFT's stack: one Linear at depth 1; else Linear-ReLU(-Dropout) blocks of width xlora_size, then the last."""
    if config.xlora_depth == 1:
        return [nn.Linear(config.hidden_size, n_out)]
    out: list[nn.Module] = []
    width = config.hidden_size
    for _ in range(config.xlora_depth - 1):
        out += [nn.Linear(width, config.xlora_size), nn.ReLU()]
        if config.xlora_dropout_p > 0:
            out.append(nn.Dropout(config.xlora_dropout_p))
        width = config.xlora_size
    return out + [nn.Linear(width, n_out)]


def _module_of(key: str, prefix: str) -> str:
    return key[len(prefix):].rsplit(".lora_", 1)[0]


def _load_expert(name: str, folder: str, model: nn.Module, by_path: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """{path: frozen LoRA delta} of expert `name` at the targets in `by_path`, its tensors checked and copied in."""
    spec = get_method(EXPERT_METHOD)
    lora, tensors = read_adapter(folder)
    if type(lora) is not spec.config_cls or lora.variant != "lora" or lora.bias != "none" \
            or lora.modules_to_save or lora.target_parameters:
        raise ConfigError(f"XLoraConfig.adapters[{name!r}]: expected a plain LoRA folder (no DoRA or other variant, "
                          f"bias='none', no modules_to_save or target_parameters), {folder!r} is not")
    prefix = lora.state_prefix
    mine = [(p, by_path[p]) for p in sorted({_module_of(k, prefix) for k in tensors}) if p in by_path]
    lora = lora.frozen_copy(**lora.resolved_fields(model, mine), target_modules=[p for p, _ in mine])
    deltas, expected = {}, {}
    for path, module in mine:
        delta = deltas[path] = spec.delta_cls.create(module, lora, path)
        if delta.base_edits():
            raise ConfigError(f"XLoraConfig.adapters[{name!r}]: its init ({lora.init}) edits the base weights; "
                              f"X-LoRA mixes plain LoRA experts")
        delta.requires_grad_(False)
        expected.update({f"{prefix}{path}.{k}": (delta, k, v) for k, v in delta.export_state().items()})
    wanted = {k for k in tensors if _module_of(k, prefix) in by_path}
    if wanted != set(expected):
        raise AdapterLoadError(f"expert {name!r} ({folder}) does not fit this model: missing "
                               f"{sorted(set(expected) - wanted)[:4]}, unexpected {sorted(wanted - set(expected))[:4]}")
    found: dict[int, dict[str, torch.Tensor]] = {}
    for file_key, (delta, key, value) in expected.items():
        if tuple(tensors[file_key].shape) != tuple(value.shape):
            raise AdapterLoadError(f"expert {name!r}: '{file_key}' has shape {tuple(tensors[file_key].shape)}, "
                                   f"the model expects {tuple(value.shape)}")
        found.setdefault(id(delta), {})[key] = tensors[file_key]
    for delta in deltas.values():
        delta.import_state(found[id(delta)])
    return deltas


class XLoraClassifier(Bank):
    """`layers` (trained); the per-call state of the two passes; the experts until the sites take them."""

    def __init__(self, config: XLoraConfig, names: list[str], paths: list[str], dtype: torch.dtype) -> None:
        super().__init__()
        self.names, self.paths = list(names), list(paths)
        self.index = {p: i for i, p in enumerate(paths)}
        self.n_experts, self.n_layers = len(names), len(paths)
        self.layerwise = config.layerwise_scalings
        self.enable_softmax, self.temperature = config.enable_softmax, config.softmax_temperature
        self.top_k, self.softmax_topk = config.top_k_lora, config.enable_softmax_topk
        self.scaling_pass_value = float(config.scaling_pass_value)
        self.layers = nn.Sequential(*_layers(config, self.n_experts * (self.n_layers if self.layerwise else 1)))
        self.layers.to(dtype)
        self.in_scaling_pass = False
        self.current: torch.Tensor | None = None  # this call's scalings, while its second pass runs
        self.latest: torch.Tensor | None = None  # the last scalings predicted (PEFT's get_latest_scalings)
        self.pending: dict[str, dict[int, nn.Module]] = {}  # path -> {expert index: LoRA delta}

    @classmethod
    def build(cls, config: XLoraConfig, model: nn.Module, targets: list[tuple[str, nn.Module]]) -> "XLoraClassifier":
        """Read every expert folder and build its frozen LoRA deltas at the targets it adapts."""
        bank = cls(config, list(config.adapters), [p for p, _ in targets], next(model.parameters()).dtype)
        for i, (name, folder) in enumerate(config.adapters.items()):
            for path, delta in _load_expert(name, folder, model, dict(targets)).items():
                bank.pending.setdefault(path, {})[i] = delta
        empty = [p for p in bank.paths if p not in bank.pending]
        if empty:
            raise ConfigError(f"XLoraConfig.target_modules: no expert adapts {empty[:3]}")
        return bank

    def saved_key(self, key: str) -> str:
        """PEFT's file key of classifier parameter `key`."""
        return f"{FILE_PREFIX}{key}"

    def take_experts(self, path: str) -> dict[int, nn.Module]:
        """The experts' deltas at `path` (handed to that site's X-LoRA delta once)."""
        return self.pending.pop(path)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, hidden) -> (batch, tokens, n_layers, n_experts) scalings."""
        logits = self.layers(hidden.to(self.layers[0].weight.dtype))
        batch, tokens = hidden.shape[:2]
        if not self.layerwise:
            logits = logits.unsqueeze(2).expand(-1, -1, self.n_layers, -1)
        scalings = logits.reshape(batch, tokens, self.n_layers, self.n_experts)
        if self.enable_softmax:
            scalings = torch.softmax(scalings / self.temperature, dim=-1)
        return scalings

    def layer_scalings(self, layer: int, x: torch.Tensor, path: str) -> torch.Tensor:
        """(batch, tokens, n_experts) weights of X-LoRA layer `layer` for input `x`, top-k applied."""
        if x.dim() != 3:
            raise ConfigError(f"X-LoRA at '{path}': expected (batch, tokens, features) inputs, got shape "
                              f"{tuple(x.shape)}")
        if self.in_scaling_pass:  # every expert at the same fixed weight (0 by default: the base alone)
            s = torch.full((*x.shape[:2], self.n_experts), self.scaling_pass_value, dtype=x.dtype, device=x.device)
        elif self.current is None:
            raise ConfigError(f"X-LoRA at '{path}': no expert weights for this call; call the AdaptedModel with "
                              f"keyword inputs (it runs the scaling pass first), not its base model")
        else:
            s = self.current[:, :, layer, :]
        if self.top_k is not None:
            keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, torch.topk(s, k=self.top_k, dim=-1)[1], True)
            s = s * keep.to(s.dtype)
        if self.softmax_topk:
            nonzero = s != 0
            s = torch.softmax(s.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
        return s

    def release(self, out):
        """Post-processor of the second pass: drop this call's scalings (kept as `latest`)."""
        self.current = None
        return out
