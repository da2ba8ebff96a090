"""CPT: context-aware prompt tuning (Blau et al., 2024) for causal language models.

The prompt is a few in-context examples as tokens (`cpt_token_ids`): it starts as their frozen
embeddings E plus a trainable offset D (zero at init). Each token has a type (`cpt_tokens_type_mask`:
1 input template, 2 input, 3 output template, 4 label; types of later examples are shifted by 4):
only template and input tokens learn (the gradient of label-token rows is masked), and before every
use each offset row is projected onto a ball of radius epsilon * sqrt(d / 2048) (epsilon by type:
`opt_projection_format_epsilon` for templates, `opt_projection_epsilon` for inputs), so the prompt
stays close to real tokens.

With `labels`, the prompt's own label tokens are predicted too: the loss covers every position whose
type is a label type (the call input `input_type_mask` gives the types of the real tokens; default
4, all label), weighted with `opt_loss_decay_factor` ** (examples after this one) when
`opt_weighted_loss_type="decay"`. On disk: PEFT's `prompt_embeddings` = E + D, plus E and D under
`prompt_encoder.` (our files resume training exactly); a PEFT file (the prompt alone) loads as the
new E with D = 0, as PEFT loads it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..core.fields import choice, non_negative, positive_number
from ..core.registry import Capabilities, register
from .prompts import PromptDelta, PromptLearningConfig, is_input_embedding

OWN = "prompt_encoder."  # our extra keys (PEFT loads a CPT file by prompt_embeddings alone)
MIN_EPSILON = 1e-10  # radius of the label tokens' (and type-0 tokens') offset ball


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value)


@dataclass
class CPTConfig(PromptLearningConfig):
    """CPT: the prompt is the tokens `cpt_token_ids` (typed by `cpt_tokens_type_mask`), each moved by a trained
    offset of bounded norm; the loss also covers the prompt's label tokens, optionally decayed per example."""

    peft_class = "CPTConfig"
    peft_type = "CPT"
    peft_inert = {"num_transformer_submodules": 1, "tokenizer_name_or_path": None}
    call_inputs: ClassVar[tuple[str, ...]] = ("input_type_mask",)

    cpt_token_ids: list[int] | None = None
    cpt_mask: list[int] | None = None
    cpt_tokens_type_mask: list[int] | None = None
    opt_weighted_loss_type: str = choice("none", ("none", "decay"))
    opt_loss_decay_factor: float = positive_number(1.0)
    opt_projection_epsilon: float = non_negative(0.1)
    opt_projection_format_epsilon: float = non_negative(0.1)

    def __post_init__(self) -> None:
        # PEFT's defaults: one token (id 0), every token attended and of type 1.
        if self.cpt_token_ids is None:
            self.cpt_token_ids = [0]
        ids = self.cpt_token_ids = list(self.cpt_token_ids) if isinstance(self.cpt_token_ids, tuple) \
            else self.cpt_token_ids
        if isinstance(ids, list):  # anything else is refused by validate, naming the field
            if self.cpt_mask is None:
                self.cpt_mask = [1] * len(ids)
            if self.cpt_tokens_type_mask is None:
                self.cpt_tokens_type_mask = [1] * len(ids)
            self.num_virtual_tokens = max(len(ids), 1)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        for name in ("cpt_token_ids", "cpt_mask", "cpt_tokens_type_mask"):
            value = getattr(self, name)
            if not _int_list(value):
                raise ConfigError(f"CPTConfig.{name}: expected a non-empty list of integers, got {value!r}")
        if not len(self.cpt_token_ids) == len(self.cpt_mask) == len(self.cpt_tokens_type_mask):
            raise ConfigError(f"CPTConfig: cpt_token_ids, cpt_mask and cpt_tokens_type_mask must have the same "
                              f"length, got {len(self.cpt_token_ids)}, {len(self.cpt_mask)} and "
                              f"{len(self.cpt_tokens_type_mask)}")
        if min(self.cpt_token_ids) < 0 or min(self.cpt_tokens_type_mask) < 0:
            raise ConfigError("CPTConfig: token ids and token types must be >= 0")
        if self.task_type not in (None, "CAUSAL_LM"):
            raise ConfigError(f"CPTConfig.task_type: CPT is for causal language models: expected 'CAUSAL_LM', "
                              f"got {self.task_type!r}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["task_type"] = "CAUSAL_LM"  # PEFT reads no other task type for CPT
        return out

    def epsilon(self, token_dim: int) -> torch.Tensor:
        """Per-token radius of the offset ball: by token type, scaled by sqrt(token_dim / 2048)."""
        scale = math.sqrt(token_dim / 2048)
        types = torch.tensor(self.cpt_tokens_type_mask)
        eps = torch.full((len(types),), MIN_EPSILON)
        kind = types % 4
        eps[(types > 0) & ((kind == 1) | (kind == 3))] = self.opt_projection_format_epsilon * scale
        eps[(types > 0) & (kind == 2)] = self.opt_projection_epsilon * scale
        return eps

    def trainable_rows(self) -> torch.Tensor:
        """(n, 1) mask of the prompt tokens whose offset learns: templates and inputs, not labels."""
        kind = torch.tensor(self.cpt_tokens_type_mask) % 4
        return ((kind == 1) | (kind == 2) | (kind == 3)).float().view(-1, 1)


class CPTDelta(PromptDelta):
    """`base_prompt` (n x d, frozen: the tokens' embeddings) + `delta_embedding` (n x d, trained, projected)."""

    def __init__(self, base: nn.Embedding, config: CPTConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        ids = torch.tensor(config.cpt_token_ids, dtype=torch.long)
        if int(ids.max()) >= base.num_embeddings:
            raise ConfigError(f"CPTConfig.cpt_token_ids: id {int(ids.max())} is outside the embedding's "
                              f"vocabulary ({base.num_embeddings})")
        start = torch.zeros(len(ids), self.token_dim) if config.inference_mode else \
            base.weight.detach()[ids.to(base.weight.device)].float().cpu().clone()
        self.register_buffer("base_prompt", start)
        self.delta_embedding = nn.Parameter(torch.zeros(len(ids), self.token_dim))
        self.register_buffer("epsilon", config.epsilon(self.token_dim), persistent=False)
        self.register_buffer("grad_mask", config.trainable_rows(), persistent=False)
        self.token_ids = list(config.cpt_token_ids)
        self.token_types = list(config.cpt_tokens_type_mask)
        self.decay = config.opt_loss_decay_factor if config.opt_weighted_loss_type == "decay" else None

    def project(self) -> None:
        """Scale every non-zero offset row to norm <= its epsilon (in place, as the method prescribes)."""
        with torch.no_grad():
            d = self.delta_embedding
            norm = d.norm(p=2, dim=1)
            rows = norm > 0
            if bool(rows.any()):
                eps = self.epsilon.to(d.device, d.dtype)
                d[rows] *= (eps[rows] / norm[rows].clamp(min=eps[rows])).view(-1, 1)

    def prompt(self) -> torch.Tensor:
        self.project()
        d = self.delta_embedding
        mask = self.grad_mask.to(d.device, d.dtype)
        d = d * mask + (d * (1 - mask)).detach()  # same values; label-token rows get no gradient
        return self.base_prompt.to(d.dtype) + d

    def export_state(self) -> dict[str, torch.Tensor]:
        # PEFT's one tensor, plus the two parts (so our own files resume training exactly; PEFT ignores them).
        return {"prompt_embeddings": self.prompt().detach(), f"{OWN}base_prompt": self.base_prompt,
                f"{OWN}delta_embedding": self.delta_embedding}

    def optional_state(self, suffix: str) -> bool:
        return suffix.startswith(OWN)

    def import_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            if f"{OWN}delta_embedding" in tensors and f"{OWN}base_prompt" in tensors:
                self.base_prompt.copy_(tensors[f"{OWN}base_prompt"].to(self.base_prompt.dtype))
                self.delta_embedding.copy_(tensors[f"{OWN}delta_embedding"].to(self.delta_embedding.dtype))
                return
            # PEFT's file: the saved prompt becomes the frozen start, the offset starts again at zero (as PEFT).
            self.base_prompt.copy_(tensors["prompt_embeddings"].to(self.base_prompt.dtype))
            self.delta_embedding.zero_()

    # ---- labels and the CPT loss ----------------------------------------------------------------
    def _labels_and_types(self, labels: torch.Tensor):
        """Labels and token types over prompt + input; positions that are no label type get -100."""
        batch = labels.shape[0]
        given = self.call_input("input_type_mask")
        types = torch.full_like(labels, 4) if given is None else torch.as_tensor(given, device=labels.device).long()
        if types.shape != labels.shape:
            raise ConfigError(f"input_type_mask has shape {tuple(types.shape)}; it must match labels "
                              f"{tuple(labels.shape)}")
        prefix_types = torch.tensor(self.token_types, device=labels.device).expand(batch, -1)
        types = torch.where(types > 0, types + max(self.token_types), types)  # later examples than the prompt's
        types = torch.cat((prefix_types, types), dim=1)
        prefix = torch.tensor(self.token_ids, device=labels.device).expand(batch, -1)
        full = torch.cat((prefix, labels), dim=1)
        full = full.masked_fill(~((types > 0) & (types % 4 == 0)), -100)
        return full, types

    def cpt_loss(self, logits: torch.Tensor, labels: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy over the label positions, weighted by example decay when configured."""
        logits, labels, types = logits[:, :-1].float(), labels[:, 1:], types[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none",
                               ignore_index=-100).view(labels.shape)
        valid = labels != -100
        weights = valid.float()
        if self.decay is not None:
            for row in range(labels.shape[0]):
                ids = types[row][(types[row] > 0) & (types[row] % 4 == 0)].unique()
                decay = torch.ones_like(weights[row])
                value = 1.0
                for label_type in torch.flip(ids, [0]):  # the last example weighs 1, earlier ones decay
                    decay[types[row] == label_type] = value
                    value *= self.decay
                weights[row] *= decay
        return (loss[valid] * weights[valid]).mean()

    def prepare_inputs(self, model, kwargs: dict):
        labels = kwargs.get("labels")
        if labels is None or labels.dim() != 2:
            return super().prepare_inputs(model, kwargs)
        full, types = self._labels_and_types(labels)
        kwargs["labels"] = None  # super() must not pad them with -100: the prompt's label tokens count here
        kwargs, post = super().prepare_inputs(model, kwargs)
        kwargs["labels"] = full

        def finish(out):
            if getattr(out, "logits", None) is not None:
                out["loss"] = self.cpt_loss(out.logits, full, types)
            return post(out)
        return kwargs, finish


register("cpt", CPTConfig, CPTDelta,
         Capabilities(mergeable=False, mixed_batch=False, layer_types=(nn.Embedding,), peft_compatible=True,
                      quantized_base=True),
         default_targets=is_input_embedding)
