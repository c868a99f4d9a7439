"""Text tokenizers for CTC: characters (default) and sentencepiece BPE.

Both reserve id 0 for the CTC blank, so ``log_probs[..., 0]`` is always the blank
and a model's output size is ``tokenizer.vocab_size``. Both serialize to a small
JSON-able dict (``to_dict``) that is stored in the packaged model's ``model.json``;
``tokenizer_from_dict`` rebuilds either kind.

``tokens()`` returns the index-aligned symbol strings that flashlight's decoder
dictionary needs: index 0 is ``"<blank>"`` and the word separator (the space for
characters) is spelled ``"|"``, flashlight's silence/word-boundary token.
"""

from __future__ import annotations

import base64
import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

BLANK = "<blank>"
WORD_SEP = "|"  # how the space is spelled for flashlight (its silence token)
DEFAULT_CHARS = " '" + "abcdefghijklmnopqrstuvwxyz"


class CharTokenizer:
    """Character vocabulary: id 0 = blank, ids 1.. = ``chars`` in order.

    Default ``chars`` = space, apostrophe, a–z → ``vocab_size`` 29. Characters that
    are not in the vocabulary are dropped by :meth:`encode` (the text normalizer
    upstream already restricts text to the allowed characters).
    """

    kind = "char"

    def __init__(self, chars: str = DEFAULT_CHARS) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer: duplicate characters in vocabulary")
        if not chars:
            raise ValueError("CharTokenizer: empty vocabulary")
        self.chars = chars
        self._id = {c: i + 1 for i, c in enumerate(chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    @property
    def blank_id(self) -> int:
        return 0

    @property
    def word_sep(self) -> str:
        """The symbol in :meth:`tokens` that separates words (flashlight silence token)."""
        return WORD_SEP if " " in self._id else BLANK

    def encode(self, text: str) -> list[int]:
        return [self._id[c] for c in text if c in self._id]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids → text (blank and out-of-range ids are skipped; no CTC collapsing here)."""
        n = len(self.chars)
        return "".join(self.chars[i - 1] for i in (int(x) for x in ids) if 0 < i <= n)

    def tokens(self) -> list[str]:
        return [BLANK] + [WORD_SEP if c == " " else c for c in self.chars]

    def spell(self, word: str) -> list[str]:
        """A word's token spelling for a flashlight lexicon (word separator appended)."""
        return [c for c in word if c in self._id] + [self.word_sep]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "char", "chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CharTokenizer:
        return cls(chars=d.get("chars", DEFAULT_CHARS))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class BPETokenizer:
    """Sentencepiece BPE: id 0 = blank, id ``k+1`` = sentencepiece piece ``k``.

    The sentencepiece model bytes are kept in memory (and base64 in ``to_dict``), so
    a packaged model needs no side file. Piece 0 is sentencepiece's ``<unk>``.
    """

    kind = "bpe"

    def __init__(self, model_bytes: bytes) -> None:
        import sentencepiece as spm

        self.model_bytes = bytes(model_bytes)
        self._sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train on ``texts``; ``vocab_size`` counts the blank (sentencepiece gets ``vocab_size-1``).

        ``hard_vocab_limit=False`` lets a tiny corpus produce fewer pieces instead of
        failing; :attr:`vocab_size` reports the real size. BPE training is deterministic.
        """
        import sentencepiece as spm

        texts = [t for t in texts if t.strip()]
        if not texts:
            raise ValueError("BPETokenizer.train: no non-empty texts")
        with tempfile.TemporaryDirectory(prefix="asrflow-spm-") as tmp:
            inp = os.path.join(tmp, "text.txt")
            with open(inp, "w", encoding="utf-8") as f:
                f.write("\n".join(texts) + "\n")
            prefix = os.path.join(tmp, "bpe")
            spm.SentencePieceTrainer.train(
                input=inp,
                model_prefix=prefix,
                vocab_size=max(int(vocab_size) - 1, 4),
                model_type="bpe",
                character_coverage=1.0,
                unk_id=0,
                bos_id=-1,
                eos_id=-1,
                pad_id=-1,
                hard_vocab_limit=False,
                num_threads=1,
                minloglevel=2,
            )
            with open(prefix + ".model", "rb") as f:
                return cls(f.read())

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size() + 1

    @property
    def blank_id(self) -> int:
        return 0

    @property
    def word_sep(self) -> str:
        """BPE marks word starts inside pieces; the blank doubles as flashlight's silence."""
        return BLANK

    def encode(self, text: str) -> list[int]:
        return [i + 1 for i in self._sp.encode(text, out_type=int)]

    def decode(self, ids: Iterable[int]) -> str:
        n = self._sp.get_piece_size()
        return self._sp.decode([int(i) - 1 for i in ids if 0 < int(i) <= n])

    def tokens(self) -> list[str]:
        return [BLANK] + [self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())]

    def spell(self, word: str) -> list[str]:
        return list(self._sp.encode(word, out_type=str))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "bpe", "model_b64": base64.b64encode(self.model_bytes).decode("ascii")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BPETokenizer:
        return cls(base64.b64decode(d["model_b64"]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BPETokenizer) and other.model_bytes == self.model_bytes

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


Tokenizer = CharTokenizer | BPETokenizer


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    kind = d.get("kind", "char")
    if kind == "char":
        return CharTokenizer.from_dict(d)
    if kind == "bpe":
        return BPETokenizer.from_dict(d)
    raise ValueError(f"unknown tokenizer kind {kind!r}")


def ctc_collapse(ids: Sequence[int], blank: int = 0) -> list[int]:
    """Merge repeats then drop blanks (the CTC best-path rule)."""
    out: list[int] = []
    prev = None
    for i in ids:
        i = int(i)
        if i != prev and i != blank:
            out.append(i)
        prev = i
    return out
