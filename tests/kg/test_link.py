"""ComplEx-N3: the scoring function, the N3 penalty, training that beats chance, save/load."""
from __future__ import annotations

import torch

from unipeft.core.errors import ConfigError
from unipeft.kg.complex import ComplEx, LinkPredictor
from unipeft.kg.link import (LinkConfig, evaluate_link_predictor, load_link_predictor, save_link_predictor,
                             with_reciprocals)

from .conftest import SMALL_LINK


def test_complex_score_is_re_of_the_trilinear_product():
    torch.manual_seed(0)
    model = ComplEx(5, 3, rank=4)
    with torch.no_grad():
        model.entity.normal_()
        model.relation.normal_()
    k = 4
    e = torch.complex(model.entity[:, :k], model.entity[:, k:])
    w = torch.complex(model.relation[:, :k], model.relation[:, k:])
    x = torch.tensor([[1, 2], [4, 0]])
    want = torch.stack([(e[h] * w[r] * e.conj()).sum(-1).real for h, r in x.tolist()])
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    scores, n3 = model.forward_with_factors(x, torch.tensor([3, 3]))
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-5)
    want_n3 = sum((f.abs() ** 3).sum() for f in (e[x[:, 0]], w[x[:, 1]], e[torch.tensor([3, 3])]))
    torch.testing.assert_close(n3, want_n3, rtol=1e-5, atol=1e-5)


def test_training_beats_chance_by_a_wide_margin(umls, small_predictor):
    """Filtered test MRR: a random ComplEx ranks near chance (~0.05 here); training must add >= 0.5."""
    torch.manual_seed(0)
    random_model = LinkPredictor(umls.n_entities, 2 * umls.n_relations, SMALL_LINK.rank)
    chance = evaluate_link_predictor(random_model, umls, "test")["mrr"]
    trained = evaluate_link_predictor(small_predictor, umls, "test")
    assert chance < 0.15
    assert trained["mrr"] >= chance + 0.5, (chance, trained)
    assert trained["hits@10"] > 0.9 and trained["n_queries"] == 2 * 661


def test_save_load_round_trip(tmp_path, small_predictor):
    save_link_predictor(small_predictor, tmp_path, meta={"dataset": "umls"})
    again = load_link_predictor(tmp_path)
    x = torch.tensor([[0, 1], [5, 60]])
    assert torch.equal(again(x), small_predictor(x))


def test_reciprocals_and_bad_config():
    t = torch.tensor([[0, 1, 2]])
    assert with_reciprocals(t, 5).tolist() == [[0, 1, 2], [2, 6, 0]]
    for bad in ({"rank": 0}, {"epochs": -1}, {"lr": 0.0}, {"reg": -1.0}):
        try:
            LinkConfig(**bad)
        except ConfigError as exc:
            assert "LinkConfig" in str(exc)
        else:
            raise AssertionError(f"LinkConfig({bad}) was accepted")


def test_load_errors_name_the_file(tmp_path, small_predictor):
    import pytest
    with pytest.raises(FileNotFoundError, match="no predictor.json"):
        load_link_predictor(tmp_path)
    (tmp_path / "predictor.json").write_text('{"n_entities": 3}')
    with pytest.raises(ConfigError, match="predictor.json: expected JSON with n_entities, n_relations and rank"):
        load_link_predictor(tmp_path)
    save_link_predictor(small_predictor, tmp_path)
    (tmp_path / "predictor.json").write_text('{"n_entities": 3, "n_relations": 2, "rank": 16}')
    with pytest.raises(ConfigError, match="does not fit predictor.json's sizes"):
        load_link_predictor(tmp_path)
