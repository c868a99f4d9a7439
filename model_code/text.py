"""Transcript normalization: one function that every step uses to turn raw text into labels.

What: :func:`normalize_text` maps a landing-zone transcript onto the model's alphabet
(by default lowercase ``a-z``, apostrophe and space) and raises :class:`TextRejected`
with a machine ``reason`` and a readable ``message`` when it cannot.

Why: training labels, golden references and decoded hypotheses must be normalized the
same way, or WER measures normalization differences instead of recognition errors.

Rules, in order:

1. Unicode NFKC; typographic apostrophes (’ ‘ ʼ ´ `) become ``'``.
2. Digits. Default policy ``digits="spell"``: numbers are written out in English words:
   integers 0 … 999,999,999 (``"1,200"`` and ``"1200"`` → ``one thousand two hundred``),
   ordinals with an English suffix (``1st`` → ``first``, ``22nd`` → ``twenty second``),
   decimals (``3.14`` → ``three point one four``) and a trailing ``%`` (→ ``percent``).
   A number outside that range is rejected (``number_out_of_range``); no year-style
   reading (``1999`` → ``one thousand nine hundred ninety nine``). Policy
   ``digits="reject"`` rejects any transcript containing a digit (``digits``).
3. Lowercase (``lowercase=True``).
4. Accents are folded when the folded letter is allowed (``café`` → ``cafe``).
5. Punctuation (``strip_punctuation=True``): hyphens, slashes and dashes become spaces
   (``well-known`` → ``well known``); every other Unicode punctuation or symbol is
   dropped. An apostrophe is kept only *inside* a word (``don't``, ``o'clock``); quotes
   and leading/trailing apostrophes are dropped (``'hello'`` → ``hello``).
6. Whitespace collapsed to single spaces and stripped (``collapse_whitespace=True``).
7. What remains must use only ``allowed_chars`` (``disallowed_chars``, listing them) and
   must not be empty (``empty_text``).

Plain arguments only: this module never imports ``pipeline_tasks`` or Airflow.
"""

from __future__ import annotations

import re
import unicodedata

DEFAULT_ALLOWED = "abcdefghijklmnopqrstuvwxyz' "
MAX_SPELLED = 999_999_999

_ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
]  # fmt: skip
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = [(1_000_000, "million"), (1_000, "thousand")]
_ORDINAL_WORD = {
    "one": "first", "two": "second", "three": "third", "four": "fourth", "five": "fifth", "six": "sixth",
    "seven": "seventh", "eight": "eighth", "nine": "ninth", "ten": "tenth", "eleven": "eleventh",
    "twelve": "twelfth", "thirteen": "thirteenth", "fourteen": "fourteenth", "fifteen": "fifteenth",
    "sixteen": "sixteenth", "seventeen": "seventeenth", "eighteen": "eighteenth", "nineteen": "nineteenth",
    "twenty": "twentieth", "thirty": "thirtieth", "forty": "fortieth", "fifty": "fiftieth", "sixty": "sixtieth",
    "seventy": "seventieth", "eighty": "eightieth", "ninety": "ninetieth", "hundred": "hundredth",
    "thousand": "thousandth", "million": "millionth", "zero": "zeroth",
}  # fmt: skip
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u00b4": "'", "`": "'"})
# a number: 1,234,567 or 1234 with optional decimals, ordinal suffix or percent sign
_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(st|nd|rd|th)?(%)?(?![\w])", re.IGNORECASE)
_SPACE_LIKE = set("-\u2010\u2011\u2012\u2013\u2014\u2015/\\_|")


