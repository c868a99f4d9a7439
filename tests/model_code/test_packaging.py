"""Model folder round trip: weights, tokenizer, features, LM files."""

from __future__ import annotations

import json

import torch

from model_code.conformer import ConformerCTC
from model_code.packaging import load_model_dir, read_model_info, save_model_dir
from model_code.tokenizer import BPETokenizer, CharTokenizer

KW = dict(n_mels=40, vocab_size=29, d_model=32, n_layers=1, n_heads=2, ff_mult=2, conv_kernel=5,
          dropout=0.0, subsampling_channels=8)
FEATS = {"sample_rate": 16000, "n_mels": 40, "n_fft": 400, "win_length": 400, "hop_length": 160,
         "f_min": 0.0, "f_max": None, "log_offset": 1e-6}


def test_round_trip_without_lm(tmp_path):
    torch.manual_seed(0)
    model = ConformerCTC(**KW).eval()
    out = save_model_dir(tmp_path / "m", model, KW, CharTokenizer(), FEATS, meta={"epoch": 3})
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "weights.pt"]
    loaded, tok, info = load_model_dir(out)
    assert tok == CharTokenizer() and info["lm"] is None and info["meta"] == {"epoch": 3}
    assert info["features"] == FEATS and info["model_kwargs"] == KW
    x = torch.randn(2, 50, 40)
    lens = torch.tensor([50, 31])
    with torch.no_grad():
        a, _ = model(x, lens)
        b, _ = loaded(x, lens)
    assert torch.equal(a, b)
    assert not loaded.training
    # the weights file is a plain tensor dict: loads under weights_only
    sd = torch.load(out / "weights.pt", weights_only=True)
    assert set(sd) == set(model.state_dict())


def test_round_trip_with_lm_and_bpe(tmp_path):
    texts = ["the cat sat on the mat", "the dog sat on the log"] * 4
    tok = BPETokenizer.train(texts, vocab_size=24)
    kw = dict(KW, vocab_size=tok.vocab_size)
    model = ConformerCTC(**kw)
    out = save_model_dir(tmp_path / "m", model, kw, tok, FEATS, lm_texts=texts)
    info = json.loads((out / "model.json").read_text())
    assert info["lm"] == {"lexicon": "lexicon.txt", "arpa": "lm.arpa"}
    assert (out / "lm.arpa").read_text().startswith("\\data\\")
    lex = (out / "lexicon.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lex] == ["cat", "dog", "log", "mat", "on", "sat", "the"]
    _, tok2, info2 = load_model_dir(out)
    assert tok2 == tok
    assert info2["lm"]["arpa"] == str(out / "lm.arpa")
    assert read_model_info(out)["lm"]["lexicon"] == str(out / "lexicon.txt")
    # saving again over the folder replaces files atomically and leaves no temp files behind
    save_model_dir(out, model, kw, tok, FEATS)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert read_model_info(out)["lm"] is None
    assert not (out / "lm.arpa").exists() and not (out / "lexicon.txt").exists()
