"""CTC decoding without torch: greedy (numpy), lexicon + n-gram LM beam search (flashlight-text),
and chunked inference for long-form audio.

Serving (``transcribe``) runs the ONNX model with onnxruntime and decodes here, so this module
must not import torch (checked by a test).

Beam search setup (what torchaudio's ``ctc_decoder`` wraps, done directly on flashlight):
tokens = ``tokenizer.tokens()`` (index-aligned, ``<blank>`` at 0, the space spelled ``|``);
the lexicon (``model_code.lm.build_lexicon``) spells each word with a trailing ``|``; ``|`` is
flashlight's *silence* token (for BPE, which has no separator, the blank plays that role). The
model is not trained to emit a space after the last word, so one extra frame in which the
separator is certain is appended to each utterance's emissions: it lets the last word close
without changing any other path's score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def _collapse_row(ids: np.ndarray, blank: int = 0) -> list[int]:
    """Best-path ids (T,) → CTC-collapsed ids: merge repeats, drop blanks."""
    if ids.size == 0:
        return []
    keep = np.ones(ids.shape, dtype=bool)
    keep[1:] = ids[1:] != ids[:-1]
    keep &= ids != blank
    return ids[keep].tolist()


def _clean(text: str) -> str:
    return " ".join(text.split())


def greedy_decode(log_probs: np.ndarray, lengths: Sequence[int] | np.ndarray | None, tokenizer) -> list[str]:
    """Best-path CTC decoding.

    log_probs (B, T, V) (any monotone score: log-probs or logits), lengths (B,) valid frames
    (None = all T) → B strings, whitespace collapsed and stripped.
    """
    lp = np.asarray(log_probs)
    if lp.ndim != 3:
        raise ValueError(f"log_probs must be (B, T, V), got {lp.shape}")
    b, t, _ = lp.shape
    lens = np.full(b, t) if lengths is None else np.asarray(lengths).reshape(-1)
    best = lp.argmax(axis=-1)  # (B, T)
    out = []
    for i in range(b):
        ids = _collapse_row(best[i, : int(min(lens[i], t))], blank=tokenizer.blank_id)
        out.append(_clean(tokenizer.decode(ids)))
    return out


class BeamDecoder:
    """CTC beam search with a word lexicon and a KenLM n-gram LM (flashlight-text).

    Args:
        tokenizer: a ``CharTokenizer`` or ``BPETokenizer`` (``tokens()``, ``word_sep``).
        lexicon_path: flashlight lexicon (``word<TAB>spelling``); ``None`` → lexicon-free search
            without LM (output = best token sequence).
        lm_path: ARPA (or KenLM binary) word LM; ``None`` → no LM (lexicon-constrained only).
        beam_size, lm_weight, word_score: the usual knobs; ``unk_score`` (default -inf) lets
            out-of-lexicon words through when finite; ``sil_score`` rewards/penalizes the
            separator; ``beam_threshold`` prunes hypotheses this far below the best.
    """

    def __init__(
        self,
        tokenizer,
        lexicon_path: str | None,
        lm_path: str | None,
        beam_size: int = 50,
        lm_weight: float = 0.8,
        word_score: float = 0.0,
        unk_score: float = float("-inf"),
        sil_score: float = 0.0,
        beam_threshold: float = 25.0,
        beam_size_token: int | None = None,
        log_add: bool = False,
    ) -> None:
        from flashlight.lib.text.decoder import (
            CriterionType,
            LexiconDecoder,
            LexiconDecoderOptions,
            LexiconFreeDecoder,
            LexiconFreeDecoderOptions,
            SmearingMode,
            Trie,
            ZeroLM,
        )
        from flashlight.lib.text.dictionary import Dictionary, create_word_dict, load_words

        self.tokenizer = tokenizer
        self.tokens = tokenizer.tokens()
        self.tokens_dict = Dictionary(self.tokens)
        self.vocab_size = len(self.tokens)
        self.blank = 0
        self.sil = self.tokens_dict.get_index(tokenizer.word_sep)
        bst = beam_size_token or self.vocab_size
        self.word_dict = None
        if lexicon_path is None:
            if lm_path is not None:
                raise ValueError("a word LM needs a lexicon (lexicon-free decoding takes no LM here)")
            opts = LexiconFreeDecoderOptions(
                beam_size=beam_size, beam_size_token=bst, beam_threshold=beam_threshold,
                lm_weight=0.0, sil_score=sil_score, log_add=log_add, criterion_type=CriterionType.CTC,
            )
            self.lm = ZeroLM()
            self.decoder = LexiconFreeDecoder(opts, self.lm, self.sil, self.blank, [])
            return
        lexicon = load_words(str(lexicon_path))
        self.word_dict = create_word_dict(lexicon)
        if lm_path is not None:
            try:
                from flashlight.lib.text.decoder.kenlm import KenLM
            except ImportError:  # older flashlight-text layout
                from flashlight.lib.text.decoder import KenLM

            self.lm = KenLM(str(lm_path), self.word_dict)
        else:
            self.lm = ZeroLM()
        trie = Trie(self.vocab_size, self.sil)
        start = self.lm.start(False)
        for word, spellings in lexicon.items():
            widx = self.word_dict.get_index(word)
            _, score = self.lm.score(start, widx)
            for spelling in spellings:
                ids = [self.tokens_dict.get_index(t) for t in spelling]
                trie.insert(ids, widx, score)
        trie.smear(SmearingMode.MAX)
        opts = LexiconDecoderOptions(
            beam_size=beam_size, beam_size_token=bst, beam_threshold=beam_threshold,
            lm_weight=lm_weight, word_score=word_score, unk_score=unk_score, sil_score=sil_score,
            log_add=log_add, criterion_type=CriterionType.CTC,
        )
        unk = self.word_dict.get_index("<unk>")
        self.trie = trie  # keep alive: the C++ decoder holds references
        self.decoder = LexiconDecoder(opts, trie, self.lm, self.sil, self.blank, unk, [], False)

    def _emissions(self, lp: np.ndarray) -> np.ndarray:
        """(T, V) → (T+1, V) float32 contiguous, with a final frame where the separator is certain."""
        last = np.full((1, lp.shape[1]), -1e4, dtype=np.float32)
        last[0, self.sil] = 0.0
        return np.ascontiguousarray(np.concatenate([lp.astype(np.float32), last], axis=0))

    def decode_one(self, log_probs: np.ndarray) -> str:
        """(T, V) log-probs of one utterance (valid frames only) → text."""
        em = self._emissions(np.asarray(log_probs))
        results = self.decoder.decode(em.ctypes.data, em.shape[0], em.shape[1])
        if not results:
            return ""
        best = results[0]
        if self.word_dict is not None:
            words = [self.word_dict.get_entry(w) for w in best.words if w >= 0]
            return _clean(" ".join(words))
        ids = _collapse_row(np.asarray(best.tokens), blank=self.blank)  # "|" decodes to a space
        return _clean(self.tokenizer.decode(ids))

    def decode(self, log_probs: np.ndarray, lengths: Sequence[int] | np.ndarray | None = None) -> list[str]:
        """log_probs (B, T, V), lengths (B,) → B strings."""
        lp = np.asarray(log_probs)
        if lp.ndim != 3 or lp.shape[2] != self.vocab_size:
            raise ValueError(f"log_probs must be (B, T, {self.vocab_size}), got {lp.shape}")
        lens = np.full(lp.shape[0], lp.shape[1]) if lengths is None else np.asarray(lengths).reshape(-1)
        return [self.decode_one(lp[i, : int(lens[i])]) for i in range(lp.shape[0])]


def subsampled_length(n: int, factor: int = 4) -> int:
    """Output frames of the ×4 conv subsampling for ``n`` input frames (= ceil(n / 4))."""
    for _ in range({4: 2, 2: 1, 1: 0}.get(factor, 2)):
        n = (n - 1) // 2 + 1
    return n


def chunked_logprobs(
    run_fn: Callable[[np.ndarray], np.ndarray],
    feats: np.ndarray,
    chunk_frames: int,
    overlap_frames: int,
    subsampling: int = 4,
) -> np.ndarray:
    """Log-probs of a long utterance computed in overlapping chunks, merged at the frame level.

    ``run_fn(feats (t, F)) -> (ceil(t / subsampling), V)`` runs the model on one chunk. Chunks of
    ``chunk_frames`` input frames start every ``chunk_frames - overlap_frames`` frames (both
    rounded to multiples of ``subsampling`` so output frames line up). In each overlap the output
    frames left of its midpoint come from the earlier chunk and the rest from the later one, so
    every chunk contributes only its centre part, away from the edges where it lacks context.

    feats (T, F) → (ceil(T / subsampling), V); a short input is a single ``run_fn`` call.
    """
    feats = np.asarray(feats)
    t = feats.shape[0]
    s = subsampling
    chunk = max(int(chunk_frames) // s * s, s)
    overlap = min(max(int(overlap_frames) // s * s, 0), chunk - s)
    if t <= chunk:
        return np.asarray(run_fn(feats))
    step = chunk - overlap
    starts = list(range(0, t - overlap, step))
    if starts[-1] + chunk < t:
        starts.append(starts[-1] + step)
    pieces = []
    total = subsampled_length(t, s)
    begin = 0  # next global output frame to fill
    for k, st in enumerate(starts):
        en = min(st + chunk, t)
        out = np.asarray(run_fn(feats[st:en]))  # (ceil((en-st)/s), V)
        if k + 1 < len(starts) and en < t:
            nxt = starts[k + 1]
            end = (nxt + en) // 2 // s  # midpoint of the overlap, in output frames
        else:
            end = total
        lo, hi = begin - st // s, end - st // s
        pieces.append(out[lo:hi])
        begin = end
        if end >= total:
            break
    merged = np.concatenate(pieces, axis=0)
    if merged.shape[0] != total:
        raise RuntimeError(f"chunk merge produced {merged.shape[0]} frames, expected {total}")
    return merged
