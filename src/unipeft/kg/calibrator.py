"""CQD^A score calibrator (Arakelyan et al. 2023) on a frozen ComplEx link predictor.

out = base_out * (1 + alpha) + beta, where (alpha, beta) = W [e_h ; w_r] + b is a linear map of
the query's head-entity and relation embeddings (read from the frozen scorer, never trained).
One affine map per (head, relation) row re-scales the scores of every candidate tail, so that
sigmoid(out) is a calibrated truth degree that t-norms combine well and `1 - x` can negate.
W and b start at zero: a fresh calibrator is the identity (plain CQD).

Registered here, in kg/, because its base layer (ComplEx) is kg's: methods/ never imports kg/.
`import unipeft` imports this module, so the method is in the registry like every other.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.errors import TargetError
from ..core.registry import Capabilities, register
from .complex import ComplEx


@dataclass
class CQDCalibratorConfig(AdapterConfig):
    """CQD^A: a per-(entity, relation) affine re-scaling of a frozen link predictor's scores."""

    peft_type = "CQD_CALIBRATOR"


class CQDCalibratorDelta(Delta):
    """The 2 x (d_entity + d_relation) + 2 parameters of the adaptation function rho."""

    kind = "output"

    def __init__(self, base: nn.Module, config: CQDCalibratorConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        if not isinstance(base, ComplEx):
            raise TargetError(f"cqd_calibrator needs a ComplEx scorer at '{path}', got {type(base).__name__}")
        dim = base.entity.shape[1] + base.relation.shape[1]
        self.rho = nn.Linear(dim, 2)
        nn.init.zeros_(self.rho.weight)
        nn.init.zeros_(self.rho.bias)

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, beta), each (B, 1), for (head, relation) rows x."""
        feats = torch.cat([self.base.entity[x[:, 0]], self.base.relation[x[:, 1]]], 1).detach()
        ab = self.rho(feats.to(self.rho.weight.dtype))
        return ab[:, :1], ab[:, 1:]

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        alpha, beta = self.coefficients(x)
        return base_out * (1 + alpha) + beta


register("cqd_calibrator", CQDCalibratorConfig, CQDCalibratorDelta,
         Capabilities(mergeable=False, mixed_batch=True, layer_types=(ComplEx,)),
         default_targets=lambda path, module: isinstance(module, ComplEx))
