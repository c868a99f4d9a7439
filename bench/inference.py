"""Inference speed and accuracy: torch eager fp32 vs onnxruntime fp32 vs onnxruntime int8, side by side.

What: one process, one set of utterances, one model. The log-mel features are computed once
(numpy, ``model_code.features.logmel``: shared preprocessing, timed separately); then each engine
runs the same batched forward (``model_code.onnx_runtime.batched_logprobs``, same batch plan and
long-form chunking) + greedy CTC decoding over all utterances. RTFx = audio seconds / wall seconds
of that forward + decoding (higher is faster); the best of ``--repeats`` interleaved passes is
kept, after one warm-up pass each. WER (jiwer, greedy) of each engine on the same utterances.

Model: the newest model the pipeline trained (``<root>/train/*/_SUCCESS.json``), else a freshly
initialized local-profile-size Conformer-CTC (speed figures only then: its WER is ~1 by
construction; the report says which). Audio: the pipeline's golden set when it exists under the
same root, else a golden set synthesized here with espeak-ng (``asrflow corpus golden``).

Goal (bench/README.md): int8 ≥ 2× torch eager RTFx with |ΔWER| ≤ 0.3 absolute.

    .venv/bin/python bench/inference.py [--profile local] [--threads 2] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def newest_success(root: Path, step: str) -> dict | None:
    found = glob.glob(str(root / step / "*" / "_SUCCESS.json"))
    if not found:
        return None
    return json.loads(Path(max(found, key=os.path.getmtime)).read_text())


def load_model(cfg, root: Path):
    """(model, tokenizer, feature kwargs, description)."""
    from model_code.features import feature_kwargs
    from model_code.packaging import load_model_dir

    train = newest_success(root, "train")
    if train is not None:
        d = Path(train["output_dir"]) / train["model_dir"]
        model, tok, info = load_model_dir(d)
        return model, tok, info["features"], f"trained by the pipeline: {d}"
    import torch

    from model_code.conformer import ConformerCTC
    from model_code.tokenizer import CharTokenizer

    torch.manual_seed(0)
    tok = CharTokenizer()
    m = cfg.model
    model = ConformerCTC(
        n_mels=cfg.features.n_mels, vocab_size=tok.vocab_size, d_model=m.d_model, n_layers=m.n_layers,
        n_heads=m.n_heads, ff_mult=m.ff_mult, conv_kernel=m.conv_kernel, dropout=m.dropout,
        subsampling_channels=m.subsampling_channels,
    ).eval()
    return model, tok, feature_kwargs(cfg.features), (
        f"freshly initialized {cfg.profile}-profile model (d_model {m.d_model}, {m.n_layers} layers): "
        "speed figures only, WER meaningless"
    )


def load_audio_set(cfg, n: int, tmp: Path, sr: int) -> tuple[list[np.ndarray], list[str], str]:
    """(waves at ``sr``, transcripts, description)."""
    from model_code.onnx_runtime import load_wave

    g = newest_success(cfg.root, "golden")
    if g is not None:
        import pyarrow.parquet as pq

        rows = pq.read_table(Path(g["output_dir"]) / g["manifest"], columns=["audio_path", "text"]).to_pylist()[:n]
        ws = Path(cfg.paths.data_workspace)
        waves = [load_wave(ws / r["audio_path"], sr)[0] for r in rows]
        return waves, [r["text"] for r in rows], f"pipeline golden set ({len(rows)} utterances)"
    from model_code.text import normalize_text
    from synth import corpus

    corpus.generate_golden(tmp / "golden", utterances=n, seed=1234, jobs=0)
    rows = [json.loads(x) for x in (tmp / "golden" / "manifest.jsonl").read_text().splitlines() if x.strip()]
    waves = [load_wave(tmp / "golden" / r["audio_filepath"], sr)[0] for r in rows]
    return waves, [normalize_text(r["text"]) for r in rows], f"synthesized espeak-ng golden set ({len(rows)} utterances)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="local")
    ap.add_argument("--utterances", type=int, default=60)
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 4))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from model_code.features import logmel
    from model_code.metrics import error_counts
    from model_code.onnx_export import export_onnx, quantize_int8, torch_run_fn
    from model_code.onnx_runtime import CtcDecoder, batched_logprobs
    from pipeline_tasks.config import load_config

    cfg = load_config(args.profile)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="asrflow-bench-inf-") as td:
        tmp = Path(td)
        model, tok, fkw, model_desc = load_model(cfg, cfg.root)
        waves, refs, audio_desc = load_audio_set(cfg, args.utterances, tmp, int(fkw["sample_rate"]))
        audio_s = sum(w.shape[0] for w in waves) / int(fkw["sample_rate"])
        t0 = time.perf_counter()
        feats = [logmel(w, **fkw) for w in waves]
        feat_s = time.perf_counter() - t0

        fp32 = export_onnx(model, tmp / "model.onnx", int(fkw["n_mels"]), cfg.export.opset)
        quantize_int8(fp32, tmp / "model.int8.onnx")
        quantize_int8(fp32, tmp / "model.int8conv.onnx", op_types=("MatMul", "Gemm", "Conv"))

        def ort_fn(path: Path):
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            so.inter_op_num_threads = 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            return lambda x, lens: tuple(s.run(["log_probs", "out_lengths"], {"features": x, "lengths": lens}))

        engines = {
            "torch eager fp32": torch_run_fn(model),
            "onnxruntime fp32": ort_fn(fp32),
            "onnxruntime int8": ort_fn(tmp / "model.int8.onnx"),
            # not what export ships: Conv weights quantized too (ConvInteger), to see what the
            # unquantized conv subsampling costs
            "onnxruntime int8+conv": ort_fn(tmp / "model.int8conv.onnx"),
        }
        sr, hop = int(fkw["sample_rate"]), int(fkw["hop_length"])
        chunk, overlap = int(cfg.decode.chunk_s * sr / hop), int(cfg.decode.chunk_overlap_s * sr / hop)
        greedy = CtcDecoder(tok, "greedy")
        best = {k: float("inf") for k in engines}
        hyps: dict[str, list[str]] = {}
        for k, fn in engines.items():  # warm-up
            hyps[k] = greedy(batched_logprobs(fn, feats, chunk, overlap))
        for _ in range(args.repeats):  # interleaved, so load drift hits every engine alike
            for k, fn in engines.items():
                t0 = time.perf_counter()
                greedy(batched_logprobs(fn, feats, chunk, overlap))
                best[k] = min(best[k], time.perf_counter() - t0)

    base = best["torch eager fp32"]
    rows = []
    for k in engines:
        c = error_counts(refs, hyps[k])
        rows.append({"engine": k, "seconds": best[k], "rtfx": audio_s / best[k], "speedup_vs_torch": base / best[k],
                     "wer": c["wer"], "cer": c["cer"]})
    out = {
        "model": model_desc,
        "audio": audio_desc,
        "audio_s": audio_s,
        "threads": args.threads,
        "repeats": args.repeats,
        "features_rtfx": audio_s / feat_s,
        "host": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "results": rows,
        "int8_wer_delta_vs_torch": rows[2]["wer"] - rows[0]["wer"],
        "goal_met": rows[2]["speedup_vs_torch"] >= 2.0 and abs(rows[2]["wer"] - rows[0]["wer"]) <= 0.3,
        "command": " ".join([".venv/bin/python", "bench/inference.py", *sys.argv[1:]]),
    }
    print(f"model: {model_desc}\naudio: {audio_desc}, {audio_s:.1f} s; threads {args.threads}; best of {args.repeats}")
    print(f"log-mel features (numpy, shared by all engines): RTFx {out['features_rtfx']:.0f}")
    print(f"{'engine':<22} {'RTFx':>8} {'× torch':>8} {'WER':>7} {'CER':>7}")
    for r in rows:
        print(f"{r['engine']:<22} {r['rtfx']:8.1f} {r['speedup_vs_torch']:8.2f} {r['wer']:7.3f} {r['cer']:7.3f}")
    print(f"goal (int8 >= 2x torch, |dWER| <= 0.3): {'met' if out['goal_met'] else 'NOT met'}")
    print(f"reproduce: {out['command']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
