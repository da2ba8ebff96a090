"""Training: run configs, the accelerate-based trainer, callbacks, checkpoints and run folders.

    from unipeft.train import load_config, train_run
    summary = train_run(load_config("examples/fortunes_lora.yaml", ["--epochs", "1"]))
"""
from .callbacks import TrainContext, TrainerCallback
from .config import RunConfig, build_method_config, config_from_dict, load_config
from .run import partial_dir, train_run

__all__ = ["RunConfig", "TrainContext", "TrainerCallback", "build_method_config", "config_from_dict",
           "load_config", "partial_dir", "train_run"]
