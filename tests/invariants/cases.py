"""Toy models and per-(method, model) configs for the method-independent invariant suite.

Every registered public method is a case automatically (`all_cases()` reads the registry); its
config is built by a generic factory: `target_modules` = the model's modules whose type is in
the method's declared `capabilities.layer_types` (None when the method has `default_targets`),
plus the fields its config declares for an example (`example_fields`). Whether a fresh adapter
is the identity is the delta class's declared `identity_at_init`. A method the factory cannot
configure fails the suite with a message saying what to declare; it is never skipped silently.
"""
from __future__ import annotations

import contextlib
import functools
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)
from transformers.pytorch_utils import Conv1D

import unipeft as up
from unipeft.core.calibration import calibration_data
from unipeft.core.site import AdaptedSite
from unipeft.kg.complex import LinkPredictor

VOCAB = 64
ROWS = 5
SEQ = 7


# ---- toy models ---------------------------------------------------------------------------
class MLP(nn.Module):
    """Linear -> ReLU -> LayerNorm -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.norm(self.act(self.fc1(x))))


class ConvNet(nn.Module):
    """Conv1d -> GroupNorm -> Conv2d -> Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, 6, 3, padding=1)
        self.norm = nn.GroupNorm(2, 6)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):  # x: (B, 3, 16)
        h = self.act(self.norm(self.conv1(x))).view(x.shape[0], 6, 4, 4)
        return self.head(self.act(self.conv2(h)).flatten(1))


