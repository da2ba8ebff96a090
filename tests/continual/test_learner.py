"""The continual loop: baselines on a small seeded Seq-Digits run, FPF at the end, k-FPF's phases and compute."""
import dataclasses

import pytest
import torch

from unipeft import continual as cl
from unipeft.continual import learner
from unipeft.continual.digits import seq_digits_config, seq_digits_model, seq_digits_stream


@pytest.fixture(scope="module")
def stream():
    return seq_digits_stream()


def _cfg(**kw) -> cl.CLConfig:
    cfg = dataclasses.replace(seq_digits_config(), epochs=2, progress=False, **kw)
    cfg.fpf = dataclasses.replace(cfg.fpf, steps=30)
    return cfg


def _run(stream, method, seed=0, **kw) -> cl.CLResult:
    return cl.run_continual(seq_digits_model(seed, stream), stream, method, _cfg(**kw), seed)


def test_replay_beats_sequential_finetuning(stream):
    # Seeded 2-epoch run: SGD forgets every old task (~20% = the last task only); replay keeps most.
    acc = {m: _run(stream, m).final_average_accuracy for m in ("sgd", "er", "derpp")}
    assert acc["sgd"] < 0.3
    assert acc["er"] >= acc["sgd"] + 0.3, acc
    assert acc["derpp"] >= acc["sgd"] + 0.3, acc


def test_fpf_runs_after_the_same_training_and_helps_er(stream):
    er = _run(stream, "er")
    fpf = _run(stream, "er+fpf")
    assert fpf.base.accuracy == er.accuracy  # same seed: identical training before FPF
    assert fpf.fpf_phases == 1 and fpf.drift.selected and fpf.drift.rows[0]["selected"]
    assert fpf.final_average_accuracy > er.final_average_accuracy
    assert fpf.compute["per_kind"]["fpf"]["steps"] == 30
    assert fpf.compute["optimizer_steps"] == er.compute["optimizer_steps"] + 30


def test_kfpf_runs_fpf_k_times_with_less_compute_than_er(stream, monkeypatch):
    calls = []
    real = learner.fpf_finetune
    monkeypatch.setattr(learner, "fpf_finetune", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    er = _run(stream, "er")
    res = _run(stream, "kfpf", kfpf_k=3, kfpf_steps=10)
    assert len(calls) == 3 and res.fpf_phases == 3
    kinds = res.compute["per_kind"]
    assert kinds["fpf"]["steps"] == 3 * 10
    assert kinds["train"]["steps"] == er.compute["optimizer_steps"]  # same SGD steps, no replay in them
    # An ER step back-propagates a new and a replayed batch (2 batch-steps); k-FPF adds only 30 small steps.
    assert res.compute["batch_steps"] < 0.8 * er.compute["batch_steps"]
    assert res.compute["flops"] < er.compute["flops"]
    assert res.final_average_accuracy > _run(stream, "sgd").final_average_accuracy + 0.2


def test_joint_and_task_incremental(stream):
    joint = _run(stream, "joint")
    assert len(joint.accuracy) == 1 and joint.average_forgetting is None
    assert joint.final_average_accuracy > 0.75  # 2 epochs over all data: no forgetting, under-trained
    til = cl.split_by_classes(stream.joint(), cl.TensorData.concat([t.test for t in stream]), 2, "task-il")
    res = _run(til, "sgd")  # the task id removes the competition between tasks' classes
    assert res.final_average_accuracy > 0.6 > _run(stream, "sgd").final_average_accuracy + 0.3


def test_bad_configuration(stream):
    with pytest.raises(cl.ContinualError, match="unknown method 'ewc'"):
        _run(stream, "ewc")
    with pytest.raises(cl.ContinualError, match="kfpf_k"):
        _run(stream, "kfpf", kfpf_k=10_000)
    with pytest.raises(cl.ContinualError, match="kfpf_budget"):
        _run(stream, "kfpf", kfpf_budget=0.0)


def test_validation_accuracies_recorded_beside_test(stream):
    split = stream.with_validation(0.2, seed=0)
    cfg = dataclasses.replace(_cfg(), epochs=1)
    cfg.fpf = dataclasses.replace(cfg.fpf, steps=5)
    res = cl.run_continual(seq_digits_model(0, split), split, "er+fpf", cfg, 0)
    assert [len(r) for r in res.valid_accuracy] == [len(r) for r in res.accuracy] == [1, 2, 3, 4, 5]
    assert res.base.valid_accuracy[:-1] == res.valid_accuracy[:-1]  # FPF only replaces the last row
    row = res.to_dict()
    assert row["valid_final_average_accuracy"] == pytest.approx(sum(res.valid_accuracy[-1]) / 5)
    model = seq_digits_model(0, split)
    assert len(cl.evaluate(model, split, split="valid")) == 5
    assert cl.run_continual(seq_digits_model(0, stream), stream, "sgd", cfg, 0).valid_accuracy is None  # no split
    with pytest.raises(cl.ContinualError, match="no validation split"):
        cl.evaluate(model, stream, split="valid")


def test_fpf_variants_branch_from_the_same_trained_model(stream):
    cfg = dataclasses.replace(_cfg(), epochs=1)
    cfg.fpf = dataclasses.replace(cfg.fpf, steps=10)
    plain = cl.run_continual(seq_digits_model(0, stream), stream, "er+fpf", cfg, 0)
    cfg_v = dataclasses.replace(cfg, fpf_variants=(1.0, cfg.fpf.budget))
    res = cl.run_continual(seq_digits_model(0, stream), stream, "er+fpf", cfg_v, 0)
    assert res.accuracy == plain.accuracy and res.compute["flops"] == plain.compute["flops"]  # main result unchanged
    assert set(res.variants) == {1.0, cfg.fpf.budget}
    same = res.variants[cfg.fpf.budget]
    assert same.accuracy == plain.accuracy and same.drift.selected == plain.drift.selected
    every = res.variants[1.0]
    assert every.base.accuracy == plain.base.accuracy and len(every.drift.selected) > len(plain.drift.selected)
    assert every.compute["optimizer_steps"] == plain.compute["optimizer_steps"]  # one FPF of the same steps
    with pytest.raises(cl.ContinualError, match="fpf_variants"):
        dataclasses.replace(cfg, fpf_variants=(0.0,)).validate()
