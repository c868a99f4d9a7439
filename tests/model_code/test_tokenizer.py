"""Tokenizers: blank = 0, round trips, serialization, flashlight token list."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from model_code.tokenizer import BPETokenizer, CharTokenizer, ctc_collapse, tokenizer_from_dict

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine",
    "don't count your chickens before they hatch",
    "all that glitters is not gold",
] * 5


def test_char_defaults_and_tokens():
    tok = CharTokenizer()
    assert tok.vocab_size == 29
    assert tok.encode("a b") == [3, 1, 4]
    toks = tok.tokens()
    assert toks[0] == "<blank>" and toks[1] == "|" and toks[2] == "'" and toks[3] == "a"
    assert len(toks) == tok.vocab_size
    assert tok.spell("it's") == ["i", "t", "'", "s", "|"]


@given(st.text(alphabet=" 'abcdefghijklmnopqrstuvwxyz", max_size=60))
@settings(max_examples=60, deadline=None)
def test_char_round_trip(text):
    tok = CharTokenizer()
    ids = tok.encode(text)
    assert all(0 < i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_char_custom_and_dict():
    tok = CharTokenizer(chars=" abc")
    assert tok.vocab_size == 5
    assert tok.encode("abz c") == [2, 3, 1, 4]  # z is not in the vocabulary: dropped
    back = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert back == tok and back.encode("cab") == tok.encode("cab")


def test_ctc_collapse():
    assert ctc_collapse([0, 3, 3, 0, 3, 1, 1, 0]) == [3, 3, 1]


def test_bpe_train_round_trip_and_dict():
    tok = BPETokenizer.train(TEXTS, vocab_size=40)
    assert 10 < tok.vocab_size <= 40
    ids = tok.encode("the lazy fox")
    assert ids and 0 not in ids and max(ids) < tok.vocab_size
    assert tok.decode(ids) == "the lazy fox"
    toks = tok.tokens()
    assert toks[0] == "<blank>" and len(toks) == tok.vocab_size
    assert "".join(tok.spell("gold")).replace("\u2581", "") == "gold"
    back = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert isinstance(back, BPETokenizer) and back.encode("the lazy fox") == ids
