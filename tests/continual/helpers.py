"""Small seeded models and streams shared by the continual tests."""
import torch
from torch import nn

from unipeft.continual import ReservoirBuffer, TensorData, split_by_classes
from unipeft.continual.digits import DigitsCNN


def tiny_cnn(seed: int = 0) -> nn.Module:
    """The Seq-Digits CNN at width 4 (conv, BatchNorm and linear modules; 1 input channel, 8x8)."""
    torch.manual_seed(seed)
    return DigitsCNN(num_classes=4, width=4)


def image_stream(n: int = 64, scenario: str = "class-il"):
    """Random 8x8 images, 4 classes in 2 tasks."""
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(4).repeat(n // 4)
    data = TensorData((torch.rand(n, 1, 8, 8, generator=g) + labels.view(-1, 1, 1, 1) * 0.2,), labels)
    return split_by_classes(data, data, 2, scenario)


def filled_buffer(stream, capacity: int = 32, logits: bool = False) -> ReservoirBuffer:
    """A buffer holding examples of every task of `stream`."""
    buf = ReservoirBuffer(capacity, seed=0)
    for t in stream:
        n = len(t.train)
        buf.add(t.train.inputs, t.train.labels, t.index, torch.randn(n, 4) if logits else None)
    return buf


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    """State-dict keys whose tensor is not bit-identical to `before`."""
    after = model.state_dict()
    assert set(after) == set(before), "the model's state-dict keys changed"
    return {k for k in before if not torch.equal(before[k], after[k])}
