"""Torch-free inference with an exported model: audio → log-mel (numpy) → onnxruntime → CTC decoding.

What: :class:`OnnxAsr` loads an exported ``.onnx`` file (see :mod:`model_code.onnx_export`),
reads everything it needs from the file's ``metadata_props`` (tokenizer, feature config, sample
rate, and optionally the lexicon + ARPA LM for beam search), and transcribes waveforms or audio
files of any sample rate and any length. :func:`batched_logprobs` and :class:`CtcDecoder` are
the two halves of that path (model → log-probs, log-probs → text); the golden-set gate uses the
same two functions for a torch model and for an ONNX model, so both are batched, chunked and
decoded identically.

Why no torch: ``asrflow transcribe`` must run where only onnxruntime is installed. This module
and everything it imports (``model_code.features``, ``model_code.tokenizer``,
``model_code.decoding``, ``model_code.audio``) are checked in a subprocess with
``sys.modules["torch"] = None``. Resampling is ``model_code.audio.resample``, a numpy polyphase
FIR with the filter of ``scipy.signal.resample_poly``: the same function ingest uses.

Feature extraction is a preprocessing step outside the ONNX graph: the graph takes log-mel
features ``(B, T, n_mels)`` float32 and lengths ``(B,)`` int64 and returns log-probs
``(B, T', V)`` and output lengths ``(B,)``. The log-mels come from :func:`model_code.features.logmel`,
the same function featurize used for the training features.

Long-form audio: an utterance longer than ``chunk_s`` is cut into overlapping windows of
features, each run through the model, and the per-window log-prob frames are merged at the frame
level (``model_code.decoding.chunked_logprobs``) before ONE decoding pass over the whole
recording, so no word is cut at a window edge by the decoder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model_code.features import feature_kwargs as _feature_kwargs
from model_code.features import logmel
from model_code.tokenizer import tokenizer_from_dict

# metadata_props keys written by model_code.onnx_export
META_FORMAT = "asrflow.format"
META_TOKENIZER = "asrflow.tokenizer"  # JSON: tokenizer.to_dict()
META_FEATURES = "asrflow.features"  # JSON: logmel kwargs
META_SAMPLE_RATE = "asrflow.sample_rate"
META_LEXICON = "asrflow.lexicon"  # flashlight lexicon text (optional)
META_LM_ARPA = "asrflow.lm_arpa"  # ARPA LM text (optional)
META_QUANT = "asrflow.quantization"  # JSON
META_IO = "asrflow.io"  # JSON: input/output names and shapes
FORMAT_VERSION = "1"

INPUT_FEATURES = "features"
INPUT_LENGTHS = "lengths"
OUTPUT_LOGPROBS = "log_probs"
OUTPUT_LENGTHS = "out_lengths"

RunFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------------------------------------
# audio
# ---------------------------------------------------------------------------------------------



def load_wave(path: str | os.PathLike[str], target_sr: int) -> tuple[np.ndarray, int, int]:
    """Decode any audio file libsndfile reads, downmix to mono, resample to ``target_sr``.

    Returns ``(wave (S,) float32, orig_sample_rate, orig_channels)``; raises
    ``model_code.audio.AudioDecodeError`` for unusable files (missing, truncated, not audio).
    """
    from model_code.audio import load_audio

    return load_audio(path, target_sr=target_sr)


# ---------------------------------------------------------------------------------------------
# model → log-probs (shared by the torch and the onnxruntime path)
# ---------------------------------------------------------------------------------------------


def pad_batch(feats: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """List of ``(T_i, F)`` → padded float32 ``(B, T_max, F)`` and int64 lengths ``(B,)``."""
    lens = np.array([f.shape[0] for f in feats], dtype=np.int64)
    n_mels = feats[0].shape[1]
    out = np.zeros((len(feats), int(lens.max()), n_mels), dtype=np.float32)
    for i, f in enumerate(feats):
        out[i, : f.shape[0]] = f
    return out, lens


def batched_logprobs(
    run_fn: RunFn,
    feats: Sequence[np.ndarray],
    chunk_frames: int,
    overlap_frames: int,
    max_batch_frames: int = 20000,
    max_batch_size: int = 32,
) -> list[np.ndarray]:
    """Log-probs of many utterances: list of ``(T_i, F)`` → list of ``(T'_i, V)`` (valid frames only).

    Utterances up to ``chunk_frames + overlap_frames`` frames are sorted by length and run in
    padded batches of at most ``max_batch_frames`` padded frames (and ``max_batch_size``
    utterances); longer ones go one by one through ``model_code.decoding.chunked_logprobs``
    (overlapping windows merged at the frame level). ``run_fn(feats (B,T,F) float32, lengths
    (B,) int64) -> (log_probs (B,T',V), out_lengths (B,))`` is the model: onnxruntime or torch.
    The result order is the input order.
    """
    out: list[np.ndarray | None] = [None] * len(feats)
    short = [i for i, f in enumerate(feats) if f.shape[0] <= chunk_frames + overlap_frames]
    long_ = [i for i, f in enumerate(feats) if f.shape[0] > chunk_frames + overlap_frames]
    short.sort(key=lambda i: feats[i].shape[0])
    batch: list[int] = []

    def flush() -> None:
        if not batch:
            return
        x, lens = pad_batch([feats[i] for i in batch])
        lp, out_lens = run_fn(x, lens)
        for j, i in enumerate(batch):
            out[i] = np.asarray(lp[j, : int(out_lens[j])], dtype=np.float32)
        batch.clear()

    for i in short:
        t = feats[i].shape[0]
        if batch and ((len(batch) + 1) * t > max_batch_frames or len(batch) >= max_batch_size):
            flush()
        batch.append(i)
    flush()
    if long_:
        from model_code.decoding import chunked_logprobs

        def one(f: np.ndarray) -> np.ndarray:  # (t, F) -> (t', V): one chunk as a batch of 1
            lp, ol = run_fn(f[None].astype(np.float32, copy=False), np.array([f.shape[0]], dtype=np.int64))
            return lp[0, : int(ol[0])]

        for i in long_:
            out[i] = np.asarray(chunked_logprobs(one, feats[i], chunk_frames, overlap_frames), dtype=np.float32)
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# log-probs → text
# ---------------------------------------------------------------------------------------------


class CtcDecoder:
    """CTC decoding of a list of ``(T'_i, V)`` log-prob arrays: greedy or lexicon + LM beam search.

    ``mode="beam"`` needs ``lexicon_path`` and ``lm_path`` (flashlight-text, see
    ``model_code.decoding.BeamDecoder``); without them it falls back to greedy and says so in
    :attr:`mode` (the gate records which decoder ran).
    """

    def __init__(
        self,
        tokenizer: Any,
        mode: str = "greedy",
        lexicon_path: str | os.PathLike[str] | None = None,
        lm_path: str | os.PathLike[str] | None = None,
        beam_size: int = 50,
        lm_weight: float = 0.8,
        word_score: float = 0.0,
    ) -> None:
        if mode not in ("greedy", "beam"):
            raise ValueError(f"decode mode must be greedy or beam, not {mode!r}")
        self.tokenizer = tokenizer
        self.requested_mode = mode
        self.mode = mode if (mode == "greedy" or (lexicon_path and lm_path)) else "greedy"
        self._beam = None
        if self.mode == "beam":
            from model_code.decoding import BeamDecoder

            self._beam = BeamDecoder(tokenizer, str(lexicon_path), str(lm_path), beam_size, lm_weight, word_score)

    def __call__(self, log_probs: Sequence[np.ndarray], batch_size: int = 32) -> list[str]:
        from model_code.decoding import greedy_decode

        texts: list[str] = []
        for s in range(0, len(log_probs), batch_size):
            part = [np.asarray(lp, dtype=np.float32) for lp in log_probs[s : s + batch_size]]
            lens = np.array([p.shape[0] for p in part], dtype=np.int64)
            v = part[0].shape[1]
            x = np.full((len(part), max(int(lens.max()), 1), v), 0.0, dtype=np.float32)
            for i, p in enumerate(part):
                x[i, : p.shape[0]] = p
            if self._beam is not None:
                texts.extend(self._beam.decode(x, lens))
            else:
                texts.extend(greedy_decode(x, lens, self.tokenizer))
        return [" ".join(t.split()) for t in texts]


# ---------------------------------------------------------------------------------------------
# the exported model
# ---------------------------------------------------------------------------------------------


def read_metadata(onnx_path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (read through onnxruntime: no onnx/torch)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return dict(sess.get_modelmeta().custom_metadata_map)


def _session(onnx_path: str, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads > 0:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(onnx_path, sess_options=so, providers=["CPUExecutionProvider"])


class OnnxAsr:
    """An exported ASR model, ready to transcribe (onnxruntime on CPU, no torch).

    ``onnx_path``: the ``.onnx`` file. Lexicon and LM for beam search are taken, in order, from
    ``lexicon_path``/``lm_path``, from sidecar files next to the model (``lexicon.txt`` and
    ``lm.arpa``, or ``<stem>.lexicon.txt`` and ``<stem>.lm.arpa``), or from the copies embedded in
    the file's metadata. ``decode`` = ``"beam"`` or ``"greedy"``; ``chunk_s``/``chunk_overlap_s``
    control long-form chunking; ``threads`` = onnxruntime intra-op threads (0 = all cores).
    """

    def __init__(
        self,
        onnx_path: str | os.PathLike[str],
        decode: str = "beam",
        beam_size: int = 50,
        lm_weight: float = 0.8,
        word_score: float = 0.0,
        chunk_s: float = 16.0,
        chunk_overlap_s: float = 2.0,
        threads: int = 0,
        lexicon_path: str | os.PathLike[str] | None = None,
        lm_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX model at {self.path}")
        self.session = _session(str(self.path), threads)
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        missing = [k for k in (META_TOKENIZER, META_FEATURES) if k not in self.metadata]
        if missing:
            raise ValueError(f"{self.path}: not an asrflow export (metadata lacks {', '.join(missing)})")
        self.tokenizer = tokenizer_from_dict(json.loads(self.metadata[META_TOKENIZER]))
        self.feature_kwargs = _feature_kwargs(json.loads(self.metadata[META_FEATURES]))
        self.sample_rate = int(self.metadata.get(META_SAMPLE_RATE, self.feature_kwargs["sample_rate"]))
        self.quantization = json.loads(self.metadata.get(META_QUANT, "null"))
        hop = self.feature_kwargs["hop_length"]
        self.chunk_frames = max(int(round(chunk_s * self.sample_rate / hop)), 16)
        self.overlap_frames = max(int(round(chunk_overlap_s * self.sample_rate / hop)), 0)
        self._tmp: str | None = None
        self.lexicon_path, self.lm_path = self._lm_files(lexicon_path, lm_path)  # None, None: no LM shipped
        self.decoder = CtcDecoder(
            self.tokenizer, decode, self.lexicon_path, self.lm_path, beam_size, lm_weight, word_score
        )

    # -- LM files --------------------------------------------------------------------------
    def _lm_files(self, lexicon_path: Any, lm_path: Any) -> tuple[str | None, str | None]:
        if lexicon_path and lm_path:
            return str(lexicon_path), str(lm_path)
        d, stem = self.path.parent, self.path.stem
        for lex, lm in ((d / f"{stem}.lexicon.txt", d / f"{stem}.lm.arpa"), (d / "lexicon.txt", d / "lm.arpa")):
            if lex.is_file() and lm.is_file():
                return str(lex), str(lm)
        if self.metadata.get(META_LEXICON) and self.metadata.get(META_LM_ARPA):
            self._tmp = tempfile.mkdtemp(prefix="asrflow-lm-")
            weakref.finalize(self, shutil.rmtree, self._tmp, True)
            lex_p, lm_p = Path(self._tmp) / "lexicon.txt", Path(self._tmp) / "lm.arpa"
            lex_p.write_text(self.metadata[META_LEXICON])
            lm_p.write_text(self.metadata[META_LM_ARPA])
            return str(lex_p), str(lm_p)
        return None, None

    @property
    def decode_mode(self) -> str:
        """The decoder that actually runs (``beam`` falls back to ``greedy`` without an LM)."""
        return self.decoder.mode

    # -- model -----------------------------------------------------------------------------
    def run(self, feats: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The graph: features ``(B, T, n_mels)`` float32, lengths ``(B,)`` int64 →
        log-probs ``(B, T', V)`` float32, out_lengths ``(B,)`` int64."""
        lp, ol = self.session.run(
            [OUTPUT_LOGPROBS, OUTPUT_LENGTHS],
            {INPUT_FEATURES: np.ascontiguousarray(feats, dtype=np.float32), INPUT_LENGTHS: lengths.astype(np.int64)},
        )
        return lp, ol

    def features(self, wave: np.ndarray) -> np.ndarray:
        """Log-mel of a mono wave at :attr:`sample_rate`: ``(S,)`` → ``(T, n_mels)`` float32."""
        return logmel(wave, **self.feature_kwargs)

    def logprobs(self, feats: Sequence[np.ndarray]) -> list[np.ndarray]:
        """List of ``(T_i, n_mels)`` → list of ``(T'_i, V)`` (batched; long ones chunked)."""
        return batched_logprobs(self.run, feats, self.chunk_frames, self.overlap_frames)

    def transcribe_features(self, feats: Sequence[np.ndarray]) -> list[str]:
        return self.decoder(self.logprobs(feats))

    def transcribe_waves(self, waves: Sequence[np.ndarray]) -> list[str]:
        """Mono float32 waves at :attr:`sample_rate` → texts."""
        return self.transcribe_features([self.features(w) for w in waves])

    def transcribe_file(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """One audio file (any rate, any channels, any length) → ``text``, ``duration``, ``rtf``, ...

        ``rtf`` = compute seconds (decode of the file excluded, features + model + CTC decoding
        included) / audio seconds.
        """
        wave, sr, ch = load_wave(path, self.sample_rate)
        t0 = time.perf_counter()
        text = self.transcribe_waves([wave])[0]
        dt = time.perf_counter() - t0
        duration = wave.shape[0] / self.sample_rate
        return {
            "text": text,
            "duration": round(duration, 4),
            "rtf": round(dt / duration, 5) if duration > 0 else None,
            "orig_sample_rate": sr,
            "orig_channels": ch,
        }