class TextRejected(Exception):
    """A transcript that cannot be normalized. ``reason`` is a machine code, ``message`` says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):  # picklable across a process pool
        return (type(self), (self.reason, self.message))


def number_to_words(n: int) -> str:
    """English words for an integer 0 … 999,999,999 (``105`` → ``one hundred five``)."""
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError("number_to_words takes an int")
    if n < 0 or n > MAX_SPELLED:
        raise ValueError(f"{n} is outside 0..{MAX_SPELLED}")
    if n < 20:
        return _ONES[n]
    words: list[str] = []
    for scale, name in _SCALES:
        if n >= scale:
            words += [_below_thousand(n // scale), name]
            n %= scale
    if n:
        words.append(_below_thousand(n))
    return " ".join(words)


def _below_thousand(n: int) -> str:
    parts: list[str] = []
    if n >= 100:
        parts += [_ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        parts.append(_TENS[n // 10])
        n %= 10
        if n:
            parts.append(_ONES[n])
    elif n or not parts:
        parts.append(_ONES[n])
    return " ".join(parts)


def ordinal_to_words(n: int) -> str:
    """English ordinal words (``21`` → ``twenty first``, ``100`` → ``one hundredth``)."""
    words = number_to_words(n).split()
    words[-1] = _ORDINAL_WORD[words[-1]]
    return " ".join(words)


def _spell_numbers(text: str) -> str:
    def repl(m: re.Match[str]) -> str:
        digits, frac, suffix, pct = m.group(1), m.group(2), m.group(3), m.group(4)
        value = int(digits.replace(",", ""))
        if value > MAX_SPELLED:
            raise TextRejected("number_out_of_range", f"number {m.group(0)!r} is above {MAX_SPELLED:,} (not spelled)")
        if suffix and not frac:
            out = ordinal_to_words(value)
        else:
            out = number_to_words(value)
            if frac:
                out += " point " + " ".join(_ONES[int(d)] for d in frac)
        if pct:
            out += " percent"
        return f" {out} "

    out = _NUMBER.sub(repl, text)
    if any(ch.isdigit() for ch in out):
        bad = sorted({tok for tok in out.split() if any(c.isdigit() for c in tok)})
        raise TextRejected("digits_unspellable", f"cannot spell digits in {', '.join(map(repr, bad))}")
    return out


def _fold(ch: str, allowed: str) -> str:
    if ch in allowed:
        return ch
    base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
    return base if base and all(c in allowed for c in base) else ch


def _strip_punct(text: str) -> str:
    out: list[str] = []
    n = len(text)
    for i, ch in enumerate(text):
        if ch == "'":
            prev_ok = i > 0 and text[i - 1].isalnum()
            next_ok = i + 1 < n and text[i + 1].isalnum()
            out.append("'" if prev_ok and next_ok else "")
        elif ch in _SPACE_LIKE:
            out.append(" ")
        elif unicodedata.category(ch)[0] in "PS":
            out.append("")
        else:
            out.append(ch)
    return "".join(out)


def normalize_text(
    text: str,
    lowercase: bool = True,
    strip_punctuation: bool = True,
    collapse_whitespace: bool = True,
    digits: str = "spell",
    allowed_chars: str = DEFAULT_ALLOWED,
) -> str:
    """Normalize a transcript (see the module docstring for the rules); default digit policy is ``spell``.

    Raises :class:`TextRejected` with reason ``text_not_string``, ``empty_text``,
    ``digits`` (policy ``reject``), ``number_out_of_range``, ``digits_unspellable`` or
    ``disallowed_chars``.
    """
    if not isinstance(text, str):
        raise TextRejected("text_not_string", f"transcript is {type(text).__name__}, not a string")
    if digits not in ("spell", "reject"):
        raise ValueError(f"digits must be 'spell' or 'reject', not {digits!r}")
    s = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES)
    if not s.strip():
        raise TextRejected("empty_text", "transcript is empty")
    if any(ch.isdigit() for ch in s):
        if digits == "reject":
            raise TextRejected("digits", f"transcript contains digits (policy 'reject'): {text!r}")
        s = _spell_numbers(s)
    if lowercase:
        s = s.lower()
    s = "".join(_fold(ch, allowed_chars) for ch in s)
    if strip_punctuation:
        s = _strip_punct(s)
    if collapse_whitespace:
        s = " ".join(s.split())
    if not s:
        raise TextRejected("empty_text", f"transcript is empty after normalization (raw: {text!r})")
    bad = sorted({ch for ch in s if ch not in allowed_chars})
    if bad:
        raise TextRejected("disallowed_chars", f"characters not in the alphabet: {''.join(bad)!r} in {s!r}")
    return s
