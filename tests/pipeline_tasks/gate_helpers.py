"""Models of controlled quality for the gate / export / promote / inference tests.

Tiny models barely learn on a real schedule, so "better" and "worse" are constructed: a tiny
Conformer-CTC is trained (plain torch loop, Adam) for a fixed number of steps on the tiny golden
set's cached features until it transcribes part of it, and a copy of it with heavy Gaussian
noise added to every weight is the "worse" model. Both are written in the packaging format
(``model_code.packaging``) with a lexicon + 3-gram LM built from the golden texts, exactly what
the train step publishes, and wrapped in a train-step-like result record.

Everything is computed once per test session (a file lock + a marker under pytest's base temp
folder), whichever test module asks first.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

TRAIN_STEPS = 120  # measured: golden WER ~0.54 / CER ~0.21 after 120 steps (noised copy: WER >= 1)
MODEL_KWARGS = {
    "n_mels": 80,
    "vocab_size": 29,
    "d_model": 32,
    "n_layers": 1,
    "n_heads": 2,
    "ff_mult": 2,
    "conv_kernel": 7,
    "dropout": 0.0,
    "subsampling_channels": 8,
}


def train_tiny_model(index_path: Path, steps: int = TRAIN_STEPS, seed: int = 0):
    """Train a tiny ConformerCTC on the utterances of a feature index; returns ``(model, tokenizer)``."""
    import torch

    from model_code.conformer import ConformerCTC
    from model_code.dataset import FeatureTable
    from model_code.tokenizer import CharTokenizer

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    table = FeatureTable(index_path)
    tok = CharTokenizer()
    feats = [torch.from_numpy(table.features(i)) for i in range(len(table))]
    toks = [torch.tensor(tok.encode(t)) for t in table.texts()]
    x = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)  # (B, T, F)
    lens = torch.tensor([f.shape[0] for f in feats])
    y = torch.cat(toks)
    ylens = torch.tensor([len(t) for t in toks])
    model = ConformerCTC(**MODEL_KWARGS)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    ctc = torch.nn.CTCLoss(blank=0, zero_infinity=True)
    model.train()
    for _ in range(steps):
        lp, olens = model(x, lens)
        loss = ctc(lp.transpose(0, 1), y, olens, ylens)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
    model.eval()
    return model, tok, float(loss.detach())


def noised_state(model, scale: float, seed: int = 1) -> dict[str, Any]:
    """The model's state_dict with N(0, scale * std(w)) noise added to every float weight."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point() and v.numel() > 1:
            std = float(v.std()) or 1.0
            out[k] = v + scale * std * torch.randn(v.shape, generator=g)
        else:
            out[k] = v.clone()
    return out


def save(model_dir: Path, model, tok, texts: list[str], feature_kwargs: dict[str, Any], meta: dict[str, Any]) -> Path:
    from model_code.packaging import save_model_dir

    return save_model_dir(model_dir, model, MODEL_KWARGS, tok, feature_kwargs, lm_texts=texts, meta=meta)


def train_result(model_dir: Path, name: str) -> dict[str, Any]:
    """A train-step result record (``model_dir`` relative to ``output_dir``) for a model folder."""
    md5 = hashlib.md5((model_dir / "weights.pt").read_bytes()).hexdigest()
    return {
        "step": "train",
        "key": f"{name}-{md5[:10]}",
        "output_dir": str(model_dir.parent),
        "model_dir": model_dir.name,
        "train_md5": f"train-data-{name}",
        "dev_wer": None,
        "mlflow_run_id": None,
    }


def quality_models(base: Path, golden: dict[str, Any], feature_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``{"good": train result, "bad": train result, "loss": float}``, built once under ``base``."""
    from model_code.dataset import FeatureTable

    base.mkdir(parents=True, exist_ok=True)
    marker = base / "models.json"
    with FileLock(str(base / ".lock")):
        if not marker.exists():
            index = Path(golden["output_dir"]) / golden["index"]
            texts = FeatureTable(index, in_memory=False).texts()
            model, tok, loss = train_tiny_model(index)
            good = save(base / "good" / "model", model, tok, texts, feature_kwargs, {"study_name": "study-good"})
            bad_model = type(model)(**MODEL_KWARGS)
            bad_model.load_state_dict(noised_state(model, 3.0))
            bad = save(base / "bad" / "model", bad_model, tok, texts, feature_kwargs, {"study_name": "study-bad"})
            marker.write_text(json.dumps({"good": str(good), "bad": str(bad), "loss": loss}))
    d = json.loads(marker.read_text())
    return {"good": train_result(Path(d["good"]), "good"), "bad": train_result(Path(d["bad"]), "bad"), "loss": d["loss"]}


def copy_model(src: dict[str, Any], dst: Path) -> dict[str, Any]:
    shutil.copytree(Path(src["output_dir"]) / src["model_dir"], dst / "model")
    return train_result(dst / "model", dst.name)


def greedy_wer(model_result: dict[str, Any], golden: dict[str, Any]) -> float:
    """Greedy golden-set WER of a packaged model (torch), for test sanity checks."""
    from model_code.dataset import FeatureTable
    from model_code.metrics import error_counts
    from model_code.onnx_export import torch_run_fn
    from model_code.onnx_runtime import CtcDecoder, batched_logprobs
    from model_code.packaging import load_model_dir

    model, tok, _ = load_model_dir(Path(model_result["output_dir"]) / model_result["model_dir"])
    table = FeatureTable(Path(golden["output_dir"]) / golden["index"])
    lps = batched_logprobs(torch_run_fn(model), [table.features(i) for i in range(len(table))], 1600, 200)
    return float(error_counts(table.texts(), CtcDecoder(tok, "greedy")(lps))["wer"])


def wave_rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def export_and_evaluate(cfg, model_res: dict, golden_res: dict) -> tuple[dict, dict]:
    """The real export → evaluate chain (the gate judges the exported file): ``(export, evaluate)``."""
    from pipeline_tasks.steps import evaluate, export

    ex = export.run(cfg, {"train": model_res, "golden": golden_res})
    ev = evaluate.run(cfg, {"train": model_res, "golden": golden_res, "export": ex})
    return ex, ev
