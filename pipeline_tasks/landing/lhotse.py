"""Lhotse manifests (``.jsonl``, ``.jsonl.gz``, or a ``.json`` list), read as plain JSON: no lhotse import.

``SRC`` is one manifest file or a folder of them:

- a **cut** manifest (``MonoCut``/``MultiCut`` with an embedded ``recording`` and its
  ``supervisions``); when a folder holds cut manifests, its recording/supervision manifests
  are not read (they describe the same utterances);
- a **supervision** manifest; its recordings come from the recording manifests in the same
  folder, or, when ``SRC`` is one file, from the sibling file named like it with
  ``supervisions`` replaced by ``recordings`` (lhotse's naming: ``x_supervisions_train.jsonl.gz``
  / ``x_recordings_train.jsonl.gz``).

Every **supervision** becomes one utterance: id = supervision id, transcript, speaker, audio =
``[start, start + duration)`` of its recording (a supervision inside a cut starts at
``cut.start + supervision.start``), cut into its own FLAC file unless it spans the whole file.
A supervision that appears in several cuts (windows over one recording) is imported once.
Recording sources of type ``file`` are read (relative paths: against the manifest's folder,
then the current folder); ``url``, ``command``, ``memory`` and ``shar`` sources, ``MixedCut``
and ``PaddingCut``, and recordings with transforms other than ``Resample`` (speed/volume
perturbation changes the audio) are ``unsupported_source``. A ``channel`` selects the source file
that holds it and the channel within that file.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline_tasks.landing.common import (
    BAD_LINE,
    BAD_SEGMENT,
    MISSING_TRANSCRIPT,
    UNKNOWN_RECORDING,
    UNSUPPORTED_SOURCE,
    AudioRef,
    Candidate,
    LandingImportError,
    Parsed,
    clean_text,
)

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")


class _Problem(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def _is_manifest(p: Path) -> bool:
    return p.is_file() and p.name.endswith(SUFFIXES)


def _items(path: Path, out: Parsed) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, item)`` for every object in a manifest; unparseable lines go to the report."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
            if path.name.endswith((".json", ".json.gz")):
                data = json.load(f)
                for i, item in enumerate(data if isinstance(data, list) else [data], start=1):
                    yield f"{path.name}:[{i}]", item
                return
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    out.reject(f"{path.name}:{i}", None, BAD_LINE, f"not valid JSON ({e.msg} at column {e.colno})")
                    continue
                yield f"{path.name}:{i}", item
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, EOFError) as e:
        raise LandingImportError(f"lhotse: cannot read {path}: {e}") from e


def _kind(item: Any) -> str | None:
    if not isinstance(item, dict):
        return None
    t = item.get("type")
    if isinstance(t, str) and t.endswith("Cut"):
        return "cut"
    if "recording" in item and "supervisions" in item:
        return "cut"
    if "sources" in item and "sampling_rate" in item:
        return "recording"
    if "recording_id" in item and "start" in item:
        return "supervision"
    return None


def _classify(files: list[Path], out: Parsed) -> dict[str, list[tuple[str, dict[str, Any], Path]]]:
    found: dict[str, list[tuple[str, dict[str, Any], Path]]] = {"cut": [], "recording": [], "supervision": []}
    for path in files:
        for where, item in _items(path, out):
            k = _kind(item)
            if k is None:
                out.reject(where, item.get("id") if isinstance(item, dict) else None, BAD_LINE,
                           "neither a cut, a recording nor a supervision")
                continue
            found[k].append((where, item, path))
    return found


def _channels(value: Any) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise _Problem(BAD_SEGMENT, f"channel {value!r} is not an integer")
    if isinstance(value, int):
        return [value]
    if isinstance(value, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in value):
        return list(value)
    raise _Problem(BAD_SEGMENT, f"channel {value!r} is not an integer or a list of integers")


def _audio(rec: dict[str, Any], channel: Any, manifest: Path) -> tuple[Path, tuple[int, ...] | None]:
    """The source file holding ``channel`` of recording ``rec`` and the channel indices inside that file."""
    rid = rec.get("id")
    for t in rec.get("transforms") or []:
        name = t.get("name") if isinstance(t, dict) else t
        if name != "Resample":
            raise _Problem(UNSUPPORTED_SOURCE, f"recording {rid!r} has a {name!r} transform (only Resample is kept)")
    sources = rec.get("sources") or []
    if not sources:
        raise _Problem(UNSUPPORTED_SOURCE, f"recording {rid!r} has no sources")
    want = _channels(channel)
    if want is None:
        if len(sources) > 1:
            raise _Problem(UNSUPPORTED_SOURCE, f"recording {rid!r} has {len(sources)} sources (one file per channel) and no channel is selected")
        src = sources[0]
    else:
        have = {c for s in sources for c in (s.get("channels") or [])}
        if not set(want) <= have:
            raise _Problem(BAD_SEGMENT, f"recording {rid!r} has no channel(s) {sorted(set(want) - have)} (it has {sorted(have)})")
        src = next((s for s in sources if set(want) <= set(s.get("channels") or [])), None)
        if src is None:
            raise _Problem(UNSUPPORTED_SOURCE, f"no single source of recording {rid!r} holds channel(s) {want}")
    stype = src.get("type")
    if stype != "file":
        raise _Problem(UNSUPPORTED_SOURCE, f"recording {rid!r} has a source of type {stype!r}; only 'file' sources are read")
    value = src.get("source")
    if not isinstance(value, str) or not value:
        raise _Problem(UNSUPPORTED_SOURCE, f"recording {rid!r} has a file source without a path")
    p = Path(value)
    if not p.is_absolute():
        p = manifest.parent / value if (manifest.parent / value).exists() else Path.cwd() / value
    if want is None:
        return p, None
    src_chans = list(src.get("channels") or [])
    return p, tuple(src_chans.index(c) for c in want)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Problem(BAD_SEGMENT, f"{what} {value!r} is not a number")
    return float(value)


def _add(out: Parsed, sup: dict[str, Any], rec: dict[str, Any], offset: float, channel: Any, where: str, manifest: Path) -> None:
    sid = sup.get("id")
    sid = str(sid) if sid not in (None, "") else None
    if sid is None:
        out.reject(where, None, BAD_LINE, "supervision without an id")
        return
    try:
        start = offset + _number(sup.get("start"), "start")
        duration = _number(sup.get("duration"), "duration")
        path, chans = _audio(rec, sup.get("channel", channel), manifest)
    except _Problem as e:
        out.reject(where, sid, e.reason, e.message)
        return
    text = sup.get("text")
    speaker = sup.get("speaker")
    out.candidates.append(
        Candidate(
            sid,
            clean_text(text) if isinstance(text, str) else None,
            str(speaker) if speaker not in (None, "") else None,
            AudioRef(path, start, duration, chans),
            where,
        )
    )


def read(src: Path) -> Parsed:
    src = Path(src)
    out = Parsed()
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if _is_manifest(p))
        if not files:
            raise LandingImportError(f"lhotse: no manifests ({', '.join(SUFFIXES)}) in {src}")
    elif _is_manifest(src):
        files = [src]
    else:
        raise LandingImportError(f"lhotse: {src} is neither a folder nor a manifest file ({', '.join(SUFFIXES)})")
    found = _classify(files, out)
    if src.is_file() and found["supervision"] and not found["recording"]:
        sib = src.with_name(src.name.replace("supervisions", "recordings"))
        if sib == src or not sib.is_file():
            raise LandingImportError(f"lhotse: {src.name} holds supervisions; its recordings manifest {sib.name} is not beside it")
        found["recording"] = _classify([sib], out)["recording"]

    if found["cut"]:
        if found["recording"] or found["supervision"]:
            out.notes.append("lhotse: cut manifests found; recording/supervision manifests beside them were not read")
        seen: dict[Any, tuple[Any, ...]] = {}
        repeated = 0
        for where, cut, manifest in found["cut"]:
            cid = cut.get("id")
            ctype = cut.get("type", "MonoCut")
            if ctype not in ("MonoCut", "MultiCut"):
                out.reject(where, cid, UNSUPPORTED_SOURCE, f"a {ctype} is not imported (only MonoCut/MultiCut)")
                continue
            rec = cut.get("recording")
            if not isinstance(rec, dict):
                out.reject(where, cid, UNSUPPORTED_SOURCE, f"cut {cid!r} has no recording (features-only cuts are not imported)")
                continue
            sups = cut.get("supervisions") or []
            if not sups:
                out.reject(where, cid, MISSING_TRANSCRIPT, f"cut {cid!r} has no supervisions")
                continue
            try:
                offset = _number(cut.get("start", 0.0), "cut start")
            except _Problem as e:
                out.reject(where, cid, e.reason, e.message)
                continue
            for sup in sups:
                if not isinstance(sup, dict):
                    out.reject(where, cid, BAD_LINE, "a supervision of this cut is not an object")
                    continue
                sid, rel_start = sup.get("id"), sup.get("start")
                if isinstance(rel_start, (int, float)) and sid is not None:
                    # the same supervision in two cuts (windows): same absolute bounds and text
                    key = (round(offset + rel_start, 6), sup.get("duration"), sup.get("text"))
                    if seen.get(sid) == key:
                        repeated += 1
                        continue
                    seen.setdefault(sid, key)
                _add(out, sup, rec, offset, cut.get("channel"), where, manifest)
        if repeated:
            out.notes.append(f"lhotse: {repeated} supervision(s) appeared in more than one cut; each was imported once")
        return out

    if not found["supervision"]:
        raise LandingImportError(
            f"lhotse: no supervisions or cuts in {src} (recordings alone carry no transcripts)"
        )
    recs: dict[str, dict[str, Any]] = {}
    for _, rec, _ in found["recording"]:
        if rec.get("id") is not None:
            recs[str(rec["id"])] = rec
    for where, sup, manifest in found["supervision"]:
        rid = sup.get("recording_id")
        rec = recs.get(str(rid))
        if rec is None:
            out.reject(where, sup.get("id"), UNKNOWN_RECORDING, f"recording {rid!r} is not in the recording manifest")
            continue
        _add(out, sup, rec, 0.0, None, where, manifest)
    return out
