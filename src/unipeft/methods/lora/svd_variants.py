"""Variants of the SVD family whose trained parametrisation is not plain (A, B):

  out = base_out + s * c * B (d * A dropout(x))      d: `lora_diag` (r), c: a trained scalar (LoLDU) or 1

  svfit  A = V_r^T, B = U_r frozen (buffers); only the singular values d train          (SVFit)
  sorsa  A = V_r^T, B = U_r and d all train; gradient of gamma (||B^T B - I||_F^2 + ||A A^T - I||_F^2)
         added before each optimizer step (SORSA; gamma = LoraConfig.sorsa_gamma)
  loldu  A = U_r (unit upper), B = P L_r frozen; d = D_r and the scalar `loldu_scale` train (LoLDU)
  kasa   PEFT's KaSA: the base loses its r smallest singular triplets (a base edit, undone on unload),
         A, B train from the config's init (B = 0), d = randn(r) trains; gradient of
         beta ||d||^2 + gamma (||B^T B - I||_F + ||A A^T - I||_F) added before each step (kasa_config)

The inits (svd_inits.py) hand the diagonal over inside A (A = diag(d) A_unit); `setup` splits it out.
"""
from __future__ import annotations

import torch
from torch import nn

from ...core import layers
from ...core.errors import ConfigError, TargetError
from ...core.hooks import TrainerCallback
from .variants import Variant, register_variant

SORSA_GAMMA = 4e-4  # default sorsa_gamma
KASA_DEFAULTS = {"beta": 1e-4, "gamma": 1e-3}  # PEFT's KasaConfig defaults


def _freeze(linear: nn.Linear) -> None:
    """Turn the Linear's weight into a buffer: saved and loaded with the adapter, never trained."""
    w = linear.weight.detach().clone()
    del linear.weight
    linear.register_buffer("weight", w)


