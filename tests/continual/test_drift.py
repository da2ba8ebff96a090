"""Per-module forgetting scores from parameter movement between tasks, ranking and selection."""
import pytest
import torch
from torch import nn

from unipeft.continual import ContinualError, DriftTracker, module_groups, select_modules

from .helpers import tiny_cnn


def _sgd_nudge(model: nn.Module, seed: int) -> None:
    """A few small SGD steps on random data: every module moves a little."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        x, y = torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("score", ["mean_abs", "relative"])
@pytest.mark.parametrize("target", ["conv2", "bn1"])
def test_deliberately_moved_module_ranks_first(score, target):
    model = tiny_cnn()
    tracker = DriftTracker(model)
    for task in range(3):
        _sgd_nudge(model, task)
        if task >= 1:  # between tasks, one module drifts far more than training moves anything
            with torch.no_grad():
                for p in model.get_submodule(target).parameters():
                    p.add_(0.5 * torch.randn_like(p))
        tracker.end_task()
    report = tracker.report(budget=0.5, score=score)
    assert report.rows[0]["module"] == target and report.rows[0]["rank"] == 1
    assert report.transitions == 2  # the first task's change (from initialisation) is left out
    assert target in report.selected
    scores = [r["score"] for r in report.rows]
    assert scores == sorted(scores, reverse=True) and scores[0] > 3 * scores[1]
    assert target in report.table() and "FPF trains" in report.table()


def test_groups_are_modules_owning_trainable_parameters():
    groups = module_groups(tiny_cnn())
    assert list(groups) == ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "fc"]
    assert [n for n, _ in groups["bn1"]] == ["weight", "bias"]


def test_selection_respects_budget_top_and_include():
    scores = {"a": 5.0, "b": 4.0, "c": 3.0, "d": 2.0}
    sizes = {"a": 10, "b": 60, "c": 20, "d": 10}
    # budget 0.4 of 100 parameters: a (10) fits, b (60) overflows and is skipped, c and d fit
    assert select_modules(scores, sizes, budget=0.4) == ["a", "c", "d"]
    assert select_modules(scores, sizes, budget=0.4, top=2) == ["a", "c"]
    assert select_modules(scores, sizes, budget=0.05) == ["a"]  # the best module is always taken
    assert select_modules(scores, sizes, budget=0.8, include=["b"]) == ["b", "a", "d"]  # b counts against it
    with pytest.raises(ContinualError, match="budget"):
        select_modules(scores, sizes, budget=0.0)
    with pytest.raises(ContinualError, match="include"):
        select_modules(scores, sizes, include=["zzz"])
