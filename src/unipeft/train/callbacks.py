"""The training-time protocol lives in core (methods must not import train/); re-exported here for the trainer."""
from ..core.hooks import (CallbackList, TrainContext, TrainerCallback, TrainingHooks, method_callbacks,
                          method_param_groups)

__all__ = ["CallbackList", "TrainContext", "TrainerCallback", "TrainingHooks", "method_callbacks",
           "method_param_groups"]
