"""The run config of `unipeft train`: sections, defaults, YAML loading and `--key value` overrides."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..core.errors import ConfigError
from .full import FULL, FullFineTuneConfig  # noqa: F401  (re-exported: callers import them from here)
from .quantize import QuantizationConfig
from .schema import check_type, from_dict, parse_yaml, set_dotted, to_dict, unknown_key_error
from .strategy import BUILT_IN_METHODS, AdapterStrategy, MethodConfig, MethodStrategy, strategy_for

TASKS = ("classification", "causal_lm")


@dataclass
class ModelConfig:
    """Which pretrained model: the built-in 'minilm', the built-in vector 'mlp', or a local folder."""

    name: str = "minilm"
    attn_implementation: str | None = None  # e.g. 'eager' or 'sdpa'; None: transformers' default
    hidden: int = 64  # width of the built-in 'mlp'


@dataclass
class DataConfig:
    """Where examples come from and how they are tokenized and batched."""

    source: Literal["fortunes", "digits", "wordnet", "file"] = "fortunes"
    categories: list[str] | None = None  # fortunes: label order; None: the 8 default topics
    max_per_category: int | None = None
    max_chars: int | None = None
    directory: str | None = None  # fortunes / wordnet folder (default /usr/share/games/fortunes, /usr/share/wordnet)
    pos: list[str] | None = None  # wordnet: parts of speech (noun, verb, adj, adv); None: all four
    max_examples: int | None = None  # wordnet: at most this many pairs (whole words), taken after shuffling
    split: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    seed: int | None = None  # split seed; None: the run's seed
    train: str | None = None  # file source: paths; valid/test are split off train when absent
    valid: str | None = None
    test: str | None = None
    format: Literal["csv", "jsonl", "text"] | None = None  # None: from the file suffix
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    max_length: int = 128
    group_by_length: bool = True
    # causal_lm: render each prompt as a user turn through the tokenizer's chat template (and end
    # the completion with the template's end-of-turn token); the loss stays on the answer tokens.
    chat_template: bool = False


@dataclass
class ParamGroupConfig:
    """Parameters whose name matches `params` (regex search) get their own lr / weight decay."""

    params: str
    lr: float | None = None
    lr_scale: float | None = None  # lr = optimizer.lr * lr_scale
    weight_decay: float | None = None


@dataclass
class GaloreConfig:
    """GaLore (optimizer name galore_adamw / galore_adamw8bit): Adam on low-rank projected gradients."""

    rank: int = 128
    update_proj_gap: int = 200  # steps between refreshes of each projector (an SVD of the gradient)
    scale: float = 0.25  # the projected-back update is multiplied by this
    proj_type: Literal["std", "reverse_std", "left", "right", "full"] = "std"
    targets: str | None = None  # regex (re.search) on parameter names; None: every trainable nn.Linear / Conv1D
    #                             weight (embeddings excluded, also when tied to the output layer)
    normalize: bool = False  # GradNormLoRP: weight-normalised W = g v/|v|, g full-rank, v's gradient projected
    per_layer: bool = False  # each weight steps in its own gradient hook: full gradients never all alive


@dataclass
class ZerothOrderConfig:
    """Zeroth-order training (optimizer name mezo / sparse_mezo / spsa_gc): forward passes only."""

    eps: float = 1e-3  # perturbation scale of SPSA
    sparse_fraction: float = 0.25  # sparse_mezo: share of each tensor, smallest by magnitude, perturbed
    momentum: float = 0.9  # spsa_gc: momentum of the corrected gradient estimate
    perturbations: int = 1  # SPSA estimates averaged per step


@dataclass
class OptimizerConfig:
    """The optimizer and its parameter groups (first matching group wins; the rest use the defaults).

    adamw: torch's AdamW; adamw8bit / paged_adamw8bit: bitsandbytes' 8-bit-state AdamW; galore_*: GaLore
    (see `galore`); mezo / sparse_mezo / spsa_gc: zeroth-order, forward passes only (see `zo`).
    """

    name: Literal["adamw", "adamw8bit", "paged_adamw8bit", "galore_adamw", "galore_adamw8bit", "mezo",
                  "sparse_mezo", "spsa_gc"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    groups: list[ParamGroupConfig] = field(default_factory=list)
    galore: GaloreConfig = field(default_factory=GaloreConfig)
    zo: ZerothOrderConfig = field(default_factory=ZerothOrderConfig)


@dataclass
class ScheduleConfig:
    """Learning-rate schedule after a linear warm-up from 0."""

    name: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int | None = None
    warmup_ratio: float = 0.0


@dataclass
class DistributedConfig:
    """How the processes of a multi-process launch share the work."""

    # ddp: every process holds the whole model; fsdp: the model's parameters are sharded over the
    # processes (train/fsdp.py); auto: fsdp when the launch asks for it (accelerate launch --use_fsdp).
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"


@dataclass
class CalibrationConfig:
    """Data for data-aware inits (CorDA, EVA, LoRA-GA): batches of the training split (train/calibrate.py)."""

    batches: int | None = None  # None: no calibration step (a method that needs one fails, naming this field)
    batch_size: int | None = None  # None: the run's batch_size


@dataclass
class RunConfig:
    """Everything one training run needs; `unipeft train CONFIG.yaml` reads this from YAML."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)  # of the frozen base
    task: Literal["classification", "causal_lm"] = "classification"
    data: DataConfig = field(default_factory=DataConfig)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "lora"})
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    epochs: float | None = 3.0
    max_steps: int | None = None  # wins over epochs
    batch_size: int = 16  # examples per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1  # micro-batches per optimizer step on each process
    eval_batch_size: int = 64
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    eval_every: int | None = None  # steps; None: at the end of every epoch
    save_every: int | None = None  # steps between checkpoints (for --resume); None: none
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    threads: int | None = None  # torch CPU threads per process; None: the physical cores available (train/threads.py)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output_dir: str = "runs/unipeft"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check value ranges that types alone do not, and build the method; raise ConfigError naming the key."""
        # The method comes first, as it did when config_from_dict built it before anything else.
        if not isinstance(self.method, dict) or not isinstance(self.method.get("name"), str):
            raise ConfigError("method.name: required, e.g. 'lora' (see `unipeft info --methods`) or 'full'")
        # Built here, once: unknown keys and bad types fail with the method's field names, and every
        # later user shares this object. A plain attribute, not a field, so to_dict() (config.yaml),
        # ==, repr and the section list of overrides see only the `method` dict.
        self._strategy = strategy_for(build_method_config(self.method), self.task)
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "eval_batch_size": self.eval_batch_size, "log_every": self.log_every,
                    "keep_checkpoints": self.keep_checkpoints, "data.max_length": self.data.max_length}
        for key in ("max_steps", "eval_every", "save_every", "threads"):
            if getattr(self, key) is not None:
                positive[key] = getattr(self, key)
        if self.data.max_examples is not None:
            positive["data.max_examples"] = self.data.max_examples
        for key in ("batches", "batch_size"):
            if getattr(self.calibration, key) is not None:
                positive[f"calibration.{key}"] = getattr(self.calibration, key)
        self.quantization.validate()
        if self.quantization.enabled and (self.task != "causal_lm" or self.model.name == "mlp"):
            raise ConfigError("quantization: a quantized base is loaded for task: causal_lm with a transformers "
                              "model (e.g. model: smollm2); set quantization.bits: null here")
        if self.data.chat_template and self.task != "causal_lm":
            raise ConfigError("data.chat_template: only for task: causal_lm (it renders prompts as chat turns)")
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key}: expected a positive integer, got {value}")
        if self.max_steps is None and (self.epochs is None or self.epochs <= 0):
            raise ConfigError("epochs: expected a positive number (or set max_steps)")
        if self.optimizer.lr <= 0:
            raise ConfigError(f"optimizer.lr: expected a positive number, got {self.optimizer.lr}")
        if len(self.optimizer.betas) != 2:
            raise ConfigError(f"optimizer.betas: expected two numbers, got {self.optimizer.betas}")
        if not 0.0 <= self.schedule.warmup_ratio < 1.0:
            raise ConfigError(f"schedule.warmup_ratio: expected 0 <= ratio < 1, got {self.schedule.warmup_ratio}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"max_grad_norm: expected a positive number or null, got {self.max_grad_norm}")

    @property
    def method_name(self) -> str:
        """The method's registry name ('full' for plain fine-tuning)."""
        return str(self.method["name"])

    @property
    def method_config(self) -> MethodConfig:
        """The typed `method` section: an AdapterConfig, or a FullFineTuneConfig for 'full'."""
        return self._strategy.config

    @property
    def strategy(self) -> MethodStrategy:
        """How the method is applied to the base model, saved into the run folder and loaded back."""
        return self._strategy

    @property
    def data_seed(self) -> int:
        """Seed of the data split (data.seed, else the run's seed)."""
        return self.seed if self.data.seed is None else self.data.seed

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what config.yaml in the run folder holds)."""
        return to_dict(self)


def method_fields(name: str) -> dict[str, Any]:
    """{field: type} of a method config ('full' has only `trainable`)."""
    if name in BUILT_IN_METHODS:
        return BUILT_IN_METHODS[name].fields()
    from ..core.registry import public_methods
    known = sorted(public_methods()) + list(BUILT_IN_METHODS)
    if name not in known:
        from .schema import suggest
        raise ConfigError(f"method.name: unknown method {name!r}{suggest(name, known)} "
                          f"(`unipeft info --methods` lists them)")
    return AdapterStrategy.fields(name)


def build_method_config(method: dict[str, Any]) -> MethodConfig:
    """The typed config the `method` section describes: an AdapterConfig, or a FullFineTuneConfig for 'full'."""
    name = method["name"]
    fields = method_fields(name)
    kwargs: dict[str, Any] = {}
    for key, value in method.items():
        if key == "name":
            continue
        if key not in fields:
            raise unknown_key_error("method", key, ["name", *fields])
        kwargs[key] = check_type(value, fields[key], f"method.{key}")
    if name in BUILT_IN_METHODS:
        return BUILT_IN_METHODS[name](**kwargs)
    from ..core.registry import get_method
    return get_method(name).config_cls(**kwargs)


def config_from_dict(data: Any, source: str = "config") -> RunConfig:
    """Build and validate a RunConfig from a parsed YAML mapping."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (model, task, data, method, ...), "
                          f"got {type(data).__name__}")
    data = dict(data)
    if isinstance(data.get("model"), str):
        data["model"] = {"name": data["model"]}
    if isinstance(data.get("method"), str):
        data["method"] = {"name": data["method"]}
    return from_dict(RunConfig, data)  # RunConfig.validate builds (and so checks) the method section


def parse_overrides(tokens: list[str]) -> list[tuple[str, Any]]:
    """`--a.b value` / `--a.b=value` pairs; values are read as YAML scalars (numbers, lists, null)."""
    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) < 3:
            raise ConfigError(f"override {tok!r}: expected --key value (e.g. --epochs 1 --method.r 4)")
        key, eq, value = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens):
                raise ConfigError(f"override --{key}: missing value")
            value = tokens[i + 1]
            i += 1
        pairs.append((key, parse_yaml(value, f"override --{key}")))
        i += 1
    return pairs


def apply_overrides(data: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """A copy of `data` with the overrides set; unknown top-level keys get a suggestion."""
    out = dict(data)
    sections = [f.name for f in dataclasses.fields(RunConfig)]
    for key, value in overrides:
        top = key.split(".")[0]
        if top not in sections:
            raise unknown_key_error("", top, sections)
        if isinstance(out.get(top), dict):
            out[top] = dict(out[top])
        set_dotted(out, key, value)
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read CONFIG.yaml, apply `--key value` overrides, and validate everything."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data or {}, parse_overrides(overrides or []))
    return config_from_dict(data, str(path))
