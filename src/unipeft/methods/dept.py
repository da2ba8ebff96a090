"""DePT (Shi & Lipani, ICLR 2024): decomposed prompt tuning.

A shorter soft prompt (`num_virtual_tokens`) plus a low-rank update of the frozen input
embeddings: A (max_length x rank) @ B (rank x d) is added position by position to the token
embeddings of inputs up to `max_length` tokens long. At equal trainable parameter count the
prompt is shorter than plain prompt tuning's, so every step processes fewer positions. The two
parts train with two learning rates: the prompt with the optimizer's lr, the update with
`lr_embedding_update` (a trainer parameter group, see `optimizer_groups`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.fields import choice, positive_int, positive_number
from ..core.registry import Capabilities, register
from .prompts import PromptLearningConfig, PromptDelta, init_prompt, is_input_embedding


@dataclass
class DeptConfig(PromptLearningConfig):
    """DePT: soft prompt of `num_virtual_tokens` + rank-`rank` update of the first `max_length` positions'
    embeddings, the update trained at `lr_embedding_update` (None: the optimizer's lr)."""

    peft_type = "DEPT"

    rank: int = positive_int(8)
    max_length: int = positive_int(128)
    lr_embedding_update: float | None = positive_number(None, optional=True)
    init: str = choice("vocab", ("vocab", "random"))  # the prompt's init: "vocab" (DePT's choice) or "random"

    def optimizer_groups(self, adapter_name: str) -> list[dict[str, Any]]:
        """The trainer's second parameter group: the embedding update at `lr_embedding_update`."""
        if self.lr_embedding_update is None:
            return []
        return [{"params": rf"\.deltas\.{re.escape(adapter_name)}\.lora_embedding_[AB]$",
                 "lr": float(self.lr_embedding_update)}]

    def trainable_parameters(self, token_dim: int) -> int:
        """Trainable count of the DePT part: n*d + rank*(max_length + d)."""
        return self.num_virtual_tokens * token_dim + self.rank * (self.max_length + token_dim)


class DeptDelta(PromptDelta):
    """`prompt_embeddings` (n x d), `lora_embedding_A` (max_length x r), `lora_embedding_B` (r x d; zero at init)."""

    def __init__(self, base: nn.Embedding, config: DeptConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        self.max_length = config.max_length
        self.prompt_embeddings = nn.Parameter(torch.empty(self.num_virtual_tokens, self.token_dim))
        self.lora_embedding_A = nn.Parameter(torch.empty(config.max_length, config.rank))
        self.lora_embedding_B = nn.Parameter(torch.zeros(config.rank, self.token_dim))
        nn.init.kaiming_uniform_(self.lora_embedding_A, a=math.sqrt(5))
        if config.inference_mode:
            nn.init.zeros_(self.prompt_embeddings)
        else:
            init_prompt(self.prompt_embeddings, base, config.init, None, None)

    def prompt(self) -> torch.Tensor:
        return self.prompt_embeddings

    def update_embeds(self, embeds: torch.Tensor, start: int = 0) -> torch.Tensor:
        end = start + embeds.shape[1]
        if end > self.max_length:
            raise ConfigError(f"DePT adapter at '{self.path}': the input has {end} tokens but "
                              f"DeptConfig.max_length is {self.max_length}; truncate inputs or raise max_length")
        update = self.lora_embedding_A[start:end] @ self.lora_embedding_B
        return embeds + update.to(embeds.dtype)


register("dept", DeptConfig, DeptDelta,
         Capabilities(mergeable=False, mixed_batch=False, layer_types=(nn.Embedding,), quantized_base=True),
         default_targets=is_input_embedding)
