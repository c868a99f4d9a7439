"""model_code.text: transcript normalization rules and rejections."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model_code.text import DEFAULT_ALLOWED, TextRejected, normalize_text, number_to_words, ordinal_to_words


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("Hello, World!", "hello world"),
        ("I don\u2019t know -- it's 5 PM.", "i don't know it's five pm"),
        ("'quoted' words", "quoted words"),
        ("well-known/fast", "well known fast"),
        ("Caf\u00e9 na\u00efve", "cafe naive"),
        ("The 21st of 1,200 items", "the twenty first of one thousand two hundred items"),
        ("3.14% up", "three point one four percent up"),
        ("  many\t\nspaces  ", "many spaces"),
        ("room 0", "room zero"),
    ],
)
def test_normalizes(raw, want):
    assert normalize_text(raw) == want


@pytest.mark.parametrize(
    ("n", "words"),
    [
        (0, "zero"),
        (13, "thirteen"),
        (40, "forty"),
        (105, "one hundred five"),
        (999_999, "nine hundred ninety nine thousand nine hundred ninety nine"),
        (1_000_001, "one million one"),
    ],
)
def test_number_to_words(n, words):
    assert number_to_words(n) == words


def test_ordinals():
    assert [ordinal_to_words(n) for n in (1, 2, 3, 12, 20, 22, 100)] == [
        "first", "second", "third", "twelfth", "twentieth", "twenty second", "one hundredth",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "kwargs", "reason"),
    [
        ("", {}, "empty_text"),
        ("   ", {}, "empty_text"),
        ("?!...", {}, "empty_text"),
        ("call 911", {"digits": "reject"}, "digits"),
        ("12345678901 stars", {}, "number_out_of_range"),
        ("model x2y", {}, "digits_unspellable"),
        ("\u4f60\u597d world", {}, "disallowed_chars"),
        (None, {}, "text_not_string"),
    ],
)
def test_rejects_with_reason(raw, kwargs, reason):
    with pytest.raises(TextRejected) as ei:
        normalize_text(raw, **kwargs)
    assert ei.value.reason == reason and ei.value.message


def test_options_off_keep_case_and_punctuation():
    allowed = DEFAULT_ALLOWED + "ABCDEFGHIJKLMNOPQRSTUVWXYZ,."
    assert normalize_text("Hi, There.", lowercase=False, strip_punctuation=False, allowed_chars=allowed) == "Hi, There."


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=40))
def test_output_is_in_alphabet_and_idempotent(s):
    try:
        out = normalize_text(s)
    except TextRejected:
        return
    assert out and set(out) <= set(DEFAULT_ALLOWED)
    assert out == out.strip() and "  " not in out
    assert normalize_text(out) == out
