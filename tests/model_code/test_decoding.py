"""Greedy and beam CTC decoding, no-torch import, chunked long-form inference."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from model_code.decoding import BeamDecoder, _collapse_row, chunked_logprobs, greedy_decode
from model_code.lm import build_arpa, build_lexicon, lexicon_words
from model_code.tokenizer import BPETokenizer, CharTokenizer

TOK = CharTokenizer()
TEXTS = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog", "the cat ran",
         "a cut on the leg"]


def frames_for(spec, tok=TOK):
    """Constructed CTC log-probs: each (token, {alt: p}) becomes a token frame then a blank frame."""
    toks = tok.tokens()
    v = tok.vocab_size
    rows = []
    for ch, alts in spec:
        f = np.full(v, 1e-4)
        rest = 1.0 - sum(alts.values())
        f[toks.index(ch)] = rest
        for a, p in alts.items():
            f[toks.index(a)] = p
        rows.append(f)
        b = np.full(v, 1e-4)
        b[0] = 1.0
        rows.append(b)
    p = np.array(rows)
    return np.log(p / p.sum(1, keepdims=True)).astype(np.float32)


def spell(text, alts=None):
    alts = alts or {}
    return [("|" if c == " " else c, alts.get(i, {})) for i, c in enumerate(text)]


def test_greedy_decode_collapses_and_respects_lengths():
    lp = np.stack([frames_for(spell("the cat")), frames_for(spell("the cat"))])
    out = greedy_decode(lp, [lp.shape[1], 6], TOK)
    assert out == ["the cat", "the"]
    assert _collapse_row(np.array([3, 3, 0, 3, 1, 1])) == [3, 3, 1]


def test_decoding_module_does_not_import_torch():
    code = ("import sys, model_code.decoding, model_code.lm, model_code.tokenizer, model_code.metrics; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    (d / "lexicon.txt").write_text(build_lexicon(lexicon_words(TEXTS), TOK))
    (d / "lm.arpa").write_text(build_arpa(TEXTS, order=3))
    return d / "lexicon.txt", d / "lm.arpa"


def test_beam_with_lm_fixes_greedy_misspelling(lm_files):
    lex, arpa = lm_files
    # "cat" where the acoustics prefer "u" over "a" a little: greedy says "cut", which is a
    # lexicon word too; only the LM ("the cat sat" seen, "the cut" never) can fix it
    lp = frames_for(spell("the cut sat", {5: {"a": 0.45}}))[None]
    assert greedy_decode(lp, None, TOK) == ["the cut sat"]
    no_lm = BeamDecoder(TOK, str(lex), None, beam_size=20)
    assert no_lm.decode(lp, [lp.shape[1]]) == ["the cut sat"]
    with_lm = BeamDecoder(TOK, str(lex), str(arpa), beam_size=20, lm_weight=1.0, word_score=0.0)
    assert with_lm.decode(lp, [lp.shape[1]]) == ["the cat sat"]


def test_beam_lexicon_fixes_non_word(lm_files):
    lex, arpa = lm_files
    lp = frames_for(spell("the cst sat", {5: {"a": 0.35}}))[None]
    assert greedy_decode(lp, None, TOK) == ["the cst sat"]
    dec = BeamDecoder(TOK, str(lex), str(arpa), beam_size=20, lm_weight=0.5)
    assert dec.decode(lp) == ["the cat sat"]
    free = BeamDecoder(TOK, None, None, beam_size=20)
    assert free.decode(lp) == ["the cst sat"]  # lexicon-free, no LM: the best path


def test_beam_batch_lengths(lm_files):
    lex, arpa = lm_files
    a = frames_for(spell("a cat"))
    b = frames_for(spell("the dog sat"))
    lp = np.full((2, len(b), TOK.vocab_size), -10.0, dtype=np.float32)
    lp[0, : len(a)] = a
    lp[1] = b
    dec = BeamDecoder(TOK, str(lex), str(arpa), beam_size=10)
    assert dec.decode(lp, [len(a), len(b)]) == ["a cat", "the dog sat"]


def test_beam_with_bpe_tokenizer(tmp_path):
    tok = BPETokenizer.train(TEXTS * 3, vocab_size=30)
    (tmp_path / "lex.txt").write_text(build_lexicon(lexicon_words(TEXTS), tok))
    (tmp_path / "lm.arpa").write_text(build_arpa(TEXTS, 2))
    ids = tok.encode("the dog sat")
    v = tok.vocab_size
    rows = []
    for i in ids:
        f = np.full(v, 1e-4)
        f[i] = 1.0
        rows.append(f)
        b = np.full(v, 1e-4)
        b[0] = 1.0
        rows.append(b)
    p = np.array(rows)
    lp = np.log(p / p.sum(1, keepdims=True)).astype(np.float32)[None]
    assert greedy_decode(lp, None, tok) == ["the dog sat"]
    dec = BeamDecoder(tok, str(tmp_path / "lex.txt"), str(tmp_path / "lm.arpa"), beam_size=10)
    assert dec.decode(lp) == ["the dog sat"]


def test_chunked_merge_is_exact_for_a_local_model():
    """With a model whose receptive field fits in half the overlap, merging is exact."""
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((403, 8)).astype(np.float32)

    def run(f):  # (t, 8) → (ceil(t/4), 8): mean of each 4-frame window and its neighbours
        t = f.shape[0]
        n = -(-t // 4)
        pad = np.zeros((n * 4 - t, f.shape[1]), np.float32)
        g = np.concatenate([f, pad]).reshape(n, 4, -1).mean(1)
        gp = np.concatenate([g[:1] * 0, g, g[:1] * 0])
        return gp[:-2] + gp[1:-1] + gp[2:]

    full = run(feats)
    for chunk, overlap in [(100, 40), (64, 16), (160, 60)]:
        got = chunked_logprobs(run, feats, chunk, overlap)
        assert got.shape == full.shape
        np.testing.assert_allclose(got, full, atol=1e-6)
    assert chunked_logprobs(run, feats[:50], 100, 40).shape == (13, 8)  # short input: one call


def test_chunked_reproduces_full_utterance_with_a_trained_conformer():
    """Train a tiny Conformer-CTC on synthetic 'speech' (one mel template per token) for a few
    seconds, then check chunked long-form inference transcribes exactly like the full pass."""
    import torch

    from model_code.conformer import ConformerCTC

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend with other tests
    try:
        _train_and_compare_chunked(torch, ConformerCTC)
    finally:
        torch.set_num_threads(threads)


def _train_and_compare_chunked(torch, ConformerCTC):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    tok = CharTokenizer(chars=" abcdef")
    v, n_mels = tok.vocab_size, 20
    templ = rng.standard_normal((v, n_mels)).astype(np.float32) * 2

    def synth(n_tok):
        ids = rng.integers(1, v, n_tok)
        parts = []
        for i in ids:
            parts.append(np.repeat(templ[:1], rng.integers(2, 6), 0))
            parts.append(np.repeat(templ[i : i + 1], rng.integers(6, 10), 0))
        parts.append(np.repeat(templ[:1], 4, 0))
        f = np.concatenate(parts)
        return (f + 0.5 * rng.standard_normal(f.shape)).astype(np.float32), ids

    model = ConformerCTC(n_mels=n_mels, vocab_size=v, d_model=32, n_layers=2, n_heads=4, ff_mult=2,
                         conv_kernel=7, dropout=0.0, subsampling_channels=8)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(160):
        data = [synth(int(rng.integers(3, 10))) for _ in range(8)]
        t_max = max(len(f) for f, _ in data)
        l_max = max(len(i) for _, i in data)
        x = torch.zeros(8, t_max, n_mels)
        tgt = torch.zeros(8, l_max, dtype=torch.long)
        for k, (f, i) in enumerate(data):
            x[k, : len(f)] = torch.from_numpy(f)
            tgt[k, : len(i)] = torch.from_numpy(i)
        lp, ol = model(x, torch.tensor([len(f) for f, _ in data]))
        loss = torch.nn.functional.ctc_loss(lp.transpose(0, 1), tgt, ol,
                                            torch.tensor([len(i) for _, i in data]), zero_infinity=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    def run(f):
        with torch.no_grad():
            return model(torch.from_numpy(f)[None], torch.tensor([len(f)]))[0][0].numpy()

    correct = same = 0
    for _ in range(6):
        feats, ids = synth(40)  # ~450 frames, 4 chunks of 120 with 40 overlap
        full = run(feats)
        chunked = chunked_logprobs(run, feats, chunk_frames=120, overlap_frames=40)
        assert chunked.shape == full.shape
        g_full = greedy_decode(full[None], None, tok)[0]
        g_chunk = greedy_decode(chunked[None], None, tok)[0]
        correct += g_full == " ".join(tok.decode(ids).split())
        same += g_chunk == g_full
    assert correct >= 5  # the model did learn the task
    assert same >= 5
