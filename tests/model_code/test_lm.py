"""ARPA n-gram LM (interpolated Kneser-Ney) and lexicon: KenLM loads them, scores make sense."""

from __future__ import annotations

import re

import pytest
from flashlight.lib.text.dictionary import Dictionary, load_words

try:
    from flashlight.lib.text.decoder.kenlm import KenLM
except ImportError:  # older flashlight-text layout
    from flashlight.lib.text.decoder import KenLM

from model_code.lm import build_arpa, build_lexicon, lexicon_words
from model_code.tokenizer import CharTokenizer

TEXTS = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog", "the cat ran away",
         "a dog ran"]


def load(tmp_path, texts, order):
    path = tmp_path / f"lm{order}.arpa"
    path.write_text(build_arpa(texts, order=order))
    words = sorted({w for t in texts for w in t.split()}) + ["<unk>"]
    wd = Dictionary(words)
    return KenLM(str(path), wd), wd, words, path


def sentence_logprob(lm, wd, sentence):
    state = lm.start(False)
    total = 0.0
    for w in sentence.split():
        state, s = lm.score(state, wd.get_index(w))
        total += s
    _, s = lm.finish(state)
    return total + s


@pytest.mark.parametrize("order", [2, 3, 4])
def test_kenlm_loads_and_distributions_normalize(tmp_path, order):
    lm, wd, words, path = load(tmp_path, TEXTS, order)
    text = path.read_text()
    # header counts match the sections
    for n in range(1, order + 1):
        declared = int(re.search(rf"ngram {n}=(\d+)", text).group(1))
        section = text.split(f"\\{n}-grams:\n")[1].split("\n\n")[0].splitlines()
        assert declared == len(section)
    # every conditional distribution (over words, </s> and <unk>) sums to one
    for ctx in ([], ["the"], ["sat", "on"], ["dog", "cat"], ["mat"]):
        state = lm.start(False)
        for w in ctx:
            state, _ = lm.score(state, wd.get_index(w))
        total = sum(10 ** lm.score(state, wd.get_index(w))[1] for w in words)
        total += 10 ** lm.finish(state)[1]
        assert abs(total - 1.0) < 1e-3, (ctx, total)


def test_seen_sentences_beat_unseen(tmp_path):
    lm, wd, _, _ = load(tmp_path, TEXTS, 3)
    for seen in TEXTS:
        unseen = " ".join(reversed(seen.split()))
        assert sentence_logprob(lm, wd, seen) > sentence_logprob(lm, wd, unseen)
    # a seen trigram continuation beats an unseen one with the same words
    assert sentence_logprob(lm, wd, "the cat sat") > sentence_logprob(lm, wd, "the log sat")


def test_unigram_order_rejected():
    with pytest.raises(ValueError, match="bigram"):
        build_arpa(TEXTS, order=1)


def test_empty_corpus_still_loads(tmp_path):
    lm, wd, _, _ = load(tmp_path, ["", "   "], 3)
    state = lm.start(False)
    assert lm.finish(state)[1] < 0


def test_lexicon_format_for_characters(tmp_path):
    tok = CharTokenizer()
    text = build_lexicon(["the", "cat", "cat", "it's", "caf\u00e9"], tok)
    lines = text.splitlines()
    assert lines == ["cat\tc a t |", "it's\ti t ' s |", "the\tt h e |"]  # café dropped
    (tmp_path / "lex.txt").write_text(text)
    lex = load_words(str(tmp_path / "lex.txt"))
    assert lex["cat"] == [["c", "a", "t", "|"]]
    assert lexicon_words(["b a", "a c"]) == ["a", "b", "c"]
