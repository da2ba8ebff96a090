"""Task streams: classes split into tasks; class- vs task-incremental masking."""
import pytest
import torch

from unipeft.continual import ContinualError, TaskStream, TensorData, split_by_classes


def _data(n_per_class: int = 6, n_classes: int = 6) -> TensorData:
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    return TensorData((torch.randn(len(labels), 3),), labels)


def test_split_into_disjoint_tasks():
    train, test = _data(6), _data(2)
    stream = split_by_classes(train, test, 2)
    assert len(stream) == 3 and [t.classes for t in stream] == [[0, 1], [2, 3], [4, 5]]
    for t in stream:
        assert set(t.train.labels.tolist()) == set(t.classes) and len(t.train) == 12
        assert set(t.test.labels.tolist()) == set(t.classes) and len(t.test) == 4
        # inputs stay aligned with their labels
        assert torch.equal(t.train.inputs[0], train.inputs[0][torch.isin(train.labels, torch.tensor(t.classes))])
    assert len(stream.joint()) == len(train)
    assert stream.task_ids(torch.tensor([0, 3, 5])).tolist() == [0, 1, 2]


def test_explicit_class_lists():
    stream = split_by_classes(_data(), _data(2), [[5, 0], [2]], class_names=list("abcdef"))
    assert [t.classes for t in stream] == [[5, 0], [2]]
    assert stream.task_names() == ["f/a", "c"]


def test_class_il_keeps_every_logit_task_il_masks_other_tasks():
    logits = torch.arange(6.0).repeat(2, 1)  # class 5 always wins unmasked
    ids = torch.tensor([0, 1])
    cil = split_by_classes(_data(), _data(2), 2, scenario="class-il")
    assert torch.equal(cil.mask_logits(logits, ids), logits)
    til = split_by_classes(_data(), _data(2), 2, scenario="task-il")
    masked = til.mask_logits(logits, ids)
    assert torch.isinf(masked[0, 2:]).all() and torch.equal(masked[0, :2], logits[0, :2])
    assert torch.isinf(masked[1, [0, 1, 4, 5]]).all() and torch.equal(masked[1, 2:4], logits[1, 2:4])
    assert masked.argmax(dim=1).tolist() == [1, 3]  # prediction restricted to the row's task


@pytest.mark.parametrize("spec, match", [(4, "divide"), ([[0, 1], [1, 2]], "disjoint"), ([[0, 9]], "within")])
def test_bad_splits(spec, match):
    with pytest.raises(ContinualError, match=match):
        split_by_classes(_data(), _data(2), spec)


def test_bad_scenario_and_data():
    with pytest.raises(ContinualError, match="scenario"):
        split_by_classes(_data(), _data(2), 2, scenario="domain-il")
    with pytest.raises(ContinualError, match="rows"):
        TensorData((torch.zeros(3, 2),), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ContinualError, match="at least one task"):
        TaskStream([], 2)


def test_validation_split_held_out_of_each_class_seeded():
    train, test = _data(10), _data(2)
    stream = split_by_classes(train, test, 2)
    assert not stream.has_validation
    split = stream.with_validation(0.2, seed=3)
    assert split.has_validation and len(split) == len(stream) and split.scenario == stream.scenario
    for old, new in zip(stream, split):
        assert [new.valid.labels.tolist().count(c) for c in new.classes] == [2, 2]  # round(0.2 * 10) per class
        assert len(new.train) == len(old.train) - 4 and new.test is old.test
        # a partition of the old training rows: nothing shared, nothing lost
        rows = lambda d: {tuple(x.tolist()) for x in d.inputs[0]}  # noqa: E731
        assert not rows(new.train) & rows(new.valid) and rows(new.train) | rows(new.valid) == rows(old.train)
    again, other = stream.with_validation(0.2, seed=3), stream.with_validation(0.2, seed=4)
    assert all(torch.equal(a.valid.inputs[0], b.valid.inputs[0]) for a, b in zip(split, again))
    assert any(not torch.equal(a.valid.inputs[0], b.valid.inputs[0]) for a, b in zip(split, other))
    assert len(split.joint()) == len(train) - 12  # joint training sees the reduced training sets too


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_validation_split_bad_fraction(fraction):
    with pytest.raises(ContinualError, match="fraction"):
        split_by_classes(_data(), _data(2), 2).with_validation(fraction)