class DiagVariant(Variant):
    """s * c * B diag(d) A: the shared forward / merge of the SVD-family variants."""

    name = "svd_diag"
    groupable = False
    fusable = False
    frozen_factors = False  # A and B become buffers
    scalar = False  # a trained scalar `loldu_scale` multiplies the update

    def split(self, a: torch.Tensor) -> torch.Tensor:
        """The diagonal carried in A by the init (row norms: A = diag(d) V^T)."""
        return a.norm(dim=1)

    def setup(self, delta) -> None:
        with torch.no_grad():
            a = delta.lora_A.weight
            d = self.split(a)
            a.div_(torch.where(d == 0, torch.ones_like(d), d)[:, None])
        delta.lora_diag = nn.Parameter(d.clone())
        if self.scalar:
            delta.loldu_scale = nn.Parameter(torch.ones((), dtype=a.dtype))
        if self.frozen_factors:
            _freeze(delta.lora_A)
            _freeze(delta.lora_B)

    @staticmethod
    def coefficient(delta):
        """s (times the trained scalar, if any)."""
        return delta.scaling * delta.loldu_scale if "loldu_scale" in delta._parameters else delta.scaling

    def forward(self, delta, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = delta.lora_A.weight, delta.lora_B.weight
        h = delta.lora_dropout(x if x.dtype == a.dtype else x.to(a.dtype))
        up = torch.nn.functional.linear(torch.nn.functional.linear(h, a) * delta.lora_diag, b)
        return base_out + (up * self.coefficient(delta)).to(base_out.dtype)

    def delta_weight(self, delta) -> torch.Tensor:
        return (delta.lora_B.weight * delta.lora_diag) @ delta.lora_A.weight * self.coefficient(delta)

    def regulariser(self, delta, config) -> torch.Tensor | None:
        """The training-time penalty whose gradient the callback adds (None: no penalty)."""
        return None


class SVFit(DiagVariant):
    name = "svfit"
    frozen_factors = True


def orthonormality(a: torch.Tensor, b: torch.Tensor, squared: bool = True) -> torch.Tensor:
    """||B^T B - I||_F^(2) + ||A A^T - I||_F^(2) in float32."""
    a, b = a.float(), b.float()
    eye = torch.eye(a.shape[0], device=a.device)
    ga, gb = torch.linalg.norm(a @ a.t() - eye), torch.linalg.norm(b.t() @ b - eye)
    return ga ** 2 + gb ** 2 if squared else ga + gb


class SORSA(DiagVariant):
    name = "sorsa"

    def regulariser(self, delta, config) -> torch.Tensor:
        gamma = SORSA_GAMMA if config.sorsa_gamma is None else config.sorsa_gamma
        return gamma * orthonormality(delta.lora_A.weight, delta.lora_B.weight)


class LoLDU(DiagVariant):
    name = "loldu"
    frozen_factors = True
    scalar = True

    def split(self, a: torch.Tensor) -> torch.Tensor:
        return a.diagonal().clone()  # A = D_r U_r / s with U_r unit upper triangular


class KaSA(DiagVariant):
    name = "kasa"
    identity_at_init = False  # the base loses its r smallest singular triplets at injection (as PEFT's KaSA)

    def split(self, a: torch.Tensor) -> torch.Tensor:
        return torch.ones(a.shape[0], dtype=a.dtype, device=a.device)  # A stays as the init made it

    def setup(self, delta) -> None:
        geo = layers.geometry(delta.base)
        if geo.kind != "linear":
            raise TargetError(f"LoraConfig.kasa_config: KaSA supports nn.Linear layers only, '{delta.path}' is "
                              f"a {type(delta.base).__name__}")
        w = layers.dense_weight(delta.base).detach().to(torch.float32)
        k = min(w.shape)
        if delta.r >= k:
            raise ConfigError(f"LoraConfig.r (or its rank_pattern entry): KaSA drops r singular triplets of "
                              f"'{delta.path}' ({w.shape[0]} x {w.shape[1]}) and needs r < {k}, got {delta.r}")
        delta.lora_diag = nn.Parameter(torch.randn(delta.r, dtype=delta.lora_A.weight.dtype))  # as PEFT (B = 0)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        kept = (u[:, :k - delta.r] * s[:k - delta.r]) @ vh[:k - delta.r]
        delta._base_edit = {"weight": layers.to_param_layout(delta.base, kept.to(delta.base.weight.dtype))}

    def regulariser(self, delta, config) -> torch.Tensor:
        cfg = config.kasa_config
        return (cfg["beta"] * delta.lora_diag.float().pow(2).sum()
                + cfg["gamma"] * orthonormality(delta.lora_A.weight, delta.lora_B.weight, squared=False))


for _v in (SVFit(), SORSA(), LoLDU(), KaSA()):
    register_variant(_v)


class RegulariserGradient(TrainerCallback):
    """Adds the gradient of each delta's variant penalty to the parameters' gradients, after the
    task gradients are complete (and clipped), before the optimizer steps."""

    def __init__(self, model, adapter_name: str) -> None:
        self.model, self.adapter_name = model, adapter_name

    def on_before_optimizer_step(self, ctx) -> None:
        config = self.model.peft_config[self.adapter_name]
        for delta in self.model.deltas(self.adapter_name):
            variant = delta.__dict__.get("variant")
            if not isinstance(variant, DiagVariant):
                continue
            params = [p for p in delta.parameters() if p.requires_grad]
            if not params:
                continue
            with torch.enable_grad():
                penalty = variant.regulariser(delta, config)
                if penalty is None:
                    continue
                grads = torch.autograd.grad(penalty, params, allow_unused=True)
            for p, g in zip(params, grads):
                if g is not None:
                    p.grad = g.to(p.dtype) if p.grad is None else p.grad + g.to(p.dtype)


def regulariser_callbacks(config, model, adapter_name: str) -> list[TrainerCallback]:
    """One RegulariserGradient for SORSA / KaSA adapters, none otherwise."""
    return [RegulariserGradient(model, adapter_name)] if config.variant in ("sorsa", "kasa") else []


def check_svd_fields(config) -> None:
    """LoraConfig's kasa_config / sorsa_gamma and the SVD variants' combinations (ConfigError otherwise)."""
    own = config.variant if config.kasa_config is None else "kasa"
    if config.kasa_config is not None:
        cfg = config.kasa_config
        if not isinstance(cfg, dict) or set(cfg) - set(KASA_DEFAULTS):
            raise ConfigError(f"LoraConfig.kasa_config: expected a dict with keys beta, gamma; got {cfg!r}")
        for k, v in cfg.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"LoraConfig.kasa_config[{k!r}]: expected a number >= 0, got {v!r}")
        if set(cfg) != set(KASA_DEFAULTS):  # written out as PEFT stores its KasaConfig
            config.kasa_config = {**KASA_DEFAULTS, **cfg}
        if config.init not in ("kaiming", "gaussian"):
            raise ConfigError(f"LoraConfig.kasa_config: KaSA edits the base itself; it needs init 'kaiming' "
                              f"(init_lora_weights=True) or 'gaussian', got init={config.init!r}")
    if own in ("svfit", "sorsa", "loldu", "kasa") and config.use_dora:
        raise ConfigError(f"LoraConfig.use_dora: DoRA cannot be combined with the {own!r} variant")
    g = config.sorsa_gamma
    if g is not None:
        if not isinstance(g, (int, float)) or isinstance(g, bool) or g < 0:
            raise ConfigError(f"LoraConfig.sorsa_gamma: expected a number >= 0, got {g!r}")
        if own != "sorsa":
            raise ConfigError(f"LoraConfig.sorsa_gamma={g!r} is only used with init='sorsa', got init={config.init!r}")


BASE_EDITING = ("pissa", "olora", "milora", "nlora", "svfit", "sorsa", "loldu")


def check_targets(config, targets) -> None:
    """SVD-family inits and KaSA decompose matrix weights: refuse Embedding / Conv targets up front."""
    name = "kasa_config" if config.kasa_config is not None else None
    if name is None and (config.init in BASE_EDITING or config.init.startswith("pissa_niter_")):
        name = f"init={config.init!r}"
    if name is None:
        return
    for path, module in targets:
        geo = layers.geometry(module)
        if geo is None or not geo.is_matrix:
            raise TargetError(f"LoraConfig.{name}: '{path}' is a {type(module).__name__}; this init works on "
                              f"matrix layers (Linear, Conv1D) only: narrow target_modules")
