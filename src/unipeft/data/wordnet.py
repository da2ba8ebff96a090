"""Instruction data from WordNet (Debian `wordnet-base`): define a word from its gloss.

Each example is one word's most frequent sense (the first synset of the word in index.<pos>):
prompt 'Define the word "X" (a noun).', completion the gloss's definition (the text before its
quoted examples). Only single-word lemmas with a tagged sense count (common words) are used.
Splits are by word (all senses of a word in one split): a test word never appears in training, so the test split measures how well
the adapted model defines words it was not trained on.
"""
from __future__ import annotations

import random
from pathlib import Path

from .splits import DataError, PromptCompletions, Splits, check_fractions

WORDNET_DIR = "/usr/share/wordnet"
WORDNET_INSTALL = "sudo apt-get install wordnet-base"
POS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
ARTICLE = {"noun": "a noun", "verb": "a verb", "adj": "an adjective", "adv": "an adverb"}


def _definition(gloss: str) -> str:
    """The definition part of a gloss: up to the first quoted example, without trailing separators."""
    text = gloss.split('"', 1)[0].strip().rstrip(";:").strip()
    return text[:1].upper() + text[1:] + ("." if text and not text.endswith(".") else "")


def _synset_glosses(path: Path, offsets: set[int]) -> dict[int, str]:
    """gloss of each wanted synset offset of one data.<pos> file."""
    out: dict[int, str] = {}
    with path.open(encoding="latin-1") as fh:
        for line in fh:
            if line.startswith("  ") or "|" not in line:
                continue  # licence header
            offset = int(line.split(" ", 1)[0])
            if offset in offsets:
                out[offset] = line.split("|", 1)[1].strip()
    return out


def _first_senses(path: Path) -> dict[str, int]:
    """word -> offset of its most frequent sense, for single-word lemmas with a tagged sense count."""
    out: dict[str, int] = {}
    with path.open(encoding="latin-1") as fh:
        for line in fh:
            if line.startswith("  "):
                continue
            f = line.split()
            lemma, pointers = f[0], int(f[3])
            tagged = int(f[5 + pointers])
            if tagged > 0 and lemma.isalpha() and len(lemma) > 2:
                out[lemma] = int(f[6 + pointers])  # synsets are listed most frequent first
    return out


def load_wordnet(seed: int, split: list[float], pos: list[str] | None = None, max_examples: int | None = None,
                 directory: str | None = None) -> Splits:
    """Define-a-word pairs, split by word (train/valid/test fractions), shuffled by `seed`."""
    fractions = check_fractions(split)
    root = Path(directory or WORDNET_DIR)
    parts = list(pos) if pos else ["noun", "verb", "adj", "adv"]
    unknown = [p for p in parts if p not in POS]
    if unknown:
        raise DataError(f"data.pos: unknown part of speech {unknown[0]!r}; expected some of {list(POS)}")
    by_word: dict[str, list[tuple[str, str]]] = {}
    for p in parts:
        index, data = root / f"index.{p}", root / f"data.{p}"
        if not index.is_file() or not data.is_file():
            raise DataError(f"data.source 'wordnet': {index} not found; install WordNet with: {WORDNET_INSTALL}")
        senses = _first_senses(index)
        glosses = _synset_glosses(data, set(senses.values()))
        for word in sorted(senses):
            definition = _definition(glosses.get(senses[word], ""))
            if len(definition) > 3:
                by_word.setdefault(word, []).append((f'Define the word "{word}" ({ARTICLE[p]}).', definition))
    words = sorted(by_word)
    random.Random(seed).shuffle(words)
    if max_examples is not None:  # whole words, until the examples reach max_examples
        kept, count = [], 0
        for w in words:
            if count >= max_examples:
                break
            kept.append(w)
            count += len(by_word[w])
        words = kept
    if len(words) < 3:
        raise DataError(f"data.source 'wordnet': only {len(words)} words in {root}; expected at least 3")
    n_train = max(1, int(round(fractions[0] * len(words))))
    n_valid = int(round(fractions[1] * len(words)))
    cuts = [words[:n_train], words[n_train:n_train + n_valid], words[n_train + n_valid:]]
    pairs = [[pair for w in cut for pair in by_word[w]] for cut in cuts]
    return Splits(*(PromptCompletions([p for p, _ in c], [d for _, d in c]) for c in pairs))
