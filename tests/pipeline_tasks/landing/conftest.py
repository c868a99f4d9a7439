"""Real speech for the importer tests: six espeak-ng utterances from the synthetic corpus, made once.

Every layout a test builds (LibriSpeech FLAC, Common Voice MP3, Kaldi long recordings...) is
made from these waveforms with soundfile, so durations and cut contents can be checked
against the audio itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf

from tests.pipeline_tasks.landing.helpers import Utt


@pytest.fixture(scope="session")
def speech(tmp_path_factory) -> list[Utt]:
    from synth import corpus

    out = tmp_path_factory.mktemp("speech")
    res = corpus.generate_week(out, week=1, utterances=6, seed=3, jobs=1)
    folder = Path(res["folder"])
    utts = []
    for line in (folder / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        pcm, sr = sf.read(str(folder / rec["audio_filepath"]), dtype="int16")
        utts.append(Utt(rec["id"], rec["text"], rec["speaker"], pcm, sr))
    assert len(utts) == 6
    return utts
