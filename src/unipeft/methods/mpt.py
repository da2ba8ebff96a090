"""Multitask prompt tuning (Wang et al., ICLR 2023): one shared soft prompt, scaled per task by a low-rank matrix.

The prompt of a row with task t is `P * (U_t @ V_t)` (elementwise): P (n x d) is shared by all tasks,
U_t (n x r) and V_t (r x d) are the task's factors. Which task each row belongs to is the per-call
input `task_ids` (one id per row), so one batch may mix tasks. A model with a single task may omit
`task_ids` (every row is task 0); with several tasks it is required.

Source-task inits (train on many tasks, then start a target task from them) read a saved adapter's
tensors: "average_source_tasks" (mean factors), "exact_source_task" (task `init_task`'s factors) or
"only_source_shared" (the shared prompt only). On disk the keys are `prompt_embeddings`,
`prefix_task_cols` and `prefix_task_rows`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.fields import choice, non_negative_int, positive_int
from ..core.registry import Capabilities, register
from .prompts import PromptTuningConfig, PromptTuningDelta, is_input_embedding

_MPT_INITS = {"random": "RANDOM", "text": "TEXT", "average_source_tasks": "AVERAGE_SOURCE_TASKS",
              "exact_source_task": "EXACT_SOURCE_TASK", "only_source_shared": "ONLY_SOURCE_SHARED"}
_SOURCE_INITS = ("average_source_tasks", "exact_source_task", "only_source_shared")


@dataclass
class MultitaskPromptTuningConfig(PromptTuningConfig):
    """Multitask prompt tuning: a shared prompt of `num_virtual_tokens` times a rank-`num_ranks` factor per task
    (`num_tasks` of them); rows pick their task with the call input `task_ids`."""

    peft_class = "MultitaskPromptTuningConfig"
    peft_type = "MULTITASK_PROMPT_TUNING"
    peft_names = {"init": "prompt_tuning_init", "init_text": "prompt_tuning_init_text",
                  "init_state_dict_path": "prompt_tuning_init_state_dict_path",
                  "init_task": "prompt_tuning_init_task"}
    call_inputs: ClassVar[tuple[str, ...]] = ("task_ids",)

    init: str = choice("random", tuple(_MPT_INITS))
    init_state_dict_path: str | None = None
    init_task: int = non_negative_int(0)
    num_ranks: int = positive_int(1)
    num_tasks: int = positive_int(1)

    def validate(self) -> None:
        super().validate()
        if self.init in _SOURCE_INITS and not self.init_state_dict_path:
            raise ConfigError(f"MultitaskPromptTuningConfig.init_state_dict_path: init={self.init!r} starts from "
                              f"a source adapter's tensors; give the path of its .safetensors (or .bin) file")

    @classmethod
    def _value_to_peft(cls, name: str, value: Any) -> Any:
        return _MPT_INITS[value] if name == "init" else value

    @classmethod
    def _value_from_peft(cls, name: str, value: Any) -> Any:
        if name != "init":
            return value
        reverse = {v: k for k, v in _MPT_INITS.items()}
        if value not in reverse:
            raise ConfigError(f"MultitaskPromptTuningConfig: prompt_tuning_init={value!r} is not supported; "
                              f"supported: {sorted(reverse)}")
        return reverse[value]


def read_source_state(path: str) -> dict[str, torch.Tensor]:
    """A source adapter's tensors (safetensors, or a tensors-only legacy .bin read with weights_only)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class MultitaskPromptDelta(PromptTuningDelta):
    """`prompt_embeddings` (n x d) shared; `prefix_task_cols` (T x n x r) and `prefix_task_rows` (T x r x d),
    both N(0, 0.02^2) at init, give task t's factor cols[t] @ rows[t]."""

    def __init__(self, base: nn.Embedding, config: MultitaskPromptTuningConfig, path: str, bank=None) -> None:
        shared_init = config.init if config.init in ("random", "text") else "random"
        super().__init__(base, config.replace(init=shared_init) if shared_init != config.init else config, path,
                         bank)
        self.num_tasks = config.num_tasks
        n, r, d = self.num_virtual_tokens, config.num_ranks, self.token_dim
        self.prefix_task_cols = nn.Parameter(torch.normal(0.0, 0.02, size=(config.num_tasks, n, r)))
        self.prefix_task_rows = nn.Parameter(torch.normal(0.0, 0.02, size=(config.num_tasks, r, d)))
        if config.init in _SOURCE_INITS and not config.inference_mode:
            self._init_from_source(config)

    def _init_from_source(self, config: MultitaskPromptTuningConfig) -> None:
        source = read_source_state(config.init_state_dict_path)
        missing = [k for k in ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows") if k not in source]
        if config.init == "only_source_shared":
            missing = [k for k in missing if k == "prompt_embeddings"]
        if missing:
            raise ConfigError(f"MultitaskPromptTuningConfig.init_state_dict_path: {config.init_state_dict_path} "
                              f"lacks {missing}")
        values = {"prompt_embeddings": source["prompt_embeddings"]}
        if config.init != "only_source_shared":
            cols, rows = source["prefix_task_cols"], source["prefix_task_rows"]
            if config.init == "average_source_tasks":
                cols, rows = cols.mean(0, keepdim=True), rows.mean(0, keepdim=True)
            else:
                if config.init_task >= cols.shape[0]:
                    raise ConfigError(f"MultitaskPromptTuningConfig.init_task: expected a task id below the "
                                      f"source's {cols.shape[0]} tasks, got {config.init_task}")
                cols, rows = cols[config.init_task:config.init_task + 1], rows[config.init_task:config.init_task + 1]
            values.update(prefix_task_cols=cols, prefix_task_rows=rows)
        params = dict(self.named_parameters())
        with torch.no_grad():
            for key, value in values.items():
                if tuple(value.shape) != tuple(params[key].shape):
                    raise ConfigError(f"MultitaskPromptTuningConfig.init_state_dict_path: '{key}' has shape "
                                      f"{tuple(value.shape)} but this adapter needs {tuple(params[key].shape)} "
                                      f"(num_tasks=1 for the averaged / exact source inits)")
                params[key].copy_(value)

    def task_ids(self, batch: int, device: torch.device) -> torch.Tensor:
        """This call's task id per row (zeros for a single-task adapter called without task_ids)."""
        ids = self.call_input("task_ids")
        if ids is None:
            if self.num_tasks == 1:
                return torch.zeros(batch, dtype=torch.long, device=device)
            raise ConfigError(f"multitask prompt adapter at '{self.path}' has {self.num_tasks} tasks: pass "
                              f"task_ids= (one task id per row) in the model call")
        ids = torch.as_tensor(ids, device=device).long().reshape(-1)
        if ids.numel() != batch:
            raise ConfigError(f"task_ids has {ids.numel()} entries for a batch of {batch} rows; give one per row")
        if int(ids.min()) < 0 or int(ids.max()) >= self.num_tasks:
            raise ConfigError(f"task_ids must lie in [0, {self.num_tasks}); got {ids.tolist()}")
        return ids

    def task_prompts(self, ids: torch.Tensor) -> torch.Tensor:
        """(batch, n, d): the shared prompt scaled by each row's task factor."""
        factor = self.prefix_task_cols.index_select(0, ids) @ self.prefix_task_rows.index_select(0, ids)
        return self.prompt_embeddings.unsqueeze(0) * factor

    def batch_prompts(self, batch: int, device) -> torch.Tensor:
        """Each row's task prompt (the first step of a generation; the cache holds them after it)."""
        return self.task_prompts(self.task_ids(batch, device))

register("multitask_prompt_tuning", MultitaskPromptTuningConfig, MultitaskPromptDelta,
         Capabilities(mergeable=False, mixed_batch=False, layer_types=(nn.Embedding,), peft_compatible=True,
                      quantized_base=True),
         default_targets=is_input_embedding)
