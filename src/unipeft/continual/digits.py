"""Seq-Digits: scikit-learn's 8x8 digits as 5 tasks of 2 classes, learned by a small CNN from scratch."""
from __future__ import annotations

import torch
from torch import nn

from .learner import CLConfig
from .fpf import FPFConfig
from .stream import TaskStream, TensorData, split_by_classes

SPLIT_SEED = 0      # the train/test split is fixed; seeds vary initialisation, batch order and buffer
TEST_FRACTION = 0.3


def digits_data() -> tuple[TensorData, TensorData]:
    """The stratified train/test split of load_digits as (N, 1, 8, 8) tensors scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION, stratify=y, random_state=SPLIT_SEED)

    def tensors(xs, ys) -> TensorData:
        return TensorData((torch.tensor(xs, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0,),
                          torch.tensor(ys, dtype=torch.long))

    return tensors(x_tr, y_tr), tensors(x_te, y_te)


class DigitsCNN(nn.Module):
    """Three conv-BN-ReLU blocks (32, 64, 64 channels), two max-pools, global average pool, linear head."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w2 = 2 * width
        self.conv1, self.bn1 = nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, w2, 3, padding=1, bias=False), nn.BatchNorm2d(w2)
        self.conv3, self.bn3 = nn.Conv2d(w2, w2, 3, padding=1, bias=False), nn.BatchNorm2d(w2)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(w2, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features before the head."""
        x = torch.relu(self.bn1(self.conv1(x)))                   # 8x8
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))        # 4x4
        x = self.pool(torch.relu(self.bn3(self.conv3(x))))        # 2x2
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def seq_digits_stream(scenario: str = "class-il") -> TaskStream:
    """The Seq-Digits stream: classes 0,1 | 2,3 | 4,5 | 6,7 | 8,9."""
    train, test = digits_data()
    return split_by_classes(train, test, 2, scenario, class_names=[str(d) for d in range(10)])


def seq_digits_model(seed: int, stream: TaskStream) -> nn.Module:
    """A freshly initialised CNN (seeded)."""
    torch.manual_seed(seed)
    return DigitsCNN(stream.num_classes, width=16)


def seq_digits_config() -> CLConfig:
    """The preset used by the benchmark, the CLI and the tests."""
    # k-FPF gets a larger budget than FPF: without replay the deeper convolutions drift too, and at
    # 0.1 (fc, BatchNorms, conv1) it stays at ER's level; see the ablation in the benchmark.
    return CLConfig(epochs=5, batch_size=32, lr=0.05, buffer_size=50,
                    fpf=FPFConfig(steps=100, lr=0.05, batch_size=32, budget=0.1),
                    kfpf_k=5, kfpf_steps=20, kfpf_budget=0.5)
