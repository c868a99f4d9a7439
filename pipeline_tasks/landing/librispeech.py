"""LibriSpeech layout: ``<spk>/<chapter>/<spk>-<chapter>.trans.txt`` + ``<spk>-<chapter>-<utt>.flac``.

``SRC`` is a split folder (``LibriSpeech/dev-clean``) or any folder above it: every
``*.trans.txt`` below it is read. A transcript line is ``<utt id> <TRANSCRIPT>``; the audio is
``<utt id>.flac`` beside it; the speaker is the first dash-separated part of the utterance id.
A transcript line without its audio file is ``audio_missing``; an audio file no transcript
line names is ``missing_transcript``; a line without a transcript is ``bad_line``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline_tasks.landing.common import (
    AUDIO_MISSING,
    BAD_LINE,
    MISSING_TRANSCRIPT,
    AudioRef,
    Candidate,
    LandingImportError,
    Parsed,
    clean_text,
    rel_where,
)

AUDIO_EXTS = (".flac", ".wav")


def read(src: Path) -> Parsed:
    src = Path(src)
    if not src.is_dir():
        raise LandingImportError(f"librispeech: {src} is not a folder")
    trans_files = sorted(src.rglob("*.trans.txt"))
    if not trans_files:
        raise LandingImportError(f"librispeech: no *.trans.txt under {src} (expected <spk>/<chapter>/<spk>-<chapter>.trans.txt)")
    out = Parsed()
    named: set[Path] = set()
    for tf in trans_files:
        folder = tf.parent
        try:
            lines = tf.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            out.reject(rel_where(tf, src), None, BAD_LINE, f"cannot read {tf.name}: {e}")
            continue
        for i, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = rel_where(tf, src, i)
            parts = line.strip().split(maxsplit=1)
            uid = parts[0]
            text = clean_text(parts[1]) if len(parts) > 1 else None
            audio = next((folder / f"{uid}{ext}" for ext in AUDIO_EXTS if (folder / f"{uid}{ext}").exists()), None)
            if audio is None:
                out.reject(where, uid, AUDIO_MISSING, f"no {uid}.flac beside {tf.name}")
                continue
            named.add(audio)
            if text is None:
                out.reject(where, uid, MISSING_TRANSCRIPT, "transcript line has an utterance id but no transcript")
                continue
            out.candidates.append(Candidate(uid, text, uid.split("-")[0], AudioRef(audio), where))
    for folder in sorted({tf.parent for tf in trans_files}):
        for audio in sorted(p for ext in AUDIO_EXTS for p in folder.glob(f"*{ext}")):
            if audio not in named:
                out.reject(rel_where(audio, src), audio.stem, MISSING_TRANSCRIPT, f"no *.trans.txt line names {audio.stem}")
    return out
