"""Error counts via jiwer: identities, known values, empty references."""

from __future__ import annotations

import jiwer
from hypothesis import given, settings
from hypothesis import strategies as st

from model_code.metrics import error_counts, per_utterance_counts

word = st.text(alphabet="abcde'", min_size=1, max_size=5)
sentence = st.lists(word, max_size=8).map(" ".join)
pairs = st.lists(st.tuples(sentence, sentence), min_size=1, max_size=6)


def test_known_values():
    c = error_counts(["the cat sat", "a dog"], ["the bat sat down", "a"])
    assert (c["substitutions"], c["deletions"], c["insertions"], c["hits"]) == (1, 1, 1, 3)
    assert c["ref_words"] == 5 and abs(c["wer"] - 3 / 5) < 1e-12
    assert c["ref_chars"] == len("the cat sat") + len("a dog")
    assert abs(c["cer"] - jiwer.cer(["the cat sat", "a dog"], ["the bat sat down", "a"])) < 1e-12


def test_empty_references_documented_rule():
    c = error_counts(["", "a b"], ["x y", "a b"])
    assert c["insertions"] == 2 and c["ref_words"] == 2 and c["wer"] == 1.0
    assert error_counts([""], [""])["wer"] == 0.0
    assert error_counts([""], ["a"])["wer"] == 1.0  # no reference words but errors: 1.0
    assert error_counts([], [])["wer"] == 0.0
    per = per_utterance_counts(["", "a"], ["", ""])
    assert per[0]["ref_words"] == 0 and per[0]["word_errors"] == 0
    assert per[1] == {"word_errors": 1, "ref_words": 1, "char_errors": 1, "ref_chars": 1,
                      "substitutions": 0, "deletions": 1, "insertions": 0, "hits": 0}


@given(st.lists(sentence, min_size=1, max_size=6))
@settings(max_examples=60, deadline=None)
def test_identity_has_zero_error(refs):
    c = error_counts(refs, refs)
    assert c["wer"] == 0.0 and c["cer"] == 0.0
    assert c["hits"] == c["ref_words"] == sum(len(r.split()) for r in refs)


@given(pairs)
@settings(max_examples=80, deadline=None)
def test_count_identities(ps):
    refs, hyps = [p[0] for p in ps], [p[1] for p in ps]
    c = error_counts(refs, hyps)
    n_ref = sum(len(r.split()) for r in refs)
    n_hyp = sum(len(h.split()) for h in hyps)
    assert c["substitutions"] + c["deletions"] + c["hits"] == n_ref == c["ref_words"]
    assert c["substitutions"] + c["insertions"] + c["hits"] == n_hyp
    assert c["word_errors"] == c["substitutions"] + c["deletions"] + c["insertions"]
    assert c["ref_chars"] == sum(len(r) for r in refs)
    per = per_utterance_counts(refs, hyps)
    assert sum(p["word_errors"] for p in per) == c["word_errors"]
    assert sum(p["char_errors"] for p in per) == c["char_errors"]
    if all(refs):  # jiwer's own rate agrees whenever every reference has words
        assert abs(c["wer"] - jiwer.wer(refs, hyps)) < 1e-9
    # symmetric edit distance: swapping refs and hyps keeps the number of errors
    assert error_counts(hyps, refs)["word_errors"] == c["word_errors"]