class EmbGPT(nn.Module):
    """nn.Embedding + a GPT-2 style Conv1D MLP block + LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.up = Conv1D(32, 16)
        self.act = nn.GELU()
        self.down = Conv1D(16, 32)
        self.norm = nn.LayerNorm(16)
        with torch.no_grad():  # Conv1D starts with zero bias and std 0.02: make it matter
            for conv in (self.up, self.down):
                conv.weight.normal_(0, 0.3)
                conv.bias.normal_(0, 0.3)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        return self.norm(h + self.down(self.act(self.up(h))))


KG_ENTITIES, KG_RELATIONS = 9, 4


class KGToy(LinkPredictor):
    """A tiny ComplEx link predictor (x = (head, relation) rows -> scores of every tail), plus an
    unused `dropout` module: the unsupported layer the bad-config tests try to target."""

    def __init__(self) -> None:
        super().__init__(KG_ENTITIES, KG_RELATIONS, rank=3)
        self.dropout = nn.Dropout(0.0)
        with torch.no_grad():  # ComplEx starts near zero: give the scores some spread
            self.scorer.entity.normal_(0, 1.0)
            self.scorer.relation.normal_(0, 1.0)


MODEL_KINDS = ("mlp", "conv", "embgpt", "bert", "gpt2", "llama", "kg")
# The module used for modules_to_save (a task head); gpt2's lm_head is tied to wte, so none.
HEADS = {"mlp": "fc2", "conv": "head", "bert": "classifier", "llama": "lm_head"}


def build_model(kind: str, seed: int = 0) -> nn.Module:
    """A freshly initialised tiny model of `kind` in eval mode (same seed -> same weights)."""
    torch.manual_seed(seed)
    if kind == "mlp":
        model = MLP()
    elif kind == "conv":
        model = ConvNet()
    elif kind == "embgpt":
        model = EmbGPT()
    elif kind == "bert":
        model = BertForSequenceClassification(BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
            num_labels=3, max_position_embeddings=16))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                           bos_token_id=0, eos_token_id=0))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=24, max_position_embeddings=16, attention_bias=True, bos_token_id=0,
            eos_token_id=0, pad_token_id=0))
    elif kind == "kg":
        model = KGToy()
    else:
        raise ValueError(kind)
    return model.eval()


def make_batch(kind: str, seed: int = 1, rows: int = ROWS) -> dict[str, torch.Tensor]:
    """A seeded input batch for `kind` (bert: with padding in some rows)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return {"x": torch.randn(rows, 8, generator=g)}
    if kind == "conv":
        return {"x": torch.randn(rows, 3, 16, generator=g)}
    if kind == "kg":
        return {"x": torch.stack([torch.randint(0, KG_ENTITIES, (rows,), generator=g),
                                  torch.randint(0, KG_RELATIONS, (rows,), generator=g)], 1)}
    ids = torch.randint(1, VOCAB, (rows, SEQ), generator=g)
    if kind == "bert":
        mask = torch.ones(rows, SEQ, dtype=torch.long)
        mask[1::2, -2:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    return {"input_ids": ids}


def run(model: nn.Module, batch: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    """The model's output tensor (logits for transformers models), without autograd."""
    with torch.no_grad():
        out = model(**batch, **kwargs)
    return out.logits if hasattr(out, "logits") else out


def module_types(model: nn.Module) -> list[tuple[str, type]]:
    """(path, type) of every module: equal lists mean the same module structure."""
    return [(p, type(m)) for p, m in model.named_modules()]


def no_adapter_modules(model: nn.Module) -> bool:
    """True when neither a site nor a delta is left anywhere in `model`."""
    return not any(isinstance(m, (AdaptedSite, up.Delta)) for m in model.modules())


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- per-method configs -------------------------------------------------------------------
Overrides = Callable[[str, list[str]], dict[str, Any]]

# Test-only extra fields by method name, on top of the config's declared `example_fields`
# (for methods registered inside a test). Built-in methods declare theirs in their config.
OVERRIDES: dict[str, Overrides] = {}


@dataclass(frozen=True)
class Case:
    """One configuration of one method: the registered default, or a named variant."""

    id: str
    method: str
    overrides: Overrides = field(default=lambda kind, targets: {})
    layer_types: tuple[type, ...] | None = None  # narrower than the method's declared types
    needs_head: bool = False  # uses modules_to_save=[HEADS[kind]]
    calibration: str | None = None  # "activations" / "gradients": adapt_case passes calibration batches

    @property
    def spec(self):
        """The method's registry entry."""
        return up.get_method(self.method)


# Variants that take other code paths of the same method (weight-dependent DoRA merge,
# modules_to_save full copies next to a method).
EXTRA_CASES = [
    Case("lora-dora", "lora", lambda kind, targets: {"use_dora": True}, layer_types=(nn.Linear, Conv1D)),
    Case("lora-rslora+modules_to_save", "lora", lambda kind, targets: {"use_rslora": True, "r": 4},
         needs_head=True),
    # The parallel form reads the site's input, the default (Houlsby, sequential) its output.
    Case("bottleneck-scaled-parallel", "bottleneck", lambda kind, targets: {"style": "scaled_parallel"}),
    Case("poly-mhr", "poly", lambda kind, targets: {"routing": "mhr", "n_splits": 2, "r": 4, "n_skills": 3}),
    Case("poly-mhr-mu", "poly", lambda kind, targets: {"routing": "mhr_mu", "r": 2, "n_skills": 3}),
    Case("fusion-scalearn", "fusion", lambda kind, targets: {"mode": "scalearn", "r": 3, "style": "parallel"}),
]
# LoRA's inits and variants as cases of their own (the randomized ones, pissa_niter_K and nlora, draw from
# the global RNG and are covered by tests/methods/test_svd_inits.py). The base-editing ones leave a residual
# in the base; the data-aware ones are adapted (and loaded) with calibration_batches(case, kind).
_MATRIX = (nn.Linear, Conv1D)
EXTRA_CASES += [Case(f"lora-{init}", "lora", lambda kind, targets, init=init: {"init": init}, layer_types=_MATRIX)
                for init in ("pissa", "olora", "milora", "svfit", "sorsa", "loldu")]
EXTRA_CASES += [
    Case("lora-kasa", "lora", lambda kind, targets: {"kasa_config": {}}, layer_types=(nn.Linear,)),
    Case("lora-corda", "lora", lambda kind, targets: {"init": "corda"}, layer_types=_MATRIX, calibration="activations"),
    Case("lora-eva", "lora", lambda kind, targets: {"init": "eva"}, layer_types=_MATRIX, calibration="activations"),
    Case("lora-lora_ga", "lora", lambda kind, targets: {"init": "lora_ga", "r": 1}, layer_types=_MATRIX,
         calibration="gradients"),
]



# Methods the generic cases cannot build from a config alone, with where they are tested instead.
NOT_GENERIC = {"xlora": "its experts are LoRA folders on disk: tests/methods/test_xlora.py and "
                        "tests/interop/test_poly_xlora_parity.py build them"}


def all_cases() -> list[Case]:
    """One case per registered public method (automatically, but NOT_GENERIC), then the extra variants."""
    return [Case(name, name) for name in sorted(up.public_methods()) if name not in NOT_GENERIC] + EXTRA_CASES


CASES = all_cases()
parametrize_cases = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
parametrize_kinds = pytest.mark.parametrize("kind", MODEL_KINDS)


def tied_module_paths(model: nn.Module) -> set[str]:
    """Modules owning a parameter that another module shares (GPT-2's wte and lm_head)."""
    owners: dict[int, set[str]] = {}
    for path, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(path)
    return {path for paths in owners.values() if len(paths) > 1 for path in paths}


@functools.lru_cache(maxsize=None)
def candidate_targets(case: Case, kind: str) -> tuple[str, ...]:
    """Paths the case adapts in model `kind`: modules of a supported type (outermost, untied)."""
    model = build_model(kind)
    spec = case.spec
    types = case.layer_types or spec.capabilities.layer_types
    head = HEADS.get(kind) if case.needs_head else None
    tied = tied_module_paths(model)
    chosen: list[str] = []
    for path, module in model.named_modules():
        if not path or not isinstance(module, types) or path in tied or path == head:
            continue
        if spec.default_targets is not None and not spec.default_targets(path, module):
            continue
        if any(path.startswith(c + ".") for c in chosen):
            continue  # a parent is already adapted
        chosen.append(path)
    return tuple(chosen)


def applicable(case: Case, kind: str) -> bool:
    """Whether the case has anything to adapt in model `kind`."""
    if case.needs_head and kind not in HEADS:
        return False
    return bool(candidate_targets(case, kind))


LOSS_KINDS = ("bert", "gpt2", "llama")  # models whose output has a .loss when given labels


def calibration_batches(case: Case, kind: str) -> list[dict[str, torch.Tensor]] | None:
    """Seeded calibration batches for a data-aware case (with labels for gradient-based inits), else None."""
    if case.calibration is None:
        return None
    batches = [make_batch(kind, seed=s) for s in (21, 22, 23)]
    if case.calibration == "gradients":
        for b in batches:
            b["labels"] = torch.arange(ROWS) % 3 if kind == "bert" else b["input_ids"]
    return batches


def loading(case: Case, kind: str):
    """The context a saved adapter of `case` loads in: data-aware inits rebuild their residual from the
    same calibration batches (core.calibration.calibration_data); others need nothing."""
    batches = calibration_batches(case, kind)
    return contextlib.nullcontext() if batches is None else calibration_data(batches)


def make_config(case: Case, kind: str, targets: list[str] | None = None):
    """The case's config for model `kind`; `targets` narrows target_modules to those paths.

    Skips when the method's declared layer types match nothing in the model; fails (never
    skips) when the config cannot be built, asking for an entry in OVERRIDES.
    """
    spec = case.spec
    if case.needs_head and kind not in HEADS:
        pytest.skip(f"{case.id}: the {kind} model has no untied head for modules_to_save")
    if case.calibration == "gradients" and kind not in LOSS_KINDS:
        pytest.skip(f"{case.id}: the {kind} model gives no loss to take gradients of")
    candidates = list(candidate_targets(case, kind))
    if not candidates:
        pytest.skip(f"{case.id}: its layer types {[t.__name__ for t in spec.capabilities.layer_types]} "
                    f"match nothing in the {kind} model")
    if targets is None and spec.default_targets is not None and case.layer_types is None:
        target_modules = None  # the method's own default selection
    else:
        target_modules = list(targets if targets is not None else candidates)
    kwargs: dict[str, Any] = {"target_modules": target_modules}
    kwargs.update(spec.config_cls.example_fields(candidates))
    kwargs.update(OVERRIDES.get(case.method, lambda k, t: {})(kind, candidates))
    kwargs.update(case.overrides(kind, candidates))
    if case.needs_head:
        kwargs["modules_to_save"] = [HEADS[kind]]
    try:
        return spec.config_cls(**kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure means the case table lacks an entry
        pytest.fail(f"cannot auto-configure method '{case.method}' ({case.id}) for the {kind} toy model: "
                    f"{type(exc).__name__}: {exc}. Add a case for it in OVERRIDES in tests/invariants/cases.py "
                    f"(or declare example_fields on its config)",
                    pytrace=False)


def adapt_case(case: Case, kind: str, model: nn.Module, adapter_name: str = "default",
               targets: list[str] | None = None, into: up.AdaptedModel | None = None):
    """Adapt `model` (or add an adapter to `into`) with the case's config; fail with a hint on error."""
    cfg = make_config(case, kind, targets)
    try:
        if into is not None:
            into.add_adapter(adapter_name, cfg, calibration=calibration_batches(case, kind))
            return into
        return up.adapt(model, cfg, adapter_name, calibration=calibration_batches(case, kind))
    except up.UnipeftError as exc:
        pytest.fail(f"auto-configured {case.id} does not fit the {kind} toy model: {exc}. Add a case for it in "
                    f"OVERRIDES in tests/invariants/cases.py", pytrace=False)


def perturb(model: up.AdaptedModel, adapter_name: str, seed: int, scale: float = 0.1) -> None:
    """Add seeded noise to every parameter of adapter `adapter_name`, so it is not the identity.

    The noise of each tensor depends only on (seed, site path, key), so two models with the
    same adapter get the same perturbation whatever else they hold.
    """
    with torch.no_grad():
        for key, p in adapter_params(model, adapter_name).items():
            g = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(key.encode()))
            p.add_(torch.randn(p.shape, generator=g) * scale)


def adapter_params(model: up.AdaptedModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """`site path.key` -> parameter of adapter `adapter_name`, and `bank.key` for its shared bank."""
    out = {f"{s.path}.{k}": p for s in model.sites() if adapter_name in s.deltas
           for k, p in s.deltas[adapter_name].named_parameters()}
    if adapter_name in model.banks:
        out.update({f"bank.{k}": p for k, p in model.banks[adapter_name].named_parameters()})
    return out


def base_params(model: up.AdaptedModel) -> dict[str, torch.Tensor]:
    """Parameters of the base model (inside sites too), not of any delta."""
    delta_ids = {id(p) for s in model.sites() for d in s.deltas.values() for p in d.parameters()}
    return {n: p for n, p in model.base_model.named_parameters() if id(p) not in delta_ids}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference."""
    return (a - b).abs().max().item()


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a` differs from the reference `b` by more than 1e-4 of b's scale (clamped to [1e-3, 1]): far above
    float32 round-off, and reachable by an adapter whose sites sit behind the toy models' small (std 0.02)
    weights, whose logits are about 1e-2."""
    return max_diff(a, b) > 1e-4 * min(1.0, max(b.abs().max().item(), 1e-3))
