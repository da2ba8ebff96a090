"""LstConfig and the ladder plan: which blocks feed the side network and where its output is added.

The layer list is found by one documented rule: among the model's nn.ModuleLists, those whose entries are
all modules of one class that each hold a matrix layer (Linear / GPT-2 Conv1D) are lists of repeated
blocks (BERT-style `*.encoder.layer`, GPT-2 `*.transformer.h`, Llama / SmolLM2 `*.model.layers`); the
longest one is the layer list (ties: the first in module order). A model without one (a plain
nn.Sequential of Linears) gets a ConfigError at adapt time, before any training step.

The receiver (where the side output is added) is the site just before the task head: the final norm when
the module owning the layer list has one after the list (GPT-2 `ln_f`, Llama `norm`), else the last block
(BERT, whose norms sit inside the blocks). Sites: with target_modules=None, every block of the list (those
whose index is in `layers` feed the side network) and the final norm, when named one of FINAL_NORM_NAMES
(another name: the last block receives). With target_modules listed, the listed blocks (filtered by
`layers`) feed and the last listed module receives; a norm may only be listed last.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from ...core import layers
from ...core.config import AdapterConfig
from ...core.errors import ConfigError
from ...core.fields import Rule, is_int, positive_int, ruled
from ...core.site import AdaptedSite
from ...core.targets import logical_modules

# Names of a final norm that is a child of the module owning the layer list.
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm", "layernorm")
UNDERSTOOD = ("an nn.ModuleList of repeated blocks, each a module of one class holding Linear layers: "
              "BERT-style '*.encoder.layer', GPT-2 '*.transformer.h', Llama/SmolLM2 '*.model.layers'")
_ENTRY = re.compile(r".+\.\d+$|\d+$")  # an entry of a module list: the path ends in an index


def is_norm(module: nn.Module) -> bool:
    """A LayerNorm / RMSNorm (torch's or a model's own class of that name)."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def is_block(module: nn.Module) -> bool:
    """A composite module holding a matrix layer (a transformer block), not a matrix layer itself."""
    if layers.is_matrix_layer(module) or not any(True for _ in module.children()):
        return False
    return any(layers.is_matrix_layer(m) for m in module.modules())


class _SiteMeta(type):
    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, nn.Module) and (is_block(obj) or is_norm(obj) or _plain_matrix(obj))


def _plain_matrix(module: nn.Module) -> bool:
    # A bare float Linear is accepted as a site only so that the plan can refuse it with a ConfigError naming
    # the model; a quantized one never looks like a target.
    return layers.is_matrix_layer(module) and not layers.is_quantized(module)


class LadderModule(metaclass=_SiteMeta):
    """isinstance(m, LadderModule): a block, a norm or a float matrix layer (the plan refuses what is no ladder
    site)."""


def is_ladder_site(path: str, module: nn.Module) -> bool:
    """Default sites: entries of module lists (blocks; a list of bare Linears too, which the plan then refuses
    with a ConfigError naming the model), and a final norm named in FINAL_NORM_NAMES below the top level."""
    if _ENTRY.fullmatch(path):
        return is_block(module) or _plain_matrix(module)
    parent, _, name = path.rpartition(".")
    return bool(parent) and name in FINAL_NORM_NAMES and is_norm(module)


