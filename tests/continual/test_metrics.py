"""Accuracy-matrix metrics on a hand-computed example."""
import pytest

from unipeft.continual import average_accuracy, average_forgetting, backward_transfer, forgetting_per_task

ACC = [[0.9],
       [0.6, 0.8],
       [0.5, 0.7, 1.0]]


def test_metrics_by_hand():
    assert average_accuracy(ACC) == pytest.approx((0.5 + 0.7 + 1.0) / 3)
    assert average_accuracy(ACC, after=1) == pytest.approx(0.7)
    assert forgetting_per_task(ACC) == pytest.approx([0.4, 0.1])
    assert average_forgetting(ACC) == pytest.approx(0.25)
    assert backward_transfer(ACC) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)


def test_forgetting_uses_the_best_earlier_accuracy():
    acc = [[0.5], [0.9, 0.8], [0.7, 0.8, 0.9]]  # task 0 improved after task 1, then dropped
    assert forgetting_per_task(acc) == pytest.approx([0.2, 0.0])
