"""The ``export`` step: ONNX export, onnxruntime parity check, int8 quantization, RTFx.

What: exports the train step's model to ``model.onnx`` (opset ``export.opset``, dynamic batch and
time axes; inputs ``features (B, T, n_mels)`` float32 + ``lengths (B,)`` int64, outputs
``log_probs (B, T', V)`` + ``out_lengths (B,)``) with everything a server needs in its
``metadata_props`` (tokenizer, log-mel config, sample rate, quantization, lexicon + LM text,
training-data and golden md5s, git commit). The lexicon and LM are also written as sibling files
(``lexicon.txt``, ``lm.arpa``), which promote logs next to the model in MLflow.

Parity: on the golden set, torch and onnxruntime log-probs must agree within
``export.parity_atol`` (max abs over valid frames) and the greedy transcripts must be identical;
otherwise the step raises :class:`ExportParityError` (a broken export is a defect, not an outcome).

Quantization: ``onnxruntime.quantization.quantize_dynamic`` (MatMul/Gemm weights → QInt8) into
``model.int8.onnx``, kept only when its golden WER (decoded with ``gate.decode``) is within
``export.int8_max_wer_delta`` of the fp32 file's; otherwise deleted and ``onnx_int8`` is null.
``served`` names the one file that serves (int8 when kept and ``export.register_file`` allows
it, else fp32): the ``evaluate`` gate scores exactly that file and ``promote`` registers it.

Feature extraction is not part of the graph: clients compute log-mels with
``model_code.features.logmel`` (numpy), the function featurize used for the training features.

Key: train key + weights md5 + golden md5 + export/decode/gate.decode config. Not the evaluate
result: a new champion re-runs the gate, not the export.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline_tasks.config import AsrflowConfig
from pipeline_tasks.contract import file_md5, resolve, run_step, step_key
from pipeline_tasks.records import ExportResult, StepInputs

log = logging.getLogger(__name__)

STEP = "export"
CODE_VERSION = "2"  # 2: chooses the served file (served/served_onnx), lineage of warm starts


class ExportParityError(RuntimeError):
    """The ONNX model does not reproduce the torch model on the golden set."""


def _wer(refs: list[str], hyps: list[str]) -> float:
    from model_code.metrics import error_counts

    return float(error_counts(refs, hyps)["wer"])


def run(cfg: AsrflowConfig, inputs: StepInputs, force: bool = False) -> ExportResult:
    train, golden = inputs["train"], inputs["golden"]
    model_dir = resolve(train, train["model_dir"])
    model_md5 = file_md5(model_dir / "weights.pt")
    key = step_key(
        STEP,
        {"export": cfg.export, "decode": cfg.decode, "gate_decode": cfg.gate.decode},
        {"train": train["key"], "model_md5": model_md5, "golden": golden["golden_md5"]},
        CODE_VERSION,
    )
    # the packaged torch model travels with the export: promote registers it beside the ONNX file
    # (warm starts load it; the ONNX file is what serves)

    def work(tmp: Path) -> dict[str, Any]:
        from model_code.dataset import FeatureTable
        from model_code.onnx_export import (
            build_metadata,
            compare_logprobs,
            export_onnx,
            quantize_int8,
            torch_run_fn,
        )
        from model_code.onnx_runtime import CtcDecoder, OnnxAsr, batched_logprobs
        from model_code.packaging import load_model_dir
        from pipeline_tasks.services.golden_features import golden_features
        from pipeline_tasks.services.tracking import git_commit

        e, d = cfg.export, cfg.decode
        model, tok, info = load_model_dir(model_dir)
        lm = info.get("lm") or {}
        lex_text = Path(lm["lexicon"]).read_text() if lm.get("lexicon") else None
        arpa_text = Path(lm["arpa"]).read_text() if lm.get("arpa") else None
        meta = info.get("meta") or {}
        lineage = {
            "train_md5": train.get("train_md5") or meta.get("train_md5"),
            "golden_md5": golden["golden_md5"],
            "git_commit": git_commit(),
            "train_key": train["key"],
            "model_md5": model_md5,
            "model_kwargs": info["model_kwargs"],
            "decode": {"lm_weight": d.lm_weight, "word_score": d.word_score, "beam_size": d.beam_size},
            # continual training: where the model started and what it has seen
            "parent_version": meta.get("parent_version", "scratch"),
            "data_snapshot_tag": meta.get("data_snapshot_tag"),
            "data_snapshot_md5": meta.get("data_snapshot_md5"),
            "batches": meta.get("batches"),
            "new_batches": meta.get("new_batches"),
            "train_minutes": (train.get("lineage") or {}).get("train_minutes"),
        }
        md = build_metadata(tok, info["features"], lex_text, arpa_text, None, lineage)
        onnx_path = export_onnx(model, tmp / "model.onnx", int(info["model_kwargs"]["n_mels"]), e.opset, md)
        if lex_text and arpa_text:
            shutil.copyfile(lm["lexicon"], tmp / "lexicon.txt")
            shutil.copyfile(lm["arpa"], tmp / "lm.arpa")

        # -- parity on the golden set ------------------------------------------------------
        table = FeatureTable(resolve(golden, golden["index"]), in_memory=False)
        refs = table.texts()
        feats = golden_features(cfg, golden, info["features"])
        sr, hop = int(info["features"]["sample_rate"]), int(info["features"]["hop_length"])
        chunk, overlap = int(round(d.chunk_s * sr / hop)), int(round(d.chunk_overlap_s * sr / hop))
        audio_s = float(table.durations().sum())
        t0 = time.perf_counter()
        lp_torch = batched_logprobs(torch_run_fn(model), feats, chunk, overlap)
        torch_s = time.perf_counter() - t0
        fp32 = OnnxAsr(onnx_path, decode="greedy", chunk_s=d.chunk_s, chunk_overlap_s=d.chunk_overlap_s)
        t0 = time.perf_counter()
        lp_onnx = fp32.logprobs(feats)
        onnx_s = time.perf_counter() - t0
        cmp = compare_logprobs(lp_torch, lp_onnx)
        greedy = CtcDecoder(tok, "greedy")
        g_torch, g_onnx = greedy(lp_torch), greedy(lp_onnx)
        same = g_torch == g_onnx
        n_diff = sum(a != b for a, b in zip(g_torch, g_onnx, strict=True))
        parity = {
            "max_abs_diff": cmp["max_abs_diff"],
            "atol": e.parity_atol,
            "argmax_agreement": cmp["argmax_agreement"],
            "transcripts_equal": same,
            "n_transcripts_differing": n_diff,
            "n_utts": len(refs),
        }
        if not (cmp["max_abs_diff"] <= e.parity_atol and same):
            raise ExportParityError(
                f"ONNX parity failed on the golden set: max |Δ log-prob| {cmp['max_abs_diff']:.3g} "
                f"(atol {e.parity_atol:g}), {n_diff}/{len(refs)} greedy transcripts differ"
            )

        # -- WER of fp32 and int8 with the gate's decoder ----------------------------------------
        lex_p, lm_p = (str(tmp / "lexicon.txt"), str(tmp / "lm.arpa")) if lex_text and arpa_text else (None, None)
        decoder = CtcDecoder(tok, cfg.gate.decode, lex_p, lm_p, d.beam_size, d.lm_weight, d.word_score)
        wer_fp32 = _wer(refs, decoder(lp_onnx))
        wer_int8 = None
        int8_kept = False
        int8_s = None
        quant = None
        if e.quantize_int8:
            quant = quantize_int8(onnx_path, tmp / "model.int8.onnx")
            q = OnnxAsr(tmp / "model.int8.onnx", decode="greedy", chunk_s=d.chunk_s, chunk_overlap_s=d.chunk_overlap_s)
            t0 = time.perf_counter()
            lp_q = q.logprobs(feats)
            int8_s = time.perf_counter() - t0
            wer_int8 = _wer(refs, decoder(lp_q))
            int8_kept = wer_int8 - wer_fp32 <= e.int8_max_wer_delta
            if not int8_kept:
                log.info("int8 dropped: golden WER %.4f vs fp32 %.4f (max delta %g)", wer_int8, wer_fp32, e.int8_max_wer_delta)
                (tmp / "model.int8.onnx").unlink()
        rtfx = {
            "torch_fp32": audio_s / torch_s if torch_s else None,
            "onnx_fp32": audio_s / onnx_s if onnx_s else None,
            "onnx_int8": audio_s / int8_s if int8_s else None,
            "note": "model forward only (features precomputed), golden set, this host; see bench/inference.py",
        }
        report = {
            "parity": parity,
            "wer_fp32": wer_fp32,
            "wer_int8": wer_int8,
            "int8_kept": int8_kept,
            "quantization": quant,
            "decode_used": decoder.mode,
            "rtfx": rtfx,
            "audio_s": audio_s,
            "lineage": lineage,
            "opset": e.opset,
        }
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
        log.info(
            "export: parity max|Δ| %.2e, WER fp32 %.4f int8 %s (%s)",
            cmp["max_abs_diff"],
            wer_fp32,
            "n/a" if wer_int8 is None else f"{wer_int8:.4f}",
            "kept" if int8_kept else "not kept",
        )
        # the file that serves, the gate judges and promote registers: one decision, made here
        served = "int8" if (int8_kept and e.register_file == "int8_if_kept") else "fp32"
        served_rel = "model.int8.onnx" if served == "int8" else "model.onnx"
        return {
            "served": served,
            "served_onnx": served_rel,
            "served_md5": file_md5(tmp / served_rel),
            "torch_model_dir": str(model_dir),  # the packaged torch model (promote registers its weights)
            "onnx": "model.onnx",
            "onnx_int8": "model.int8.onnx" if int8_kept else None,
            "int8_kept": int8_kept,
            "parity_max_abs_diff": cmp["max_abs_diff"],
            "parity_transcripts_equal": same,
            "onnx_md5": file_md5(onnx_path),
            "onnx_int8_md5": file_md5(tmp / "model.int8.onnx") if int8_kept else None,
            "wer_fp32": wer_fp32,
            "wer_int8": wer_int8,
            "lexicon": "lexicon.txt" if lex_text and arpa_text else None,
            "lm": "lm.arpa" if lex_text and arpa_text else None,
            "report": "export_report.json",
            "rtfx": rtfx,
            "n_mels": int(info["model_kwargs"]["n_mels"]),
            "vocab_size": int(tok.vocab_size),
            "lineage": lineage,
        }

    return run_step(cfg.root, STEP, key, work, force=force)
