"""Target selection: list = exact or '.'-suffix, str = regex fullmatch, all-linear, excludes, layers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import unipeft as up
from unipeft.core.targets import layer_index, name_matches, select_targets

from ..invariants.cases import build_model


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(4, 4)
        self.value = nn.Linear(4, 4)
        self.my_query = nn.Linear(4, 4)   # '.query' is not a suffix of '.my_query'
        self.xquery = nn.Linear(4, 4)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = Attention()
        self.mlp = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


class Toy(nn.Module):
    """encoder.layer.{0,1,2}.*, decoder.blocks.{0,1}.*, lm_head (the output embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([Block() for _ in range(3)])
        self.decoder = nn.Module()
        self.decoder.blocks = nn.ModuleList([Block() for _ in range(2)])
        self.lm_head = nn.Linear(4, 7)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, x):
        for block in [*self.encoder.layer, *self.decoder.blocks]:
            a = block.attention
            x = block.norm(x + a.query(x) + a.value(x) + a.my_query(x) + a.xquery(x) + block.mlp(x))
        return self.lm_head(x)


def selected(**fields) -> list[str]:
    cfg = up.LoraConfig(r=1, **fields)
    return [p for p, _ in select_targets(Toy(), cfg, up.get_method("lora").capabilities.layer_types)]


def test_list_matches_exact_names_or_suffixes_on_a_dot_boundary():
    assert selected(target_modules=["query"]) == [f"encoder.layer.{i}.attention.query" for i in range(3)] + \
        [f"decoder.blocks.{i}.attention.query" for i in range(2)]
    assert selected(target_modules=["layer.1.attention.query", "lm_head"]) == ["encoder.layer.1.attention.query",
                                                                              "lm_head"]
    assert selected(target_modules=["encoder.layer.0.attention.value"]) == ["encoder.layer.0.attention.value"]
    with pytest.raises(up.TargetError, match="matched no module"):
        selected(target_modules=["ttention.query"])  # not on a '.' boundary
    with pytest.raises(up.TargetError, match="matched no module"):
        selected(target_modules=["uery"])
    assert name_matches("a.b.query", ["query"]) and name_matches("query", ["query"])
    assert not name_matches("a.b.my_query", ["query"]) and not name_matches("a.bquery", ["b.query"])


def test_string_is_a_regex_fullmatch():
    assert selected(target_modules=r".*\.query") == selected(target_modules=["query"])
    assert selected(target_modules=r"encoder\.layer\.[02]\.attention\.(query|value)") == [
        "encoder.layer.0.attention.query", "encoder.layer.0.attention.value",
        "encoder.layer.2.attention.query", "encoder.layer.2.attention.value"]
    with pytest.raises(up.TargetError, match="matched no module"):
        selected(target_modules="query")  # fullmatch, not search
    assert len(selected(target_modules=r".*query")) == 15  # query, my_query and xquery in 5 blocks


def test_all_linear_excludes_the_output_head():
    chosen = selected(target_modules="all-linear")
    assert "lm_head" not in chosen
    assert len(chosen) == 5 * 5  # four attention projections and the mlp in each of 5 blocks
    gpt2 = build_model("gpt2")
    cfg = up.LoraConfig(r=1, target_modules="all-linear")
    paths = [p for p, _ in select_targets(gpt2, cfg, up.get_method("lora").capabilities.layer_types)]
    assert "lm_head" not in paths
    assert {p.rsplit(".", 1)[-1] for p in paths} == {"c_attn", "c_proj", "c_fc"}  # GPT-2's Conv1D layers
    assert len(paths) == 2 * 4


def test_exclude_modules():
    assert selected(target_modules=["query", "value"], exclude_modules=["value"]) == selected(target_modules=["query"])
    assert selected(target_modules=["query"], exclude_modules=r"decoder\..*") == [
        f"encoder.layer.{i}.attention.query" for i in range(3)]
    chosen = selected(target_modules="all-linear", exclude_modules=["attention.my_query", "xquery", "mlp"])
    assert {p.rsplit(".", 1)[-1] for p in chosen} == {"query", "value"}
    with pytest.raises(up.TargetError, match="after exclude_modules"):
        selected(target_modules=["query"], exclude_modules=["query"])


def test_layers_to_transform_with_layers_pattern():
    assert selected(target_modules=["query"], layers_to_transform=[1]) == [
        "encoder.layer.1.attention.query", "decoder.blocks.1.attention.query"]
    assert selected(target_modules=["query"], layers_to_transform=1, layers_pattern="blocks") == [
        "decoder.blocks.1.attention.query"]
    assert selected(target_modules=["query"], layers_to_transform=[0, 2], layers_pattern="layer") == [
        "encoder.layer.0.attention.query", "encoder.layer.2.attention.query"]
    assert selected(target_modules=["query"], layers_to_transform=[0], layers_pattern=["layer", "blocks"]) == [
        "encoder.layer.0.attention.query", "decoder.blocks.0.attention.query"]
    with pytest.raises(up.TargetError, match="layers_to_transform"):
        selected(target_modules=["query"], layers_to_transform=[2], layers_pattern="blocks")
    assert layer_index("encoder.layer.3.attention.query", None) == 3
    assert layer_index("encoder.layer.3.attention.query", "layer") == 3
    assert layer_index("encoder.layer.3.attention.query", "blocks") is None
    assert layer_index("model.layers.12.mlp.up_proj", ["layers"]) == 12
    assert layer_index("lm_head", None) is None


def test_layers_to_transform_on_a_real_model():
    model = build_model("llama")
    cfg = up.LoraConfig(r=1, target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers")
    adapted = up.adapt(model, cfg)
    assert [s.path for s in adapted.sites()] == ["model.layers.1.self_attn.q_proj"]


def test_modules_to_save_are_not_targets():
    cfg = up.LoraConfig(r=1, target_modules=["query", "lm_head"], modules_to_save=["lm_head"])
    adapted = up.adapt(Toy(), cfg)
    site = {s.path: s for s in adapted.sites()}["lm_head"]
    assert [type(d).__name__ for d in site.deltas.values()] == ["ModulesToSaveDelta"]


def test_targeting_a_container_of_unsupported_type_raises():
    with pytest.raises(up.TargetError, match="'encoder.layer.0.attention' is a Attention"):
        selected(target_modules=["encoder.layer.0.attention"])


def test_adapt_selects_exactly_the_listed_modules():
    model = Toy()
    x = torch.randn(2, 4)
    adapted = up.adapt(model, up.LoraConfig(r=1, target_modules=["query"], exclude_modules=["layer.0.attention.query"]))
    assert sorted(s.path for s in adapted.sites()) == sorted(
        ["encoder.layer.1.attention.query", "encoder.layer.2.attention.query",
         "decoder.blocks.0.attention.query", "decoder.blocks.1.attention.query"])
    assert adapted(x).shape == (2, 7)
