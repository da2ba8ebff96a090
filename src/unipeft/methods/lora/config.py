"""LoraConfig: LoRA's fields (PEFT's names on disk), its rank/alpha patterns, variant, scaling and init."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ...core import layers
from ...core.config import AdapterConfig
from ...core.errors import ConfigError
from ...core.fields import fraction
from ...core.targets import pattern_key
from .inits import INITS, get_init


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA: out = base(x) + scaling * B(A(dropout(x))), scaling = alpha/r (alpha/sqrt(r) with rsLoRA)."""

    peft_type = "LORA"
    peft_names = {"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights"}
    peft_inert = {"megatron_config": None, "megatron_core": "megatron.core", "trainable_token_indices": None,
                  "eva_config": None, "corda_config": None, "lora_ga_config": None,
                  "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False,
                  "qalora_group_size": 16, "monteclora_config": None, "layer_replication": None,
                  "lora_bias": False, "target_parameters": None, "use_bdlora": None, "arrow_config": None,
                  "kasa_config": None, "ensure_weight_tying": False}

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

    def validate(self) -> None:
        super().validate()
        for key, r in {"r": self.r, **{f"rank_pattern[{k!r}]": v for k, v in self.rank_pattern.items()}}.items():
            if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
                raise ConfigError(f"LoraConfig.{key}: rank must be a positive integer, got {r!r}")
        get_init(self.init)
        self._check_loftq()
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
        return "dora" if self.use_dora else "lora"

    def needs_calibration(self) -> str | None:
        """What the init needs from data ("activations" / "gradients"), or None."""
        return get_init(self.init).needs

    def resolved_fields(self, model, targets) -> dict[str, Any]:
        """PEFT records GPT-2's transposed Conv1D weights as fan_in_fan_out=True."""
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
        supported = ", ".join(str(i.peft_value).lower() if isinstance(i.peft_value, bool) else repr(i.peft_value)
                              for i in INITS.values())
        raise ConfigError(f"LoraConfig: init_lora_weights={value!r} is not supported; supported: {supported}")
