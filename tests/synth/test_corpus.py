"""Tests of the embedded synthetic corpus (real espeak-ng, Festival and flite, real files; all tiny).

They check what later steps rely on: the NeMo manifest schema and that it agrees with the audio,
byte-identical output for the same seed whatever the number of jobs, new sentences each week,
a golden set whose sentences and speakers never occur in training, long-form audio, and a
sentence generator with enough variety (and a Zipf-like word distribution) to learn from.
The synthesizer/channel mix, the ramp and the golden slices are in ``test_mix.py``.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from pipeline_tasks.cli import app
from synth import corpus

TEXT_RE = re.compile(r"[a-z']+( [a-z']+)*")


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def _file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_week_manifest_schema_and_audio(tiny_landing):
    manifest = tiny_landing / "week-001" / "manifest.jsonl"
    rows = _rows(manifest)
    assert len(rows) == 48
    assert len({r["id"] for r in rows}) == 48
    for r in rows:
        assert set(r) == {"id", "audio_filepath", "duration", "text", "speaker", "synth", "condition"}
        assert r["synth"] in ("espeak", "festival") and r["condition"] in corpus.CONDITIONS
        assert (
            isinstance(r["duration"], float) and isinstance(r["text"], str) and isinstance(r["speaker"], str)
        )
        assert not Path(r["audio_filepath"]).is_absolute() and ".." not in Path(r["audio_filepath"]).parts
        audio = manifest.parent / r["audio_filepath"]
        info = sf.info(audio)
        assert info.subtype == "PCM_16" and info.channels == 1
        assert abs(info.frames / info.samplerate - r["duration"]) < 0.010
        assert TEXT_RE.fullmatch(r["text"]), r["text"]
        assert corpus.MIN_WORDS <= len(r["text"].split()) <= corpus.MAX_WORDS or r["duration"] > 20
        assert 0.5 < r["duration"] < 60
        assert len(r["text"]) / r["duration"] < 30  # the text was really spoken, at a speakable rate
        # not silence, not clipped noise: the level sits in the drawn range (peak -20 to -1.5 dBFS)
        x, _ = sf.read(audio)
        assert 0.09 < np.max(np.abs(x)) < 0.85


def test_same_seed_is_byte_identical_whatever_jobs(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="synth.corpus")
    a = corpus.generate_week(tmp_path / "a", week=2, utterances=10, seed=11, jobs=1)
    b = corpus.generate_week(tmp_path / "b", week=2, utterances=10, seed=11, jobs=2)
    ha, hb = _file_hashes(tmp_path / "a" / "week-002"), _file_hashes(tmp_path / "b" / "week-002")
    assert len(ha) == 12 and ha == hb  # 10 wavs + manifest + corpus_info
    assert a["manifest_sha256"] == b["manifest_sha256"] == ha["manifest.jsonl"]
    assert a["n"] == 10 and a["hours"] > 0 and Path(a["manifest"]).is_file()
    assert "10/10 utterances" in caplog.text  # progress is reported
    # re-running into the existing folder rewrites the same bytes and leaves no temporary files
    corpus.generate_week(tmp_path / "a", week=2, utterances=10, seed=11, jobs=2)
    assert _file_hashes(tmp_path / "a" / "week-002") == ha
    # another seed gives other data
    c = corpus.generate_week(tmp_path / "c", week=2, utterances=10, seed=12, jobs=2)
    assert c["manifest_sha256"] != a["manifest_sha256"]


def test_weeks_draw_new_sentences(tiny_landing, tmp_path):
    corpus.generate_week(tmp_path, week=2, utterances=48, seed=7, jobs=2)
    w1 = {r["text"] for r in _rows(tiny_landing / "week-001" / "manifest.jsonl")}
    w2 = {r["text"] for r in _rows(tmp_path / "week-002" / "manifest.jsonl")}
    assert len(w1 & w2) <= 2  # short sentences may recur by chance, but the weeks are new data
    v1 = {w for t in w1 for w in t.split()}
    v2 = {w for t in w2 for w in t.split()}
    assert len(v1 & v2) >= 30  # ...over an overlapping vocabulary


def test_golden_is_disjoint_from_training(tiny_landing, tiny_golden):
    train = _rows(tiny_landing / "week-001" / "manifest.jsonl")
    golden = _rows(tiny_golden / "manifest.jsonl")
    assert len(golden) == 16
    assert all(TEXT_RE.fullmatch(r["text"]) for r in golden)
    assert not {r["text"] for r in golden} & {r["text"] for r in train}
    # disjoint by construction: every golden sentence is in the golden hash partition, no training one is
    # (a long-form row joins several sentences of its partition: its whole text is not one sentence)
    assert all(corpus.is_golden_sentence(r["text"]) for r in golden if r["duration"] <= 20)
    assert not any(corpus.is_golden_sentence(r["text"]) for r in train if r["duration"] <= 20)
    # golden espeak speakers come from voice combinations that training weeks never use
    train_pool = {corpus.speaker_id(*s) for s in corpus.speakers(False)}
    golden_pool = {corpus.speaker_id(*s) for s in corpus.speakers(True)}
    assert train_pool.isdisjoint(golden_pool) and len(golden_pool) > 50
    assert {r["speaker"] for r in golden if r["synth"] == "espeak"} <= golden_pool
    # (a training espeak speaker may carry a signal-level warp suffix: _w+100)
    assert {r["speaker"].split("_w")[0] for r in train if r["synth"] == "espeak"} <= train_pool
    # ...while every base voice and every variant is still heard in training
    assert {v for v, _, _ in corpus.speakers(False)} == set(corpus.VOICES)
    assert {var for _, var, _ in corpus.speakers(False)} == set(corpus.VARIANTS)


def test_speaker_ids_name_one_voice_setting(tmp_path):
    pool = corpus.speakers(False)
    ids = [corpus.speaker_id(*s) for s in pool]
    assert len(set(ids)) == len(ids) > 500  # one id per (voice, variant, pitch), many speakers
    # the same speaker id always means the same espeak settings: same sentence, same samples
    voice, variant, pitch = pool[3]
    a = corpus._espeak("the dog ran home.", voice, variant, pitch, 160)
    b = corpus._espeak("the dog ran home.", voice, variant, pitch, 160)
    other = corpus._espeak("the dog ran home.", voice, variant, pitch + 10, 160)
    assert np.array_equal(a, b) and not np.array_equal(a, other)


def test_long_form_share_gives_audio_over_20_s(tmp_path):
    res = corpus.generate_week(tmp_path, week=3, utterances=2, seed=5, jobs=2, long_form_share=1.0)
    rows = _rows(Path(res["manifest"]))
    assert res["n_long_form"] == 2
    for r in rows:
        assert r["duration"] > 20.0
        assert TEXT_RE.fullmatch(r["text"]) and len(r["text"].split()) > 20
        x, sr = sf.read(Path(res["folder"]) / r["audio_filepath"])
        assert len(x) / sr > 20.0


def test_sentence_generator_variety_and_zipf():
    rng = np.random.default_rng(0)
    texts = [corpus.draw_sentence(rng, golden=False)[0] for _ in range(1500)]
    lengths = [len(t.split()) for t in texts]
    assert min(lengths) >= 3 and max(lengths) <= 20 and np.mean(lengths) > 5
    assert all(TEXT_RE.fullmatch(t) for t in texts)
    assert len(set(texts)) > 0.97 * len(texts)
    firsts = collections.Counter(t.split()[0] for t in texts)
    questions = sum(firsts[w] for w in ("do", "does", "did", "what", "where", "why", "when", "how", "can"))
    assert questions > 0.05 * len(texts) and firsts["there"] > 0.03 * len(texts)  # several templates
    counts = collections.Counter(w for t in texts for w in t.split())
    assert len(counts) > 1500  # a real vocabulary
    freqs = np.array(sorted(counts.values(), reverse=True), dtype=float)
    slope = np.polyfit(np.log(np.arange(1, 301)), np.log(freqs[:300]), 1)[0]
    assert -1.5 < slope < -0.6, slope  # Zipf-like: frequency ~ 1 / rank


def test_lexicon_is_committed_and_clean():
    lex = corpus.load_lexicon()
    forms = {f for cls in lex.values() for entry in cls.forms for f in entry}
    assert sum(len(c.forms) for c in lex.values()) > 2500 and len(forms) > 5000
    assert all(re.fullmatch(r"[a-z']+", f) for f in forms)
    assert ("go", "goes", "went", "going", "gone") in lex["verb"].forms


def test_noise_is_added_at_the_drawn_snr():
    sr = corpus.SAMPLE_RATE
    tone = np.sin(2 * np.pi * 220 * np.arange(sr) / sr) * 0.4
    job = corpus._Job(Path(), "x", (1,), False, corpus.Mix(), 0.0, (20.0, 20.0))
    y = corpus._channel(tone, "clean", np.random.default_rng(3), job, []).astype(float)
    lead = int(0.04 * sr)  # the added leading silence holds only noise
    noise_rms = np.sqrt(np.mean(y[:lead] ** 2))
    sig_rms = np.sqrt(np.mean(y[y.size // 3 : 2 * y.size // 3] ** 2))
    assert 0 < noise_rms and 15 < 20 * np.log10(sig_rms / noise_rms) < 25


@pytest.mark.parametrize(
    "kwargs",
    [
        {"utterances": 0},
        {"week": -1},
        {"seed": -3},
        {"jobs": -1},
        {"long_form_share": 1.5},
        {"noise_snr_db": (40.0, 10.0)},
        {"mix": corpus.Mix(synth_shares={"flite": 0.1})},
        {"mix": corpus.Mix(synth_shares={"festival": 0.7, "mbrola": 0.5})},
        {"mix": corpus.Mix(condition_shares={"reverb": 0.8, "noisy": 0.4})},
        {"mix": corpus.Mix(reverb_rt60_s=(1.0, 0.2))},
        {"mix": corpus.Mix(diversity_ramp_weeks=-1)},
        {"mix": corpus.Mix(voice_ramp_weeks=-1)},
    ],
)
def test_bad_arguments_give_clear_errors(tmp_path, kwargs):
    args = {"week": 1, "utterances": 2, "seed": 1, "jobs": 1, **kwargs}
    mix = kwargs.get("mix")
    what = next(iter(kwargs))
    if mix:  # the error names the offending field (or flite)
        what = (
            "flite"
            if "flite" in mix.synth_shares
            else next(
                f.name
                for f in dataclasses.fields(mix)
                if getattr(mix, f.name) != getattr(corpus.Mix(), f.name)
            )
        )
    with pytest.raises(corpus.CorpusError, match=what):
        corpus.generate_week(tmp_path, **args)
    assert not (tmp_path / "week-001" / "manifest.jsonl").exists()


def test_cli_help_and_generate(tmp_path):
    runner = CliRunner()
    for verb in ("generate", "golden"):
        res = runner.invoke(app, ["corpus", verb, "--help"])
        assert res.exit_code == 0 and "--utterances" in res.output and "--seed" in res.output
    res = runner.invoke(app, ["corpus", "golden", "--out", str(tmp_path), "--utterances", "2", "--jobs", "1"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{") :])
    assert summary["n"] == 2 and Path(summary["manifest"]) == tmp_path / "manifest.jsonl"
    assert all(r["id"].startswith("golden-") for r in _rows(tmp_path / "manifest.jsonl"))
