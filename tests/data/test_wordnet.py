"""The WordNet define-a-word source: held-out words, deterministic splits, chat rendering."""
from __future__ import annotations

from pathlib import Path

import pytest

from unipeft.data.encode import IGNORE, chat_prompt, encode_prompt_completion
from unipeft.data.splits import DataError
from unipeft.data.wordnet import WORDNET_DIR, load_wordnet

needs_wordnet = pytest.mark.skipif(not Path(WORDNET_DIR, "index.noun").is_file(),
                                   reason="Debian package wordnet-base not installed")


def _words(split) -> set[str]:
    return {p.split('"')[1] for p in split.prompts}


@needs_wordnet
def test_splits_hold_out_whole_words_and_repeat_by_seed():
    s = load_wordnet(0, [0.8, 0.1, 0.1], max_examples=600)
    assert 600 <= sum(s.sizes().values()) < 610  # whole words: the last one may add a few senses
    train, valid, test = _words(s.train), _words(s.valid), _words(s.test)
    assert not train & test and not train & valid and not valid & test
    assert 0.75 < len(train) / len(train | valid | test) < 0.85
    again = load_wordnet(0, [0.8, 0.1, 0.1], max_examples=600)
    assert again.test.prompts == s.test.prompts and again.test.completions == s.test.completions
    assert load_wordnet(1, [0.8, 0.1, 0.1], max_examples=600).test.prompts != s.test.prompts


@needs_wordnet
def test_examples_are_definitions_without_glossed_examples():
    s = load_wordnet(0, [0.8, 0.1, 0.1], pos=["noun"])
    pairs = dict(zip(s.train.prompts + s.test.prompts + s.valid.prompts,
                     s.train.completions + s.test.completions + s.valid.completions))
    assert len(pairs) > 5000
    assert pairs['Define the word "cat" (a noun).'] == (
        "Feline mammal usually having thick soft fur and no ability to roar: domestic cats; wildcats.")
    assert all('"' not in c and c.endswith(".") and not c[0].islower() for c in pairs.values())


def test_bad_wordnet_input(tmp_path):
    with pytest.raises(DataError, match="data.pos: unknown part of speech 'nouns'"):
        load_wordnet(0, [0.8, 0.1, 0.1], pos=["nouns"])
    with pytest.raises(DataError, match="install WordNet with: sudo apt-get install wordnet-base"):
        load_wordnet(0, [0.8, 0.1, 0.1], directory=str(tmp_path))


class _Tok:
    """A character tokenizer with a minimal chat template (enough to check the encoding)."""

    bos_token_id, eos_token_id, name_or_path = 1, 2, "char-tok"
    chat_template = "yes"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [10 + ord(c) % 50 for c in text]}

    def apply_chat_template(self, turns, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return f"<u>{turns[0]['content']}</u><a>"


def test_chat_encoding_has_no_bos_and_loss_on_the_answer_only():
    tok = _Tok()
    ids, labels = encode_prompt_completion(tok, "hi", "ok", 64, chat=True)
    head = tok(chat_prompt(tok, "hi"))["input_ids"]
    assert ids == head + tok("ok")["input_ids"] + [2]  # the template brings its own start; eos ends the turn
    assert labels == [IGNORE] * len(head) + tok("ok")["input_ids"] + [2]
    plain, _ = encode_prompt_completion(tok, "hi", "ok", 64)
    assert plain[0] == 1 and plain[1:3] == tok("hi")["input_ids"]


def test_chat_without_a_template_is_one_clear_error():
    tok = _Tok()
    tok.chat_template = None
    with pytest.raises(DataError, match="tokenizer of 'char-tok' has no chat template"):
        encode_prompt_completion(tok, "hi", "ok", 64, chat=True)
