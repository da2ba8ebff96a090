"""Local files, encoding (prompt masking, dynamic padding) and batch orders."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from unipeft.data import (IGNORE, DataError, LabeledTexts, PromptCompletions, collate, encode_split,
                          epoch_batches, eval_batches, micro_batches)
from unipeft.data.files import read_labeled_texts, read_prompt_completions
from tests.train._helpers import minilm_tokenizer_path


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(minilm_tokenizer_path())


def test_csv_jsonl_text_read_the_same(tmp_path):
    rows = [("good day", "pos"), ("bad day", "neg"), ("fine, thanks", "pos")]
    (tmp_path / "a.csv").write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    (tmp_path / "a.txt").write_text("".join(f"{y}\t{t}\n" for t, y in rows))
    got = [read_labeled_texts(tmp_path / f"a.{ext}") for ext in ("csv", "jsonl", "txt")]
    for g in got:
        assert g.texts == ["good day", "bad day", "fine, thanks"] and g.labels == [1, 0, 1]
        assert g.label_names == ["neg", "pos"]


@pytest.mark.parametrize("content,match", [
    (None, "does not exist"), ("", "is empty"), ("text,label\n\"unclosed,x\n", "line 2 does not have the 2 fields"),
    ("text,topic\nhi,a\nho,b\n", "no label column 'label'; columns are \\['text', 'topic'\\]"),
])
def test_bad_csv(tmp_path, content, match):
    path = tmp_path / "d.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match):
        read_labeled_texts(path)


def test_garbled_jsonl_and_binary(tmp_path):
    (tmp_path / "g.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": oops\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_labeled_texts(tmp_path / "g.jsonl")
    (tmp_path / "b.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(DataError, match="not UTF-8"):
        read_labeled_texts(tmp_path / "b.csv")


def test_prompt_tokens_carry_no_loss(tok, tmp_path):
    data = PromptCompletions(["Q: two plus two? A:"], [" four"])
    enc = encode_split(tok, data, max_length=64)
    ids, labels = enc.rows[0]["input_ids"], enc.rows[0]["labels"]
    n_prompt = 1 + len(tok("Q: two plus two? A:", add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.sep_token_id
    assert enc.weights == [len(ids) - n_prompt]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "hi", "completion": "there"}) + "\n")
    assert read_prompt_completions(tmp_path / "p.jsonl").completions == ["there"]


def test_dynamic_padding(tok):
    enc = encode_split(tok, LabeledTexts(["a", "a b c d e f", "a b"], [0, 1, 0], ["x", "y"]), max_length=5)
    assert enc.lengths == [3, 5, 4]  # [CLS] ... [SEP], truncated to 5
    batch = collate([enc.rows[0], enc.rows[2]], pad_id=0)
    assert batch["input_ids"].shape == (2, 4)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [0, 0]


def test_length_grouping_reduces_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (960,), generator=g).tolist()

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped = epoch_batches(lengths, 16, seed=0, epoch=0, group_by_length=True)
    plain = epoch_batches(lengths, 16, seed=0, epoch=0, group_by_length=False)
    assert sorted(i for b in grouped for i in b) == list(range(960))
    assert padding(grouped) < 0.1 * padding(plain)
    assert grouped == epoch_batches(lengths, 16, seed=0, epoch=0)
    assert grouped != epoch_batches(lengths, 16, seed=0, epoch=1)


def test_drop_last_and_micro_batches():
    batches = epoch_batches([1] * 21, 8, seed=0, epoch=0, group_by_length=False)
    assert [len(b) for b in batches] == [8, 8]
    batch = list(range(10))
    parts = [micro_batches(batch, r, 2, 2) for r in range(2)]
    assert parts == [[[0, 1, 2], [3, 4, 5]], [[6, 7], [8, 9]]]
    assert sorted(i for r in range(2) for b in eval_batches([1] * 7, 2, r, 2) for i in b) == list(range(7))
