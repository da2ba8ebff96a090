"""LoraConfig: LoRA's fields (PEFT's names on disk), its rank/alpha patterns, variant, scaling and init."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ...core import layers
from ...core.config import AdapterConfig
from ...core.errors import ConfigError
from ...core.fields import Rule, fraction, ruled
from ...core.targets import pattern_key
from .inits import INITS, PREFIX_INITS, get_init


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA: out = base(x) + scaling * B(A(dropout(x))), scaling = alpha/r (alpha/sqrt(r) with rsLoRA)."""

    peft_class = "LoraConfig"
    peft_type = "LORA"
    peft_names = {"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights"}
    peft_inert = {"megatron_config": None, "megatron_core": "megatron.core", "trainable_token_indices": None,
                  "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False,
                  "qalora_group_size": 16, "monteclora_config": None, "layer_replication": None,
                  "lora_bias": False, "use_bdlora": None, "arrow_config": None,
                  "ensure_weight_tying": False}
    not_in_peft = ("sorsa_gamma",)

    r: int = 8
    alpha: float = 8
    dropout: float = fraction(0.0, "0 <= dropout < 1")
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "kaiming"
    fan_in_fan_out: bool = False
    bias: str = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    # PEFT's LoftQConfig as a dict: {"loftq_bits": 4 | 8, "loftq_iter": >= 1}; used with init="loftq".
    loftq_config: dict[str, int] = field(default_factory=dict)
    # PEFT's KasaConfig as a dict {"beta": >= 0, "gamma": >= 0}: KaSA (svd_inits.py / kasa.py) when set.
    kasa_config: dict[str, float] | None = None
    # SORSA's orthonormality regulariser coefficient (init="sorsa"; None: svd_variants.SORSA_GAMMA).
    sorsa_gamma: float | None = None
    # PEFT's EvaConfig / CordaConfig / LoraGAConfig as dicts (PEFT's keys), for init="eva" / "corda" /
    # "lora_ga" (data_inits.py); filled with PEFT's defaults when that init is chosen, None otherwise.
    eva_config: dict[str, Any] | None = None
    corda_config: dict[str, Any] | None = None
    lora_ga_config: dict[str, Any] | None = None
    # Bare parameters to adapt (PEFT's target_parameters), e.g. ["experts.gate_up_proj"] for the fused
    # expert weights of mixture-of-experts layers: suffix match on "<module path>.<parameter name>" (params.py).
    target_parameters: list[str] | None = ruled(None, Rule(
        lambda v: isinstance(v, list) and all(isinstance(n, str) and n for n in v),
        "a list of parameter names such as ['experts.gate_up_proj']", optional=True))

    def validate(self) -> None:
        super().validate()
        for key, r in {"r": self.r, **{f"rank_pattern[{k!r}]": v for k, v in self.rank_pattern.items()}}.items():
            if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
                raise ConfigError(f"LoraConfig.{key}: rank must be a positive integer, got {r!r}")
        get_init(self.init)
        self._check_loftq()
        from .data_inits import check_sub_configs
        check_sub_configs(self)
        from .svd_variants import check_svd_fields
        check_svd_fields(self)
        if self.bias != "none":
            raise ConfigError(f"LoraConfig.bias: only 'none' is supported (use BitFitConfig to train biases), "
                              f"got {self.bias!r}")

    def _check_loftq(self) -> None:
        cfg = self.loftq_config
        if self.init != "loftq":
            if cfg:
                raise ConfigError(f"LoraConfig: field 'loftq_config'={cfg!r} is not supported with "
                                  f"init={self.init!r}; set init='loftq' (init_lora_weights='loftq')")
            return
        if not isinstance(cfg, dict) or set(cfg) - {"loftq_bits", "loftq_iter"}:
            raise ConfigError(f"LoraConfig.loftq_config: expected a dict with keys loftq_bits, loftq_iter; got {cfg!r}")
        if cfg.get("loftq_bits", 4) not in (4, 8):
            raise ConfigError(f"LoraConfig.loftq_config['loftq_bits']: expected 4 or 8, got {cfg['loftq_bits']!r}")
        it = cfg.get("loftq_iter", 1)
        if not isinstance(it, int) or isinstance(it, bool) or it < 1:
            raise ConfigError(f"LoraConfig.loftq_config['loftq_iter']: expected an integer >= 1, got {it!r}")
        if set(cfg) != {"loftq_bits", "loftq_iter"}:  # PEFT's LoftQConfig defaults, written out as PEFT stores them
            self.loftq_config = {"loftq_bits": 4, "loftq_iter": 1, **cfg}

    @property
    def variant(self) -> str:
        """The registered variant (strategy) this config's deltas use."""
        own = "kasa" if self.kasa_config is not None else get_init(self.init).variant
        return own or ("dora" if self.use_dora else "lora")

    def training_callbacks(self, model, adapter_name: str) -> list:
        """SORSA's / KaSA's regulariser gradients (svd_variants.py); none for other inits."""
        from .svd_variants import regulariser_callbacks
        return regulariser_callbacks(self, model, adapter_name)

    def loads_without_calibration(self) -> bool:
        return get_init(self.init).data_only_in_factors

    def parameter_targets(self) -> list[str]:
        return list(self.target_parameters or [])

    def needs_calibration(self) -> str | None:
        """What the init needs from data ("activations" / "gradients"), or None."""
        return get_init(self.init).needs

    def calibrated_fields(self, stats, targets) -> dict[str, Any]:
        """What the data decides before the deltas exist (EVA: per-layer ranks, see data_inits.py)."""
        from .data_inits import calibrated_fields
        return calibrated_fields(self, stats, targets)

    def resolved_fields(self, model, targets) -> dict[str, Any]:
        """PEFT records GPT-2's transposed Conv1D weights as fan_in_fan_out=True."""
        from .svd_variants import check_targets
        check_targets(self, targets)
        return {"fan_in_fan_out": any(layers.is_transposed(m) for _, m in targets)}

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """The rank and alpha for the module at `path` (rank_pattern / alpha_pattern win)."""
        rk = pattern_key(self.rank_pattern, path)
        ak = pattern_key(self.alpha_pattern, path)
        return (self.rank_pattern[rk] if rk else self.r), (self.alpha_pattern[ak] if ak else self.alpha)

    def scaling(self, path: str) -> float:
        """alpha/r, or alpha/sqrt(r) with rsLoRA."""
        r, alpha = self.rank_and_alpha(path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        return {"r": 2, "alpha": 4}

    @classmethod
    def _value_to_peft(cls, name: str, value: Any) -> Any:
        return INITS[value].peft_value if name == "init" and value in INITS else value

    @classmethod
    def _value_from_peft(cls, name: str, value: Any) -> Any:
        if name != "init":
            return value
        for init in INITS.values():
            if init.peft_value is value or (not isinstance(value, bool) and init.peft_value == value):
                return init.name
        if isinstance(value, str) and value.startswith(tuple(PREFIX_INITS)):
            return get_init(value).name  # a prefix family ("pissa_niter_16"): the name is PEFT's value
        supported = ", ".join(str(i.peft_value).lower() if isinstance(i.peft_value, bool) else repr(i.peft_value)
                              for i in INITS.values())
        supported += "".join(f", '{p}<int>'" for p in PREFIX_INITS)
        raise ConfigError(f"LoraConfig: init_lora_weights={value!r} is not supported; supported: {supported}")

    # LoRA training strategies (plus.py, fa.py) subclass this config and save PEFT "LORA" folders with
    # one field of their own in the file: {that key: config class}, so the folder loads as the strategy.
    strategy_keys = {}

    @classmethod
    def _from_peft_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        strategy = next((c for k, c in LoraConfig.strategy_keys.items() if k in data), None)
        if cls is LoraConfig and strategy is not None:
            return strategy._from_peft_dict(data)
        return super()._from_peft_dict(data)