def _is_layers(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(is_int(i) and i >= 0 for i in v)


@dataclass
class LstConfig(AdapterConfig):
    """Ladder Side-Tuning: a side network of width hidden/reduction_factor fed by the detached outputs of the
    blocks in `layers` (None: all), its zero-initialised up-projection added before the task head;
    `sherl` consolidates the early blocks' features by SHERL's anti-redundancy weighting (see side.py)."""

    peft_type = "LST"

    reduction_factor: int = positive_int(8)
    layers: list[int] | None = ruled(None, Rule(_is_layers, "None or a non-empty list of layer indices >= 0",
                                                optional=True))
    sherl: bool = ruled(False, Rule(lambda v: isinstance(v, bool), "True or False"))
    hidden_size: int | None = positive_int(None, optional=True)  # resolved: the width of the blocks' outputs

    def __post_init__(self) -> None:
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        super().__post_init__()

    def resolved_fields(self, model: nn.Module, targets) -> dict[str, Any]:
        """The hidden width of the ladder (ConfigError, naming the model, when it has no layer list)."""
        return {"hidden_size": ladder_plan(model, targets, self).width}

    def make_bank(self, model: nn.Module, targets):
        """The side network (down-projections, gates, side blocks, up-projection) shared by the sites."""
        from .side import LstBank

        return LstBank(ladder_plan(model, targets, self), self)

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        """Width hidden/4 on the toy models (hidden 16)."""
        return {"reduction_factor": 4}


@dataclass(frozen=True)
class LadderPlan:
    """The feeding blocks (paths, model order), the receiving site, the hidden width and the side width."""

    rungs: tuple[str, ...]
    receiver: str
    width: int
    side_width: int


def find_layer_list(model: nn.Module) -> tuple[str, list[str]] | None:
    """(path of the layer list, its entries' paths) by the rule in the module docstring, or None."""
    modules = dict(logical_modules(model))
    best = None
    for path, module in modules.items():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        entries = [f"{path}.{i}" for i in range(len(module))]
        items = [modules.get(e) for e in entries]
        if any(m is None for m in items) or len({type(m) for m in items}) != 1 or not is_block(items[0]):
            continue
        if best is None or len(entries) > len(best[1]):
            best = (path, entries)
    return best


def _index(path: str) -> int:
    return int(path.rsplit(".", 1)[-1])


def _width(module: nn.Module) -> int:
    if is_norm(module):
        return int(module.weight.shape[0])
    first = next(m for m in module.modules() if layers.is_matrix_layer(m))
    return layers.geometry(first).in_features


def ladder_plan(model: nn.Module, targets: list[tuple[str, nn.Module]], config: LstConfig) -> LadderPlan:
    """The ladder for `targets` (from target_modules or the default sites); ConfigError naming the model and
    the field for anything that is no ladder."""
    name, owner = type(model).__name__, type(config).__name__
    found = find_layer_list(model)
    if found is None:
        raise ConfigError(f"{owner}: {name} has no layer list for the side network to read; LST understands "
                          f"{UNDERSTOOD}")
    list_path, entries = found
    target_map = dict(targets)
    if config.target_modules is None:
        parent = list_path.rpartition(".")[0]
        norms = [p for p in target_map if p.rpartition(".")[0] == parent and is_norm(target_map[p])]
        blocks = [p for p in entries if p in target_map]
        receiver = norms[-1] if norms else entries[-1]
    else:
        paths = list(target_map)
        bad = [p for p in paths if not (is_norm(target_map[p]) or (_ENTRY.fullmatch(p) and is_block(target_map[p])))]
        if bad:
            raise ConfigError(f"{owner}.target_modules: '{bad[0]}' is neither a block of a layer list nor a norm; "
                              f"LST reads blocks' outputs (e.g. '{entries[0]}') and adds its output at the last target")
        misplaced = [p for p in paths[:-1] if is_norm(target_map[p])]
        if misplaced:
            raise ConfigError(f"{owner}.target_modules: the norm '{misplaced[0]}' is not the last target; a norm "
                              f"can only receive the side output, which is added at the last target")
        blocks, receiver = [p for p in paths if not is_norm(target_map[p])], paths[-1]
    nested = [f"{p}.{q}" for p, m in targets for q, sub in m.named_modules() if q and isinstance(sub, AdaptedSite)]
    if nested:  # core's sites do not nest: a block-level site over another adapter's sites would hide them
        raise ConfigError(f"{owner}: the blocks to read already hold adapted modules ({nested[:2]}); LST's sites wrap "
                          f"whole blocks and sites do not nest (added first, LST would also hide the blocks' modules "
                          f"from later adapters): use LST on a model without adapters inside its blocks")
    if config.layers is not None:
        known = sorted({_index(p) for p in blocks})
        missing = sorted(set(config.layers) - set(known))
        if missing:
            raise ConfigError(f"{owner}.layers: {missing} name no block of {name}'s sites (indices: {known})")
        blocks = [p for p in blocks if _index(p) in set(config.layers)]
    if not blocks:
        raise ConfigError(f"{owner}.target_modules: {config.target_modules!r} lists no block to feed the side "
                          f"network (blocks look like '{entries[0]}')")
    if config.sherl and len(blocks) < 3:
        raise ConfigError(f"{owner}.sherl: SHERL consolidates the outputs of all feeding layers but the last (at least "
                          f"two shallow ones and a guide), so it needs at least 3 feeding layers; got {len(blocks)}")
    width = config.hidden_size or _width(target_map.get(blocks[0]) or dict(logical_modules(model))[blocks[0]])
    side = width // config.reduction_factor
    if side < 1:
        raise ConfigError(f"{owner}.reduction_factor: {config.reduction_factor} exceeds the hidden width {width} "
                          f"of {name}; expected at most {width}")
    return LadderPlan(tuple(blocks), receiver, width, side)
