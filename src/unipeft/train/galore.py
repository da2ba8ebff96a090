"""GaLore: Adam on low-rank projections of each weight matrix's gradient (optimizer names galore_adamw,
galore_adamw8bit), with an optional GradNormLoRP weight normalisation and per-layer stepping.

GaLore (Zhao et al., 2024, arXiv 2403.03507): for a target matrix W (m x n) with gradient G, a
projector P (the top-r singular vectors of G, from galore_torch's GaLoreProjector) is recomputed
every `update_proj_gap` steps; Adam runs on R = P^T G (or G P^T), so its moments are (r, n) or
(m, r), and the update scale * P N(R) is projected back. A matrix whose smaller side is below
`rank` uses its smaller side as rank (the projection is then a rotation, not a cut). 'std' projects
the smaller side (right for a tall matrix, left for a wide one), 'reverse_std' the larger side.

Targets: parameters whose name `optimizer.galore.targets` matches (re.search; among trainable 2-D
parameters), by default the trainable weight of every nn.Linear / GPT-2 Conv1D layer (embeddings,
also when tied to an output layer, stay full-rank). Every other trainable parameter is stepped by
the same Adam at full rank; each user group keeps its lr / weight decay (split into a GaLore part
and a full-rank part). Weight decay is decoupled (W <- W - lr * wd * W), after the update.

`normalize: true` is GradNormLoRP (Huang et al., AAAI 2025, arXiv 2412.19616): each output unit's
weight vector is reparameterised as w = g v / ||v|| (Salimans & Kingma's weight normalisation;
W = M V / ||V||_c for a matrix), the magnitude g is trained by Adam at full size, and the
direction's gradient is projected as in GaLore: D~_t = U_t eta_t(U_t^T D_t V_t) V_t^T, with
  grad_g = grad_W . v / ||v||,    grad_v = (g / ||v||) (I - w w^T / ||w||^2) grad_W.
v is not stored: W and the per-unit vectors g and ||v|| determine it (v = W ||v|| / g), so the
normalisation costs two vectors per matrix. Output units are rows of an nn.Linear weight and
columns of a Conv1D weight; the normalisation needs every unit's norm to be non-zero.

`per_layer: true`: each target weight is stepped in its post-accumulate-grad hook and its
gradient freed there, so at most one target's full gradient is alive; `step()` then steps only
the other parameters. The hooked updates read lr from `param_groups` (what the scheduler
changes); state_dict() covers every parameter. Such optimizers have `steps_in_backward = True`:
gradients cannot be clipped over the whole model or accumulated over micro-batches, and
multi-process runs would step before gradients are averaged.

The state is tensors and ints only (the projector object is rebuilt from its matrix on load). The
8-bit variant (galore_adamw8bit) is train/lowbit.py's GaLoreAdamW8bit.
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.layers import is_matrix_layer, is_quantized, is_transposed

def check_galore(gcfg: Any) -> None:
    """ConfigError for a GaLore setting out of range."""
    for key in ("rank", "update_proj_gap"):
        value = getattr(gcfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"optimizer.galore.{key}: expected a positive integer, got {value!r}")
    if not gcfg.scale > 0:
        raise ConfigError(f"optimizer.galore.scale: expected a positive number, got {gcfg.scale!r}")


def check_layerwise(run_cfg: Any, processes: int, fsdp: bool) -> None:
    """ConfigError when a run cannot use per-layer GaLore: it steps each weight inside the backward pass, so
    gradients cannot be clipped together, accumulated over micro-batches or averaged across processes first."""
    if run_cfg.max_grad_norm is not None:
        raise ConfigError("optimizer.galore.per_layer steps each weight during the backward pass, so gradients "
                          "cannot be clipped together: set max_grad_norm: null (or per_layer: false)")
    if run_cfg.grad_accum > 1:
        raise ConfigError(f"optimizer.galore.per_layer steps each weight in its gradient hook, so gradients cannot "
                          f"be accumulated: set grad_accum: 1 (got {run_cfg.grad_accum}) or per_layer: false")
    if processes > 1 or fsdp:
        raise ConfigError(f"optimizer.galore.per_layer would step weights before the gradients of {processes} "
                          f"processes are averaged: run one process or set per_layer: false")


def galore_targets(model: nn.Module, gcfg: Any) -> dict[nn.Parameter, tuple[str, int]]:
    """{target matrix: (name, dim holding each output unit's weights)}; ConfigError when none is found."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    matrices = [(n, p) for n, p in named if p.dim() == 2 and p.is_floating_point()]
    if not matrices:
        raise ConfigError("optimizer.name: GaLore projects matrix (2-D) parameters, and the model has no trainable "
                          f"one (trainable: {', '.join(n for n, _ in named[:4]) or 'none'}); use optimizer.name: adamw")
    sample = ", ".join(n for n, _ in matrices[:5])
    layers = [m for m in model.modules() if is_matrix_layer(m) and not is_quantized(m)]
    transposed = {id(m.weight) for m in layers if is_transposed(m)}
    if gcfg.targets is None:
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        layer_weights = {id(m.weight) for m in layers} - embeddings
        chosen = [(n, p) for n, p in matrices if id(p) in layer_weights]
        if not chosen:
            raise ConfigError("optimizer.galore.targets: unset, and the model has no trainable nn.Linear / Conv1D "
                              f"weight; set a regex of matrix names (trainable matrices: {sample})")
    else:
        try:
            rx = re.compile(gcfg.targets)
        except re.error as exc:
            raise ConfigError(f"optimizer.galore.targets: bad regex {gcfg.targets!r} ({exc})") from None
        chosen = [(n, p) for n, p in matrices if rx.search(n)]
        if not chosen:
            raise ConfigError(f"optimizer.galore.targets={gcfg.targets!r} matches no trainable matrix (2-D) "
                              f"parameter; their names look like: {sample}")
    return {p: (n, 0 if id(p) in transposed else 1) for n, p in chosen}


def split_groups(groups: list[dict[str, Any]], targets: dict[nn.Parameter, tuple[str, int]],
                 gcfg: Any) -> list[dict[str, Any]]:
    """Each user group cut into its full-rank part and its GaLore part(s) (one per output-unit layout)."""
    out: list[dict[str, Any]] = []
    for group in groups:
        rest = [p for p in group["params"] if p not in targets]
        if rest:
            out.append({**group, "params": rest})
        for dim in (1, 0):
            mats = [p for p in group["params"] if p in targets and targets[p][1] == dim]
            if mats:
                out.append({**group, "params": mats, "name": f"{group.get('name', 'default')}:galore{'' if dim else '-transposed'}",
                            "rank": gcfg.rank, "update_proj_gap": gcfg.update_proj_gap, "scale": float(gcfg.scale),
                            "proj_type": gcfg.proj_type, "normalize": bool(gcfg.normalize), "norm_dim": dim})
    return out


def _compact(ortho: Any) -> Any:
    """The projector's matrix without the rest of the SVD it is a view of (which would stay alive)."""
    if isinstance(ortho, list):
        return [_compact(t) for t in ortho]
    if ortho is None or ortho.untyped_storage().nbytes() == ortho.numel() * ortho.element_size():
        return ortho
    return ortho.contiguous().clone()


class GaLoreMixin:
    """The GaLore step, shared by the fp32 and 8-bit optimizers; they supply `_adam` and `_plain`."""

    steps_in_backward = False  # True: target weights are stepped in their gradient hooks (per_layer)

    def _setup(self) -> None:
        self._projectors: dict[torch.Tensor, Any] = {}
        self._where = {p: (gi, pi) for gi, g in enumerate(self.param_groups) for pi, p in enumerate(g["params"])}
        self._hooks = []
        if self.steps_in_backward:
            for group in self.param_groups:
                if group.get("rank"):
                    self._hooks += [p.register_post_accumulate_grad_hook(self._hook) for p in group["params"]]

    def remove_hooks(self) -> None:
        """Detach the per-layer gradient hooks (the model then no longer steps in backward)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _adam(self, group: dict[str, Any], where: tuple[int, int], sub: dict[str, Any],
              grad: torch.Tensor) -> tuple[torch.Tensor, float]:
        raise NotImplementedError

    def _plain(self, group: dict[str, Any], where: tuple[int, int], p: torch.Tensor) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One step of every parameter with a gradient (per_layer: of the parameters no hook steps)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if self.steps_in_backward and group.get("rank"):
                continue
            for p in group["params"]:
                if p.grad is not None:
                    self._update(group, p)
        return loss

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        self._update(self.param_groups[self._where[p][0]], p)
        p.grad = None  # the point of per-layer stepping: this full gradient dies now

    def load_state_dict(self, state_dict: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        """Load a state_dict(); projectors are rebuilt from their saved matrices."""
        super().load_state_dict(state_dict, *args, **kwargs)
        self._projectors = {}

    def _projector(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> Any:
        proj = self._projectors.get(p)
        if proj is None:
            from galore_torch.galore_projector import GaLoreProjector

            kind = group["proj_type"]
            if kind in ("std", "reverse_std"):  # fixed per matrix: its shape never changes
                # (galore_torch picks the side again when projecting back, from the projected shape,
                # which is ambiguous once the rank reaches the smaller side)
                kind = "right" if (p.shape[0] >= p.shape[1]) == (kind == "std") else "left"
            proj = GaLoreProjector(min(group["rank"], *p.shape), update_proj_gap=group["update_proj_gap"],
                                   scale=group["scale"], proj_type=kind)
            proj.ortho_matrix = state.get("ortho")
            self._projectors[p] = proj
        return proj

    def _update(self, group: dict[str, Any], p: torch.Tensor) -> None:
        where = self._where[p]
        if not group.get("rank"):
            self._plain(group, where, p)
            return
        state = self.state[p]
        step = state.get("step", 0)
        proj = self._projector(p, group, state)
        grad, lr, wd = p.grad, group["lr"], group["weight_decay"]
        if group["normalize"]:
            dim = group["norm_dim"]
            if "magnitude" not in state:
                norm = p.norm(dim=dim, keepdim=True)
                state["magnitude"], state["vnorm"] = norm.clone(), norm.clone()
            g, vn = state["magnitude"], state["vnorm"]
            unit = p / g  # v / ||v||
            grad_g = (grad * unit).sum(dim=dim, keepdim=True)
            grad = (g / vn) * (grad - unit * grad_g)  # gradient of the direction v
        low = proj.project(grad, step)  # recomputes P when step % update_proj_gap == 0
        proj.ortho_matrix = state["ortho"] = _compact(proj.ortho_matrix)
        state["step"] = step + 1
        u, size = self._adam(group, where, state.setdefault("moments", {}), low)
        change = proj.project_back(u)  # times `scale`
        if not group["normalize"]:
            p.add_(change, alpha=-size)
            if wd > 0:
                p.add_(p, alpha=-lr * wd)
            return
        ug, size_g = self._adam(group, where, state.setdefault("magnitude_moments", {}), grad_g)
        v = unit * vn
        v.add_(change, alpha=-size)
        g.add_(ug, alpha=-size_g)
        if wd > 0:
            g.mul_(1.0 - lr * wd)  # decays W = g v / ||v||
        vn.copy_(v.norm(dim=group["norm_dim"], keepdim=True))
        p.copy_(v * (g / vn))


class GaLoreAdamW(GaLoreMixin, torch.optim.Optimizer):
    """GaLore AdamW with fp32 moments (the update of galore_torch's GaLoreAdamW; see the module doc)."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self._setup()

    def _adam(self, group: dict[str, Any], where: tuple[int, int], sub: dict[str, Any],
              grad: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(Adam direction m / (sqrt(v) + eps), step size with bias correction), moments updated in `sub`."""
        if "exp_avg" not in sub:
            sub["step"] = 0
            sub["exp_avg"], sub["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
        beta1, beta2 = group["betas"]
        sub["step"] += 1
        sub["exp_avg"].mul_(beta1).add_(grad, alpha=1.0 - beta1)
        sub["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = sub["exp_avg_sq"].sqrt().add_(group["eps"])
        t = sub["step"]
        return sub["exp_avg"] / denom, group["lr"] * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)

    def _plain(self, group: dict[str, Any], where: tuple[int, int], p: torch.Tensor) -> None:
        u, size = self._adam(group, where, self.state[p], p.grad)
        p.add_(u, alpha=-size)
        if group["weight_decay"] > 0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])


class LayerwiseGaLoreAdamW(GaLoreAdamW):
    """GaLoreAdamW whose target weights step in their gradient hooks (per_layer: true)."""

    steps_in_backward = True


def build_galore(model: nn.Module, groups: list[dict[str, Any]], cfg: Any) -> torch.optim.Optimizer:
    """The GaLore optimizer of `cfg` (galore_adamw / galore_adamw8bit) over `groups`; ConfigError before any step."""
    gcfg = cfg.galore
    check_galore(gcfg)
    targets = galore_targets(model, gcfg)
    in_groups = {p for g in groups for p in g["params"]}
    targets = {p: v for p, v in targets.items() if p in in_groups}
    if gcfg.normalize:
        for p, (name, dim) in targets.items():
            if bool((p.detach().norm(dim=dim) == 0).any()):
                raise ConfigError(f"optimizer.galore.normalize: {name} has output units of zero norm (e.g. a "
                                  f"zero-initialised matrix), which weight normalisation cannot represent; exclude it "
                                  f"with optimizer.galore.targets or set normalize: false")
    if gcfg.per_layer and torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise ConfigError("optimizer.galore.per_layer: steps weights before gradients are averaged over "
                          "processes; use it in a single process or set per_layer: false")
    split = split_groups(groups, targets, gcfg)
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if cfg.name == "galore_adamw":
        return (LayerwiseGaLoreAdamW if gcfg.per_layer else GaLoreAdamW)(split, **kwargs)
    if cfg.name == "galore_adamw8bit":
        from .lowbit import GaLoreAdamW8bit, LayerwiseGaLoreAdamW8bit

        return (LayerwiseGaLoreAdamW8bit if gcfg.per_layer else GaLoreAdamW8bit)(split, **kwargs)
    raise ConfigError(f"optimizer.name: {cfg.name!r} is not a GaLore optimizer (galore_adamw, galore_adamw8bit)")
