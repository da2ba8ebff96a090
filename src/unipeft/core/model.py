"""AdaptedModel: injects sites into a base model and manages adapters by name."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .config import AdapterConfig
from .delta import Delta
from .errors import ConfigError, MergeError
from .injection import plan_injection
from . import compose, edits, layers, merging, state
from .merging import RequantizationError
from .report import trainable_report
from .site import BASE_NAME, AdaptedSite, ForwardContext


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


class AdaptedModel(nn.Module):
    """A frozen base model with named adapters injected at sites."""

    def __init__(self, base_model: nn.Module, config: AdapterConfig, adapter_name: str = "default",
                 calibration=None) -> None:
        super().__init__()
        self.base_model = base_model
        # Each adapter's frozen, resolved config copy (the user's object is never stored or written).
        self.peft_config: dict[str, AdapterConfig] = {}
        # Per-adapter shared modules (AdapterConfig.make_bank), trained and saved with the adapter.
        self.banks = nn.ModuleDict()
        object.__setattr__(self, "_ctx", ForwardContext())
        # path -> site, kept up to date on inject/remove, so no call walks every module
        # (whose count grows with the number of adapters).
        object.__setattr__(self, "_sites", {})
        object.__setattr__(self, "last_merge_report", [])  # of the latest merge() (see merge)
        # Remember the base's requires_grad flags so unload() gives the model back as it came.
        self._base_requires_grad = {n: p.requires_grad for n, p in base_model.named_parameters()}
        for p in base_model.parameters():
            p.requires_grad_(False)
        try:
            self.add_adapter(adapter_name, config, calibration)
        except Exception:
            self._restore_base_flags()
            raise
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ---- sites ------------------------------------------------------------------------
    def sites(self) -> Iterator[AdaptedSite]:
        """Every site in the model."""
        return iter(list(self._sites.values()))

    @property
    def active_adapters(self) -> list[str]:
        """Names of the adapters applied in forward, in order."""
        return list(self._ctx.active)

    @property
    def active_adapter(self) -> str:
        """The first active adapter (PEFT's single-adapter view)."""
        return self._ctx.active[0] if self._ctx.active else ""

    # ---- adapters -----------------------------------------------------------------------
    def deltas(self, adapter_name: str, kind: str | None = None) -> list[Delta]:
        """The deltas of adapter `adapter_name` in site order (only those of `kind`, if given)."""
        self._check_name(adapter_name)
        return [s.deltas[adapter_name] for s in self._sites.values()
                if adapter_name in s.deltas and (kind is None or s.deltas[adapter_name].kind == kind)]

    def delta_at(self, adapter_name: str, path: str) -> Delta:
        """Adapter `adapter_name`'s delta at module `path`; ConfigError when it has none there."""
        site = self._sites.get(path)
        if site is None or adapter_name not in site.deltas:
            raise ConfigError(f"adapter '{adapter_name}' has no delta at '{path}'")
        return site.deltas[adapter_name]

    def replace_deltas(self, adapter_name: str, new: dict[str, Delta],
                       config: AdapterConfig | None = None) -> dict[str, Delta]:
        """Swap adapter `adapter_name`'s deltas at the given paths (and, optionally, its config) in one
        step: everything is checked first, so on error nothing changed. Returns the replaced deltas."""
        self._check_name(adapter_name)
        old = {path: self.delta_at(adapter_name, path) for path in new}
        merged = [p for p in new if adapter_name in self._sites[p].merged]
        if merged:
            raise MergeError(f"adapter '{adapter_name}' is merged at {merged[:3]}; unmerge() before replacing deltas")
        bad = [p for p, d in new.items() if not isinstance(d, Delta)]
        if bad:
            raise ConfigError(f"replace_deltas: the values at {bad[:3]} are not Delta modules")
        frozen = None if config is None else config.frozen_copy()
        for path, delta in new.items():
            trainable = any(p.requires_grad for p in old[path].parameters())
            delta.requires_grad_(trainable)
            delta.bind(self._ctx)
            self._sites[path].deltas[adapter_name] = delta
        if frozen is not None:
            self.peft_config[adapter_name] = frozen
        self._ctx.version += 1  # sites re-resolve their deltas
        return old

    def add_adapter(self, adapter_name: str, config: AdapterConfig, calibration=None) -> None:
        """Create adapter `adapter_name` from `config`; on any error the model is unchanged.

        `calibration` (a list of model inputs) is needed only by data-aware inits; the config is
        copied, resolved against the model and frozen: the object passed in is never written."""
        if not isinstance(config, AdapterConfig):
            raise ConfigError(f"expected an AdapterConfig (e.g. up.LoraConfig), got {type(config).__name__}")
        if (not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name or adapter_name == BASE_NAME
                or hasattr(nn.Module, adapter_name)):  # a ModuleDict key may not shadow a Module attribute
            raise ConfigError(f"adapter name {adapter_name!r} is invalid: use a non-empty name without '.', other "
                              f"than {BASE_NAME!r} and the attributes of torch modules ('to', 'half', ...)")
        if adapter_name in self.peft_config:
            raise ConfigError(f"adapter '{adapter_name}' already exists; delete_adapter() it first")
        with self.disable_adapters():  # inits and calibration see the original base, whatever is active
            config, new_deltas, bank, base_edits = plan_injection(self.base_model, config, calibration)
        layers.keep_training_layout(self.base_model)  # gradients through every 4-bit layer
        # All deltas were built without error: only now touch the model.
        sites = self._sites
        for path, module, delta in new_deltas:
            site = sites.get(path)
            if site is None:
                site = AdaptedSite(module, path, self._ctx)
                _set_submodule(self.base_model, path, site)
                sites[path] = site
            delta.requires_grad_(False)
            delta.bind(self._ctx)
            site.deltas[adapter_name] = delta
        for path, edit in base_edits.items():
            sites[path].edits.add(adapter_name, edit)  # held in the base while the adapter is active
        if bank is not None:
            bank.requires_grad_(False)
            self.banks[adapter_name] = bank
        self.peft_config[adapter_name] = config
        self._ctx.version += 1

    def set_adapter(self, adapter_names: str | list[str] | compose.Block) -> None:
        """Make these adapters active (applied in this order) and the only trainable parameters; or the
        adapters of a composition block (compose.py: Stack, Split, Average, Parallel, BatchSplit)."""
        block = None
        if isinstance(adapter_names, compose.Block):
            compose.check(self, adapter_names)
            stack = isinstance(adapter_names, compose.Stack)
            block, adapter_names = (None if stack else adapter_names), list(adapter_names.children if stack
                                                                              else adapter_names.leaves())
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for n in names:
            self._check_name(n)
        edits.sync_sites(self._sites.values(), names)  # base-weight edits follow the active set
        self._ctx.active[:] = names
        self._ctx.composition = block
        self._ctx.version += 1
        for site in self.sites():
            for n, delta in site.deltas.items():
                delta.requires_grad_(n in names and not self.peft_config[n].inference_mode)
        for n, bank in self.banks.items():
            bank.requires_grad_(n in names and not self.peft_config[n].inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; sites left without deltas give back their base module."""
        self._check_name(adapter_name)
        for site in list(self.sites()):
            if adapter_name in site.merged:
                raise MergeError(f"adapter '{adapter_name}' is merged; unmerge() before deleting it")
            site.edits.check([n for n in self._ctx.active if n != adapter_name], bool(site.merged))
        for site in list(self.sites()):
            site.edits.remove(adapter_name, self._ctx.active, bool(site.merged))
            if adapter_name in site.deltas:
                del site.deltas[adapter_name]
            if not site.deltas:
                _set_submodule(self.base_model, site.path, site.base_layer)
                del self._sites[site.path]
        del self.peft_config[adapter_name]
        if adapter_name in self.banks:
            del self.banks[adapter_name]
        if adapter_name in self._ctx.active:
            self._ctx.active.remove(adapter_name)
        self._ctx.version += 1

    def _check_name(self, name: str) -> None:
        if name not in self.peft_config:
            raise ConfigError(f"no adapter named '{name}'; adapters: {sorted(self.peft_config)}")

    @contextlib.contextmanager
    def disable_adapters(self):
        """Context in which the model behaves exactly as the base (merged adapters are undone, base
        weights an init edited, such as PiSSA's residual, hold their original values)."""
        merged = {s.path: list(s.merged) for s in self.sites() if s.merged}
        self.unmerge()
        for site in self.sites():
            site.edits.sync([])
        self._ctx.disabled = True
        try:
            yield self
        finally:
            self._ctx.disabled = False
            for site in self.sites():
                site.edits.sync(self._ctx.active)
            sites = self._sites
            for path, names in merged.items():
                for n in names:
                    sites[path].merge(n)

    def disable_adapter(self):
        """PEFT's name for `disable_adapters()`."""
        return self.disable_adapters()

    # ---- merge ----------------------------------------------------------------------------
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> list[RequantizationError]:
        """Add the adapters' deltas into the base weights (default: the active adapters).

        Every check (mergeable, tied weights, delta keys and shapes, quantized support, finiteness
        with `safe_merge`) runs before the first write; a MergeError names the adapter, method and
        layer, and a write failing later undoes this call's merges. Returns, and keeps as
        `last_merge_report`, one `RequantizationError` (path, param, adapter, max_abs, rel_fro)
        per quantized weight requantized; float weights hold W + dW as computed."""
        return merging.merge(self, adapter_names, safe_merge)

    def unmerge(self) -> None:
        """Undo every merge."""
        for site in self.sites():
            site.unmerge()

    @property
    def merged_adapters(self) -> list[str]:
        """Adapters merged into at least one site."""
        return sorted({n for s in self.sites() for n in s.merged})

    def merge_and_unload(self, adapter_names: list[str] | None = None, safe_merge: bool = False,
                         dtype: torch.dtype | None = None) -> nn.Module:
        """Merge the adapters and return the plain base model with no adapter modules left.

        With `dtype`, every quantized linear becomes an nn.Linear holding dequant(W) + dW in `dtype`
        (no requantization); without it, quantized layers are requantized (see `merge`)."""
        if dtype is None:
            self.merge(adapter_names, safe_merge)
        else:
            merging.merge_dequantized(self, adapter_names, safe_merge, dtype)
        return self._strip_sites()

    def unload(self) -> nn.Module:
        """Undo merges and base-weight edits and return the plain base model, as it was before adaptation."""
        self.unmerge()
        for site in self.sites():
            site.edits.clear()
        return self._strip_sites()

    def _strip_sites(self) -> nn.Module:
        for site in self.sites():
            _set_submodule(self.base_model, site.path, site.base_layer)
        self._sites.clear()
        self.peft_config.clear()
        self.banks.clear()
        self._ctx.active.clear()
        self._ctx.version += 1
        self._restore_base_flags()
        return self.base_model

    def _restore_base_flags(self) -> None:
        for n, p in self.base_model.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(n, p.requires_grad))

    # ---- forward ---------------------------------------------------------------------------
    def warm_up(self, *args, **kwargs) -> None:
        """One forward on example inputs with no gradient, dropout or RNG use, filling per-model call
        caches (LoRA's input groups) so the first real call computes like every later one."""
        was_training = self.training
        self.eval()
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                self(*args, **kwargs)
        finally:
            self.train(was_training)

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """Run the base model with the active adapters, or one adapter per row (`adapter_names`).

        Keyword inputs the active adapters declare (`call_inputs`, e.g. task_ids) are taken out of
        the call and held in the forward context for this call only."""
        if not torch.compiler.is_compiling():  # traced, a count that changes per call recompiles per call
            self._ctx.calls += 1
        names = self._call_input_names()
        if not names:
            return self._forward(args, kwargs, adapter_names)
        ctx = self._ctx
        ctx.inputs = {n: kwargs.pop(n) for n in names if n in kwargs}
        try:
            return self._forward(args, kwargs, adapter_names)
        finally:
            ctx.inputs = {}

    def _call_input_names(self) -> tuple[str, ...]:
        """Per-call input names the active adapters declare, resolved once per active-set change."""
        ctx = self._ctx
        cached = self.__dict__.get("_call_names")
        if cached is not None and cached[0] == ctx.version:
            return cached[1]
        names = tuple(dict.fromkeys(n for a in ctx.active for n in type(self.peft_config[a]).call_inputs))
        object.__setattr__(self, "_call_names", (ctx.version, names))
        return names

    def _forward(self, args: tuple, kwargs: dict, adapter_names: list[str] | None):
        block = self._ctx.composition
        if block is not None and not self._ctx.disabled:
            if adapter_names is not None:
                raise ConfigError(f"adapter_names cannot be combined with the active {type(block).__name__} "
                                  f"block; BatchSplit gives rows to adapters within a block")
            if isinstance(block, compose.ROW_BLOCKS):
                return compose.forward_rows(self, block, args, kwargs)
        if adapter_names is None:
            hooks = self._input_deltas()
            if not hooks:
                return self.base_model(*args, **kwargs)
            return self._forward_with_inputs(hooks, args, kwargs)
        self._ctx.grouping = compose.grouping(self, adapter_names)
        try:
            return self.base_model(*args, **kwargs)
        finally:
            self._ctx.grouping = None

    def _input_deltas(self) -> list:
        """Active model-level input-side deltas (prompts, prefixes), resolved once per active-set change."""
        ctx = self._ctx
        if ctx.disabled:
            return []
        cached = self.__dict__.get("_input_cache")
        if cached is not None and cached[0] == ctx.version:
            return cached[1]
        found = [s.deltas[n] for n in ctx.active for s in self._sites.values()
                 if n in s.deltas and s.deltas[n].model_input]
        object.__setattr__(self, "_input_cache", (ctx.version, found))
        return found

    def _forward_with_inputs(self, deltas: list, args: tuple, kwargs: dict):
        """Let each input-side delta rewrite the keyword inputs, run the base, undo in reverse on the output."""
        if args:
            raise ConfigError("an active prompt/prefix adapter needs keyword inputs: call model(input_ids=..., "
                              "attention_mask=...) rather than passing tensors by position")
        posts = []
        for delta in deltas:
            kwargs, post = delta.prepare_inputs(self, dict(kwargs))
            posts.append(post)
        out = self.base_model(**kwargs)
        for post in reversed(posts):
            if post is not None:
                out = post(out)
        return out

    # ---- PEFT-familiar reporting -------------------------------------------------------------
    def generate(self, *args, **kwargs):
        """transformers' generate of the base model with the active adapters applied at every step."""
        from .generation import generate_with_adapters

        return generate_with_adapters(self, *args, **kwargs)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts."""
        rep = trainable_report(self)
        return rep.trainable, rep.total

    def print_trainable_parameters(self) -> None:
        """Print PEFT's one-line trainable-parameter summary."""
        print(trainable_report(self).summary())

    # ---- persistence (see state.py) ---------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, adapter_names: list[str] | None = None) -> None:
        """Write each adapter in PEFT's format ('default' at the top, others in sub-folders)."""
        state.save_adapters(self, save_directory, adapter_names)

    def load_adapter(self, directory: str | Path, adapter_name: str, is_trainable: bool = False) -> None:
        """Add an adapter read from `directory`; a failed load leaves the model unchanged."""
        state.load_adapter(self, directory, adapter_name, is_trainable)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str | Path, adapter_name: str = "default",
                        is_trainable: bool = False) -> "AdaptedModel":
        """Adapt `base_model` with the adapter saved in `directory`; the base is untouched on failure."""
        return state.from_pretrained(cls, base_model, directory, adapter_name, is_trainable)

    def adapter_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """The adapter's tensors under their on-disk (PEFT) names."""
        return state.adapter_state_dict(self, adapter_name)


def adapt(base_model: nn.Module, config: AdapterConfig, adapter_name: str = "default",
          calibration=None) -> AdaptedModel:
    """Inject `config`'s method into `base_model` (in place) and return the AdaptedModel
    (`calibration`: model inputs for data-aware inits, e.g. [{"input_ids": ...}, ...])."""
    return AdaptedModel(base_model, config, adapter_name, calibration)
