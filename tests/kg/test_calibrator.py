"""CQD^A calibrator: a registered delta on the frozen ComplEx scorer."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import unipeft as up
from unipeft.core.errors import ConfigError
from unipeft.kg.calibrate import (CalibrationConfig, calibrated_copy, parameter_counts, query_loss, subsample,
                                  train_calibrator)
from unipeft.kg.cqd import CQDConfig, answer_queries
from unipeft.kg.evaluate import evaluate_queries
from unipeft.kg.querygen import generate_split
from unipeft.kg.calibrator import CQDCalibratorConfig, CQDCalibratorDelta

from .conftest import SMALL_LINK

ROWS = torch.tensor([[0, 0], [5, 3], [134, 91], [17, 50], [17, 50]])


@pytest.fixture(scope="module")
def queries(umls):
    """A few UMLS queries: 1p, 2p and 2in for training, 2in for validation and test."""
    train = {s: generate_split(umls, "train", s, 96, seed=0) for s in ("1p", "2p", "2in")}
    valid = {"2in": generate_split(umls, "valid", "2in", 40, seed=0)}
    test = {"2in": generate_split(umls, "test", "2in", 100, seed=0)}
    return train, valid, test


@pytest.fixture(scope="module")
def trained(umls, small_predictor, queries):
    """(calibrated copy, base parameters before training, report) after a short calibration."""
    train, valid, _ = queries
    model = calibrated_copy(small_predictor)
    before = {n: p.detach().clone() for n, p in small_predictor.named_parameters()}
    cfg = CalibrationConfig(structures=["1p", "2p", "2in"], steps=60, batch_size=32, lr=0.01, eval_every=20)
    report = train_calibrator(model, train, umls.n_entities, cfg, valid=valid, progress=False)
    return model, before, report


def test_registered_with_honest_capabilities():
    spec = up.get_method("cqd_calibrator")
    caps = spec.capabilities
    assert spec.config_cls is CQDCalibratorConfig is up.CQDCalibratorConfig and spec.delta_cls is CQDCalibratorDelta
    assert not caps.mergeable  # a score re-scaling has no weight-space form
    assert caps.mixed_batch and not caps.peft_compatible and CQDCalibratorConfig.peft_type == "CQD_CALIBRATOR"


def test_identity_at_init(small_predictor):
    model = calibrated_copy(small_predictor)
    assert torch.equal(model(ROWS), small_predictor(ROWS))
    q = torch.tensor([[3, 4, 60]])
    assert torch.equal(answer_queries(model, "2p", q, 135), answer_queries(small_predictor, "2p", q, 135))


def test_parameter_count_and_fraction(small_predictor):
    model = calibrated_copy(small_predictor)
    r = SMALL_LINK.rank
    n_adapter, n_base = parameter_counts(model)
    assert n_adapter == 2 * (2 * r + 2 * r) + 2       # rho: [e_h ; w_r] -> (alpha, beta)
    assert n_base == (135 + 2 * 46) * 2 * r            # entity and relation embeddings
    assert up.trainable_report(model).trainable == n_adapter


def test_training_leaves_the_predictor_bit_identical(small_predictor, trained):
    model, before, report = trained
    inner = model.base_model.scorer.base_layer
    for name, p in small_predictor.named_parameters():  # the copy's source is untouched ...
        assert torch.equal(p, before[name]), name
    for key, p in (("scorer.entity", inner.entity), ("scorer.relation", inner.relation)):  # ... and so is the copy
        assert torch.equal(p, before[key]) and not p.requires_grad
    assert report["parameter_fraction"] == report["adapter_parameters"] / report["predictor_parameters"]
    assert report["adapter_parameters"] == 130 and report["train_queries"] == {"1p": 96, "2p": 96, "2in": 96}


def test_training_fits_the_training_queries(trained):
    _, _, report = trained
    assert report["last_loss"] < 0.8 * report["first_loss"], report


def test_calibration_answers_negation_better_than_cqd(umls, trained, queries):
    """On held-out 2in test queries, calibrated negation beats plain CQD's 1 - sigmoid(score)."""
    model, _, _ = trained
    _, _, test = queries
    cqda = evaluate_queries(model, test, umls.n_entities, CQDConfig())["per_structure"]["2in"]["mrr"]
    with model.disable_adapters():
        cqd = evaluate_queries(model, test, umls.n_entities, CQDConfig())["per_structure"]["2in"]["mrr"]
    assert cqda > cqd + 0.05, (cqd, cqda)


def test_save_load_round_trip_is_exact(tmp_path, small_predictor, trained):
    model, _, _ = trained
    model.save_pretrained(tmp_path)
    loaded = up.AdaptedModel.from_pretrained(copy.deepcopy(small_predictor), tmp_path)
    assert torch.equal(loaded(ROWS), model(ROWS)) and not torch.equal(loaded(ROWS), small_predictor(ROWS))
    a, b = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert sorted(a) == ["base_model.model.scorer.rho.bias", "base_model.model.scorer.rho.weight"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert up.AdapterConfig.load(tmp_path).to_dict()["peft_type"] == "CQD_CALIBRATOR"


def test_mixed_batch_rows(small_predictor, trained):
    model, _, _ = trained
    out = model(ROWS, adapter_names=["default", "__base__", "default", "__base__", "default"])
    torch.testing.assert_close(out[[1, 3]], small_predictor(ROWS[[1, 3]]))
    torch.testing.assert_close(out[[0, 2, 4]], model(ROWS[[0, 2, 4]]))


def test_refuses_a_module_that_is_not_complex():
    with pytest.raises(up.TargetError):
        up.adapt(nn.Sequential(nn.Linear(2, 2)), CQDCalibratorConfig(target_modules=["0"]))


def test_loss_and_config_checks(umls):
    p = torch.tensor([[0.9, 0.1, 0.5]], dtype=torch.float64)
    ans = torch.tensor([[True, False, False]])
    want = -torch.log(torch.tensor(0.9, dtype=torch.float64)) - (torch.log(torch.tensor(0.9)) +
                                                                   torch.log(torch.tensor(0.5))).double() / 2
    torch.testing.assert_close(query_loss(p, ans), want)
    qs = {"1p": generate_split(umls, "train", "1p", 200, seed=0)}
    assert len(subsample(qs, ["1p"], 0.01, seed=0)["1p"]) == 2  # ceil(1% of 200)
    with pytest.raises(ConfigError, match="no training queries of structure '2p'"):
        subsample(qs, ["2p"], 1.0, seed=0)
    with pytest.raises(ConfigError, match="fraction"):
        CalibrationConfig(fraction=0.0)
    with pytest.raises(ConfigError, match="tnorm"):
        CalibrationConfig(tnorm="max")
