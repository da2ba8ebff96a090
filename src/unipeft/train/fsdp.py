"""FSDP2 for adapter training: the frozen base (and the adapters) sharded over the processes of a launch.

accelerate's FSDP plugin engages only on GPUs (on CPU processes an FSDP launch silently runs
DDP), so unipeft applies torch's `fully_shard` itself: one FSDP unit per transformer block
(the model's `_no_split_modules`, or accelerate's FSDP_TRANSFORMER_CLS_TO_WRAP; the input
embeddings stay in the root unit), then the root, after the adapters are injected and before
the optimizer is built. FSDP2 shards every
parameter on its own (a DTensor cut along dim 0), so frozen base weights and trainable adapter
weights share a unit; only the trainable ones get gradients to reduce-scatter.

Whatever leaves the processes is first gathered to whole tensors (`full_tensor()`), so
checkpoints and the final adapter have exactly the single-process format: a checkpoint written
by N FSDP processes resumes on any number of processes, with or without FSDP.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError

STRATEGIES = ("auto", "ddp", "fsdp")
LAUNCH = "accelerate launch --use_fsdp --fsdp_version 2 --num_processes N -m unipeft.cli train CONFIG.yaml"
WRAP_POLICIES = ("TRANSFORMER_BASED_WRAP", "NO_WRAP")


def _flag(env: Mapping[str, str], key: str, default: str = "false") -> bool:
    """An accelerate-style boolean environment variable."""
    return env.get(key, default).strip().lower() in ("1", "true", "yes")


# ---- which strategy this launch uses -----------------------------------------------------------
def check_deepspeed(env: Mapping[str, str] = os.environ) -> None:
    """Refuse DeepSpeed launches, saying why."""
    if not _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        return
    why = ("DeepSpeed ZeRO runs on CUDA GPUs and this machine has none (torch.cuda.is_available() is False); "
           if not torch.cuda.is_available() else "")
    raise ConfigError(f"DeepSpeed launches are refused (ACCELERATE_USE_DEEPSPEED=true, from `accelerate launch "
                      f"--use_deepspeed` or a DeepSpeed accelerate config): {why}unipeft does not gather "
                      f"DeepSpeed's partitioned adapter and optimizer state. To shard a frozen base over processes "
                      f"use FSDP: {LAUNCH}")


def _check_fsdp_env(env: Mapping[str, str]) -> None:
    """Refuse accelerate FSDP options this implementation does not honour."""
    version = env.get("FSDP_VERSION", "1").strip()
    if version != "2":
        raise ConfigError(f"FSDP_VERSION={version} (accelerate's default for --use_fsdp is 1): unipeft shards with "
                          f"FSDP2 (torch's fully_shard) only; pass --fsdp_version 2 to accelerate launch "
                          f"(fsdp_version: 2 in an accelerate config)")
    if _flag(env, "FSDP_OFFLOAD_PARAMS"):
        raise ConfigError("FSDP_OFFLOAD_PARAMS=true (--fsdp_offload_params): not supported; the processes run on "
                          "the CPU, where the parameters already are; launch with --fsdp_offload_params false")
    if _flag(env, "FSDP_ACTIVATION_CHECKPOINTING"):
        raise ConfigError("FSDP_ACTIVATION_CHECKPOINTING=true (--fsdp_activation_checkpointing): not supported; "
                          "set `gradient_checkpointing: true` in the run config instead")
    policy = env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").strip().upper()
    if policy not in WRAP_POLICIES:
        raise ConfigError(f"FSDP_AUTO_WRAP_POLICY={policy} (--fsdp_auto_wrap_policy): supported are "
                          f"{', '.join(WRAP_POLICIES)} (one unit per transformer block, or one for the model)")


def resolve_strategy(strategy: str, env: Mapping[str, str] = os.environ) -> str:
    """'fsdp' or 'ddp' from `distributed.strategy` and the launch (accelerate's FSDP environment under 'auto')."""
    check_deepspeed(env)
    launch_fsdp = _flag(env, "ACCELERATE_USE_FSDP")
    if strategy == "ddp" and launch_fsdp:
        raise ConfigError("distributed.strategy is 'ddp' but the launch asks for FSDP (ACCELERATE_USE_FSDP=true, "
                          "from `accelerate launch --use_fsdp` or an FSDP accelerate config); set "
                          "distributed.strategy to 'fsdp' or 'auto', or launch without FSDP")
    if strategy == "fsdp" or launch_fsdp:
        if launch_fsdp:
            _check_fsdp_env(env)
        return "fsdp"
    return "ddp"


def require_processes(accelerator: Any) -> None:
    """FSDP needs a launch of at least 2 processes (one process has nothing to share the model with)."""
    import torch.distributed as dist

    if accelerator.num_processes < 2 or not dist.is_initialized():
        raise ConfigError(f"FSDP (distributed.strategy: fsdp, or an FSDP launch) shards the model over the "
                          f"processes of a launch, and this run has {accelerator.num_processes} process; launch 2 "
                          f"or more ({LAUNCH}), or train without FSDP (distributed.strategy: auto, no --use_fsdp)")


@contextlib.contextmanager
def every_process_loads(env: Any = os.environ) -> Iterator[None]:
    """Inside: transformers loads the real weights on every process (not on rank 0 only).

    accelerate's FSDP launches default to FSDP_CPU_RAM_EFFICIENT_LOADING=true, under which
    transformers leaves the weights of ranks > 0 unloaded for accelerate to broadcast later;
    this module shards weights that every process has read, so the option is off while loading.
    """
    saved = env.get("FSDP_CPU_RAM_EFFICIENT_LOADING")
    env["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    try:
        yield
    finally:
        if saved is None:
            env.pop("FSDP_CPU_RAM_EFFICIENT_LOADING", None)
        else:
            env["FSDP_CPU_RAM_EFFICIENT_LOADING"] = saved


def check_method(model: nn.Module, method: str) -> None:
    """Refuse methods FSDP cannot run: training callbacks written against whole parameters and gradients."""
    from .callbacks import method_callbacks

    callbacks = method_callbacks(model)
    if callbacks:
        names = ", ".join(sorted({type(cb).__name__ for cb in callbacks}))
        raise ConfigError(f"method '{method}' with FSDP: its training callbacks ({names}) read and edit whole "
                          f"parameters and gradients, but under FSDP each process holds only a shard of them; "
                          f"train it with DDP (distributed.strategy: auto or ddp, launched without --use_fsdp)")


# ---- sharding ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FsdpOptions:
    """What accelerate's FSDP launch options ask for (the defaults when launched without them)."""

    reshard_after_forward: bool = True  # False: blocks stay gathered from forward until backward
    wrap_classes: tuple[str, ...] | None = None  # None: the model's _no_split_modules
    per_block: bool = True  # False (NO_WRAP): one FSDP unit for the whole model

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> FsdpOptions:
        """Read FSDP_RESHARD_AFTER_FORWARD, FSDP_TRANSFORMER_CLS_TO_WRAP, FSDP_AUTO_WRAP_POLICY."""
        classes = [c.strip() for c in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip()]
        return cls(reshard_after_forward=_flag(env, "FSDP_RESHARD_AFTER_FORWARD", "true"),
                   wrap_classes=tuple(classes) or None,
                   per_block=env.get("FSDP_AUTO_WRAP_POLICY", "").strip().upper() != "NO_WRAP")


def _transformers_models(model: nn.Module) -> list[Any]:
    """The transformers models inside `model` (the base of an AdaptedModel, or the model itself)."""
    from transformers import PreTrainedModel
    return [m for m in model.modules() if isinstance(m, PreTrainedModel)]


def block_classes(model: nn.Module) -> set[str]:
    """Class names of the model's per-layer modules: transformers' `_no_split_modules` (empty for other models)."""
    return {name for m in _transformers_models(model) for name in (m._no_split_modules or [])}


def _holds_input_embeddings(module: nn.Module, embeddings: list[nn.Module]) -> bool:
    """Whether `module` contains one of the input embedding modules."""
    return any(sub is emb for sub in module.modules() for emb in embeddings)


def _wrap_targets(model: nn.Module, options: FsdpOptions) -> list[nn.Module]:
    """The modules that become their own FSDP unit, innermost first.

    A block holding the input embeddings stays in the root unit: prompt, prefix and DePT
    deltas read the embedding weights outside the embedding module's own forward, which a
    separate unit would have sharded again by then. The root is gathered for the whole forward.
    """
    if not options.per_block:
        return []
    wanted = set(options.wrap_classes or block_classes(model))
    present = {type(m).__name__ for m in model.modules()}
    if options.wrap_classes and not wanted <= present:
        raise ConfigError(f"FSDP_TRANSFORMER_CLS_TO_WRAP (--fsdp_transformer_layer_cls_to_wrap) names "
                          f"{sorted(wanted - present)}, not module classes of this model; its blocks are "
                          f"{sorted(block_classes(model)) or 'not declared'}")
    embeddings = []
    for m in _transformers_models(model):
        with contextlib.suppress(NotImplementedError):  # a model without input embeddings
            embeddings.append(m.get_input_embeddings())
    return [m for m in reversed(list(model.modules())) if type(m).__name__ in wanted and m is not model
            and not _holds_input_embeddings(m, embeddings)]


def _mark_gathered_changed(module: nn.Module, *_: Any) -> None:
    """Forward pre-hook after FSDP's gather: bump the version of the unit's gathered trainable parameters.

    FSDP refills the same gathered Parameter objects in place at every forward without a
    version bump, so a delta caching values keyed on a parameter's id and `_version` (DoRA's
    weight norm) would keep the values of the first step. Frozen weights gather to the same
    values every time and are left alone.
    """
    from torch.autograd.graph import increment_version
    from torch.distributed.tensor import DTensor

    gathered = [p for p in module.parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if gathered:
        increment_version(gathered)


def shard_model(model: nn.Module, accelerator: Any, options: FsdpOptions) -> list[str]:
    """Apply fully_shard in place (blocks, then the root); return the class names of the units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.to(accelerator.device)
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    units = _wrap_targets(model, options)
    names = [type(m).__name__ for m in units] + ["root"]  # before fully_shard renames the classes (FSDP...)
    for module in [*units, model]:
        fully_shard(module, mesh=mesh, reshard_after_forward=options.reshard_after_forward)
        module.register_forward_pre_hook(_mark_gathered_changed)  # runs after FSDP's own (prepended) gather
    return names


def is_fsdp(model: nn.Module) -> bool:
    """Whether `model` was sharded by shard_model."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def reshard(model: nn.Module) -> None:
    """Free every gathered unit, so the registered parameters are the sharded ones again."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def local_sizes(model: nn.Module) -> dict[str, int]:
    """Elements and bytes of the frozen and the trainable parameters this process holds (its shards under FSDP)."""
    from torch.distributed.tensor import DTensor

    if is_fsdp(model):
        reshard(model)
    out = dict.fromkeys(("frozen", "frozen_bytes", "trainable", "trainable_bytes"), 0)
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        kind = "trainable" if p.requires_grad else "frozen"
        out[kind] += local.numel()
        out[kind + "_bytes"] += local.numel() * local.element_size()
    return out


# ---- whole tensors in, whole tensors out ---------------------------------------------------------
def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every process must call it), else `t` itself."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` cut the way `like` (a DTensor) is; every process holds `full`, so nothing is sent."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(dtype=like.dtype, device=like.device)
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


@contextlib.contextmanager
def whole_trainable(model: nn.Module) -> Iterator[nn.Module]:
    """Inside: every trainable parameter of a sharded model is a whole plain tensor (a collective on entry).

    For saving: the adapter's own save code then sees what a single process would. The sharded
    parameters (which the optimizer holds) are put back on exit; nothing may train inside.
    """
    from torch.distributed.tensor import DTensor

    if not is_fsdp(model):
        yield model
        return
    reshard(model)
    whole: dict[int, nn.Parameter] = {}
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    for module in model.modules():  # the same order on every process: the gathers pair up
        for name, p in list(module._parameters.items()):
            if isinstance(p, DTensor) and p.requires_grad:
                if id(p) not in whole:
                    whole[id(p)] = nn.Parameter(p.detach().full_tensor(), requires_grad=True)
                swapped.append((module, name, p))
                module._parameters[name] = whole[id(p)]
    try:
        yield model
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def check_saveable(model: nn.Module, method: str) -> None:
    """Refuse a method whose saved adapter state still holds shards once its trainable weights are gathered."""
    from torch.distributed.tensor import DTensor

    from ..core.model import AdaptedModel

    if not isinstance(model, AdaptedModel):
        return  # 'full': its saved state is the trainable parameters themselves
    with whole_trainable(model):
        for name in model.peft_config:
            sharded = [k for k, v in model.adapter_state_dict(name).items() if isinstance(v, DTensor)]
            if sharded:
                raise ConfigError(f"method '{method}' with FSDP: its saved state reads frozen (sharded) base "
                                  f"weights ({', '.join(sharded[:3])}), which only a whole-model gather could "
                                  f"save; train it with DDP (distributed.strategy: auto or ddp)")


def full_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer.state_dict() with every sharded tensor gathered (a collective) and moved to the CPU."""
    per_param = {i: {k: full_tensor(v).cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                 for i, s in state["state"].items()}
    return {**state, "state": per_param}


def shard_optimizer_state(state: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """A whole-tensor optimizer state cut like the optimizer's (sharded) parameters, ready for load_state_dict."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        out[i] = {k: shard_like(v, p) if torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape) and k != "step"
                  else v for k, v in s.items()}
    return {**state, "state": out}


# ---- the training step -----------------------------------------------------------------------------
@contextlib.contextmanager
def no_grad_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate this micro-batch's gradients unreduced; the next synced backward reduce-scatters them all."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip by the 2-norm over every shard on every process; return that norm (the same on all processes)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)
