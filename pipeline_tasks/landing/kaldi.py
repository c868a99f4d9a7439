"""Kaldi data directory: ``wav.scp``, ``text``, ``utt2spk``, optional ``segments``.

- ``wav.scp``: ``<recording id> <path>``. Only plain file paths are read: a pipe command
  (``<id> sox in.wav -t wav - |``) and an archive offset (``<id> foo.ark:1234``) are
  ``unsupported_source`` (run the commands into audio files and list those files in a new
  wav.scp). Relative paths are resolved against the data folder, then against the recipe
  folder two levels up (Kaldi recipes run from ``s5/``, with data folders at ``s5/data/<name>``).
- ``text``: ``<utterance id> <transcript>``; ``utt2spk``: ``<utterance id> <speaker>`` (optional).
- ``segments``: ``<utterance id> <recording id> <start> <end>`` (seconds; ``end`` -1 = to the
  end of the recording). With it, every segment becomes its own utterance, cut to its own FLAC
  file; without it, every recording is an utterance (utterance id = recording id).
"""

from __future__ import annotations

from pathlib import Path

from pipeline_tasks.landing.common import (
    AUDIO_MISSING,
    BAD_LINE,
    BAD_SEGMENT,
    UNKNOWN_RECORDING,
    UNSUPPORTED_SOURCE,
    AudioRef,
    Candidate,
    LandingImportError,
    Parsed,
    clean_text,
)


def _table(path: Path, out: Parsed, min_fields: int = 2) -> list[tuple[int, str, str]]:
    """``(line number, key, rest)`` for every non-empty line of a Kaldi table file."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LandingImportError(f"kaldi: cannot read {path}: {e}") from e
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) < min_fields:
            out.reject(f"{path.name}:{i}", parts[0], BAD_LINE, f"{path.name} line has a key but no value")
            rows.append((i, parts[0], ""))
            continue
        rows.append((i, parts[0], parts[1] if len(parts) > 1 else ""))
    return rows


def _resolve(value: str, data_dir: Path) -> Path:
    p = Path(value)
    if p.is_absolute():
        return p
    for base in (data_dir, data_dir.parent.parent):
        if (base / p).exists():
            return base / p
    return data_dir / p


def read(src: Path) -> Parsed:
    d = Path(src)
    if not (d / "wav.scp").is_file():
        raise LandingImportError(f"kaldi: no wav.scp in {d}")
    if not (d / "text").is_file():
        raise LandingImportError(f"kaldi: no text in {d}")
    out = Parsed()
    texts: dict[str, tuple[str, str | None]] = {}
    for i, key, rest in _table(d / "text", out, min_fields=1):
        texts[key] = (f"text:{i}", clean_text(rest))
    spk: dict[str, str] = {}
    if (d / "utt2spk").is_file():
        bad = 0
        for _, key, rest in _table(d / "utt2spk", out, min_fields=1):
            if rest:
                spk[key] = rest.split()[0]
            else:
                bad += 1
        if bad:
            out.notes.append(f"kaldi: {bad} utt2spk line(s) without a speaker; those utterances have no speaker")
    else:
        out.notes.append("kaldi: no utt2spk; utterances have no speaker")

    # recording id -> (path, None) or (None, (reason, message))
    recs: dict[str, tuple[Path | None, tuple[str, str] | None, str]] = {}
    for i, key, rest in _table(d / "wav.scp", out):
        where = f"wav.scp:{i}"
        if not rest:
            continue
        value = rest.strip()
        if value.endswith("|"):
            why = f"wav.scp entry is a pipe command ({value[:80]!r}): write its output to an audio file and list that file"
        elif " " in value and not _resolve(value, d).exists():
            why = f"wav.scp entry {value[:80]!r} is not a single file path"
        elif ".ark:" in value and not _resolve(value, d).exists():
            why = f"wav.scp entry {value!r} points into a Kaldi archive; only plain audio files are read"
        else:
            recs[key] = (_resolve(value, d), None, where)
            continue
        recs[key] = (None, (UNSUPPORTED_SOURCE, why), where)

    def add(uid: str, rec_id: str, where: str, start: float | None, duration: float | None) -> None:
        path, problem, _ = recs[rec_id]
        if problem is not None:
            out.reject(where, uid, *problem)
            return
        assert path is not None
        if not path.exists():
            out.reject(where, uid, AUDIO_MISSING, f"audio file {str(path)!r} (wav.scp, recording {rec_id}) does not exist")
            return
        text = texts.get(uid, (where, None))[1]
        out.candidates.append(Candidate(uid, text, spk.get(uid), AudioRef(path, start, duration), where))

    seen: set[str] = set()
    if (d / "segments").is_file():
        for i, key, rest in _table(d / "segments", out):
            where = f"segments:{i}"
            if not rest:
                continue
            seen.add(key)
            f = rest.split()
            if len(f) != 3:
                out.reject(where, key, BAD_LINE, f"segments line needs '<utt> <rec> <start> <end>', got {rest!r}")
                continue
            rec_id = f[0]
            try:
                start, end = float(f[1]), float(f[2])
            except ValueError:
                out.reject(where, key, BAD_SEGMENT, f"segment bounds {f[1]!r} {f[2]!r} are not numbers")
                continue
            if rec_id not in recs:
                out.reject(where, key, UNKNOWN_RECORDING, f"recording {rec_id!r} is not in wav.scp")
                continue
            if end == -1:
                add(key, rec_id, where, start, None)
            elif end <= start:
                out.reject(where, key, BAD_SEGMENT, f"segment end {end} is not after its start {start}")
            else:
                add(key, rec_id, where, start, end - start)
    else:
        for rec_id, (_, _, where) in recs.items():
            seen.add(rec_id)
            add(rec_id, rec_id, where, None, None)
    for uid, (where, _) in texts.items():
        if uid not in seen:
            src_name = "segments" if (d / "segments").is_file() else "wav.scp"
            out.reject(where, uid, AUDIO_MISSING, f"utterance {uid!r} has a transcript but no {src_name} entry")
    return out
